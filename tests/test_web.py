"""`onnxforge web` in a real browser (headless Chromium from Debian driven by selenium) on the tiny default
artifacts: word -> prompt -> picture -> a click on a known spot -> mask -> edit -> edited picture and the
run folder, replayed by the terminal demo; a non-image upload, an oversized one and a click outside the
picture, each showing its message. Plus the parts that need no browser: upload checks, the --host warning,
the missing-extra line, uploaded pictures replayed, and cancelling a long step.

The browser is a requirement, not an option: without /usr/bin/chromium and /usr/bin/chromedriver these
tests FAIL and say how to install them (`make browser`). Screenshots go to test-artifacts/web/ (ignored
by git) for a person to look at after a run.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SHOTS = REPO / "test-artifacts" / "web"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,2000")
WAIT_S = 90  # the slowest step on the tiny artifacts takes about a second; CI machines are shared
MAX_PIXELS = 200 * 200  # the server under test refuses larger uploads, so the limit is cheap to hit


# ---- the server and the browser --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict:
    # as a user's shell has it: NiceGUI takes PYTEST_CURRENT_TEST for its own test harness and changes mode
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    return dict(env, PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def server(demo_artifacts, tmp_path_factory):
    """`onnxforge web` on the tiny artifacts, as a user starts it, on a free port. The image model is the classic
    sd-tiny (the fast path, sd-tiny-lcm, takes at most 8 steps: too quick for the cancel test's long job)."""
    work = tmp_path_factory.mktemp("web")
    port, out, log = free_port(), work / "runs", work / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "onnxforge.cli", "web", "--artifacts", str(demo_artifacts),
                                 "--image-model", "sd-tiny",
                                 "--out", str(out), "--port", str(port), "--max-upload-pixels", str(MAX_PIXELS)],
                                stdout=f, stderr=subprocess.STDOUT, env=server_env())
    try:
        deadline = time.time() + WAIT_S
        while "onnxforge web: ready" not in log.read_text():
            assert proc.poll() is None, f"onnxforge web exited {proc.returncode}:\n{log.read_text()}"
            assert time.time() < deadline, f"onnxforge web did not start in {WAIT_S} s:\n{log.read_text()}"
            time.sleep(0.2)
        yield {"url": f"http://127.0.0.1:{port}", "out": out, "log": log}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def chrome(tmp_path_factory):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"the browser tests need headless Chromium and its driver, missing: {', '.join(missing)}; "
                    "install them with `make browser` (Debian: apt-get install chromium chromium-driver)",
                    pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


class PageDriver:
    """The page's parts by their of-* classes, and waits that name what they waited for."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.wait = driver, WebDriverWait(driver, WAIT_S)
        driver.get(url)
        self.until(lambda: self.find(".of-write"), "the page to load")

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        found = self.d.find_elements(By.CSS_SELECTOR, css)
        return found[0] if found else None

    def text(self, css: str) -> str:
        el = self.find(css)
        return el.text if el is not None else ""

    def until(self, check, what: str, error_ends_wait: bool = True):
        def done(_):
            if error_ends_wait and self.text(".of-error"):  # an error shown on the page ends the wait at once
                raise AssertionError(f"the page shows an error while waiting for {what}: {self.text('.of-error')!r}")
            return check()

        try:
            return self.wait.until(done)
        except AssertionError:
            self.shot("error")
            raise
        except Exception as exc:  # a timeout says what was awaited and what the page showed
            self.shot("timeout")
            raise AssertionError(f"waited {WAIT_S} s for {what}; status {self.text('.of-status')!r}, "
                                 f"error {self.text('.of-error')!r}") from exc

    def type_into(self, css: str, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.find(css)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(text)

    def error(self) -> str:
        return self.until(lambda: self.text(".of-error"), "an error message on the page", error_ends_wait=False)

    def click_picture(self, fx: float, fy: float) -> None:
        """Click at a fraction (0..1) of the shown picture element's width and height (frame included)."""
        from selenium.webdriver.common.action_chains import ActionChains

        img = self.find(".of-picture img")
        w, h = img.size["width"], img.size["height"]
        ActionChains(self.d).move_to_element_with_offset(img, round((fx - 0.5) * w), round((fy - 0.5) * h)) \
            .click().perform()

    def write(self, word: str) -> None:
        self.type_into(".of-word input", word)
        self.find(".of-write").click()
        self.until(lambda: self.find(".of-prompt textarea").get_attribute("value"), "GPT-2's prompt")

    def draw(self, word: str) -> None:
        self.write(word)
        self.find(".of-draw").click()
        self.until(lambda: "Drawing the picture: done" in self.text(".of-status"), "the picture")
        self.until(lambda: self.find(".of-picture img") is not None and self.find(".of-picture img").is_displayed(),
                   "the clickable picture")

    def shot(self, name: str) -> Path:
        path = SHOTS / f"{name}.png"
        self.d.save_screenshot(str(path))
        return path


def only_run(out: Path, word: str) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir() and word in p.name]
    assert len(runs) == 1, runs
    return runs[0]


# ---- in the browser ---------------------------------------------------------------------------------------


def test_the_whole_flow_in_a_browser(server, chrome):
    page = PageDriver(chrome, server["url"])
    # which artifacts the page runs: the three tiny defaults
    shown = page.find(".of-artifacts").get_attribute("textContent")
    for name in ("gpt2-tiny/", "sd-tiny/", "sam-tiny/"):
        assert name in shown, shown
    page.draw("castle")
    prompt = page.find(".of-prompt textarea").get_attribute("value")
    run = only_run(server["out"], "castle")
    assert (run / "prompt.txt").read_text().strip() == prompt
    assert (run / "image.png").is_file()
    page.shot("1-picture")

    # a click in the middle of the shown element: the frame is symmetric, so it is the picture's middle
    before = page.find(".of-picture img").get_attribute("src")
    page.click_picture(0.5, 0.5)
    page.until(lambda: page.text(".of-selection").startswith("mask:"), "the mask after the click")
    assert page.find(".of-picture img").get_attribute("src") != before, "the overlay did not replace the picture"
    record = json.loads((run / "run.json").read_text())
    (x, y), = record["pick"]["points"]
    w, h = record["size"]
    assert abs(x - w / 2) <= 1 and abs(y - h / 2) <= 1, (x, y, record["size"])
    assert record["pick"]["labels"] == [1] and (run / "mask.png").is_file() and record["mask_area"] > 0
    page.shot("2-mask")

    page.type_into(".of-edit input", "make it red")
    page.find(".of-apply").click()
    page.until(lambda: "run.json" in page.text(".of-folder"), "the edited picture")
    page.until(lambda: page.find(".of-sheet img") is not None and page.find(".of-sheet img").is_displayed()
               and page.find(".of-sheet img").size["width"] > 300, "original | mask | edited shown")
    assert page.find(".of-download-edited").is_displayed() and page.find(".of-download-sheet").is_displayed()
    page.shot("3-edited")
    record = json.loads((run / "run.json").read_text())
    assert record["finished"] and record["edit"]["text"] == "make it red"
    assert record["completed"] == ["prompt", "picture", "mask", "edit"]
    edited = np.asarray(Image.open(run / "edited.png"))
    mask = np.asarray(Image.open(run / "mask.png")) > 0
    original = np.asarray(Image.open(run / "image.png"))
    assert (edited[~mask] == original[~mask]).all() and (edited[mask] != original[mask]).any()

    # the terminal demo replays the page's run: same pick, same mask
    proc = run_cli("demo", "--replay", str(run / "run.json"), "--out", str(server["out"] / "replayed"),
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    again = only_run(server["out"] / "replayed", "castle")
    assert json.loads((again / "run.json").read_text())["pick"] == record["pick"]
    assert (np.asarray(Image.open(again / "mask.png")) == np.asarray(Image.open(run / "mask.png"))).all()


def test_not_here_points_a_box_by_two_clicks_and_a_numbered_candidate(server, chrome):
    page = PageDriver(chrome, server["url"])
    page.draw("meadow")
    run = only_run(server["out"], "meadow")

    def pick_after(action, what):
        before = page.text(".of-selection")
        action()
        page.until(lambda: page.text(".of-selection") != before and page.text(".of-selection").startswith("mask:"),
                   what)
        return json.loads((run / "run.json").read_text())["pick"], page.text(".of-selection")

    def mode(name):
        page.d.find_element("xpath", f"//*[contains(@class, 'of-mode')]//button[.//*[text()='{name}']]").click()

    pick, said = pick_after(lambda: page.click_picture(0.3, 0.3), "the first point's mask")
    # SAM's encoder runs once for the picture; every click after it is one decoder call
    assert "this click: 1 encoder run, 1 decoder call" in said, said
    mode("not here")
    pick, said = pick_after(lambda: page.click_picture(0.7, 0.7), "the mask with a not-here point")
    assert pick["labels"] == [1, 0] and len(pick["points"]) == 2, pick
    assert "this click: 0 encoder runs, 1 decoder call" in said and "(not here)" in said, said
    page.shot("8-not-here")

    page.find(".of-clear").click()
    mode("box (two clicks)")
    page.click_picture(0.25, 0.25)
    page.until(lambda: page.text(".of-selection").startswith("box corner"), "the first corner")
    pick, said = pick_after(lambda: page.click_picture(0.75, 0.75), "the box's mask")
    x0, y0, x1, y1 = pick["box"]
    assert "points" not in pick and 8 <= x0 < 20 < 44 < x1 <= 56 and 8 <= y0 < 20 < 44 < y1 <= 56, pick
    assert "0 encoder runs, 1 decoder call" in said, said
    page.shot("9-box")

    page.find(".of-everything").click()
    page.until(lambda: "candidates, numbered" in page.text(".of-selection"), "segment everything")
    page.find(".of-pick").click()
    page.until(lambda: page.find(".q-menu .q-item") is not None, "the candidate list")
    pick, said = pick_after(lambda: page.find(".q-menu .q-item").click(), "candidate 1's mask")
    assert pick == {"number": 1} and "candidate 1" in said, (pick, said)
    assert (run / "candidates.png").is_file()


def test_a_click_outside_the_picture_says_so(server, chrome):
    page = PageDriver(chrome, server["url"])
    page.draw("harbour")
    page.click_picture(0.02, 0.02)  # on the grey frame, up and left of the picture
    message = page.error()
    assert "outside the picture" in message and "64x64" in message, message
    page.shot("4-click-outside")
    assert "mask" not in json.loads((only_run(server["out"], "harbour") / "run.json").read_text())["completed"]


def test_uploads_a_non_image_and_a_too_large_picture_are_refused_a_picture_is_used(server, chrome, tmp_path):
    page = PageDriver(chrome, server["url"])
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a picture\n")
    page.find(".of-upload input[type=file]").send_keys(str(notes))
    message = page.error()
    assert message.startswith("notes.txt is not a picture") and "PNG" in message, message
    page.shot("5-upload-not-an-image")

    big = tmp_path / "big.png"
    Image.new("RGB", (300, 300), "white").save(big)
    page.find(".of-upload input[type=file]").send_keys(str(big))
    page.until(lambda: "big.png is 300x300" in page.text(".of-error"), "the pixel limit message", False)
    assert f"{MAX_PIXELS:,} pixels" in page.text(".of-error")

    ok = tmp_path / "small-boat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(ok)
    page.find(".of-upload input[type=file]").send_keys(str(ok))
    page.until(lambda: "Reading small-boat.png: done" in page.text(".of-status"), "the uploaded picture")
    assert not page.find(".of-error").is_displayed()
    page.click_picture(0.5, 0.5)
    page.until(lambda: page.text(".of-selection").startswith("mask:"), "the mask on the uploaded picture")
    run = only_run(server["out"], "lighthouse")  # the word box's default names the run
    record = json.loads((run / "run.json").read_text())
    assert record["picture_source"] == "upload" and record["picture_name"] == "small-boat.png"
    assert (np.asarray(Image.open(run / "image.png")) == np.asarray(Image.open(ok))).all()


def test_one_job_at_a_time_a_second_visitor_waits_saying_so_and_cancel_stops_a_long_picture(server, chrome):
    page = PageDriver(chrome, server["url"])
    first = chrome.current_window_handle
    page.write("slow")
    chrome.switch_to.new_window("tab")  # a second visitor of the same server, ready before the long job starts
    second = chrome.current_window_handle
    other = PageDriver(chrome, server["url"])
    other.type_into(".of-word input", "second")

    chrome.switch_to.window(first)
    # 256 px and the most steps the tiny SD takes: a minute of work, long enough to act during it
    page.type_into(".of-size input", "256")
    page.type_into(".of-steps input", "200")
    page.find(".of-draw").click()
    page.until(lambda: "Drawing the picture: step" in page.text(".of-status"), "the picture's live progress")
    assert page.find(".of-cancel").is_displayed()

    chrome.switch_to.window(second)
    other.find(".of-write").click()
    other.until(lambda: "Waiting: another job is running in this server" in other.text(".of-status"),
                "the second visitor told to wait")
    other.shot("6-second-visitor-waits")

    chrome.switch_to.window(first)
    page.find(".of-cancel").click()
    page.until(lambda: "Drawing the picture was cancelled" in page.text(".of-error"), "the cancel message", False)
    page.shot("7-cancelled")
    run = only_run(server["out"], "slow")
    assert not (run / "image.png").exists() and json.loads((run / "run.json").read_text())["completed"] == ["prompt"]

    chrome.switch_to.window(second)  # the waiting job runs once the first is cancelled
    other.until(lambda: other.find(".of-prompt textarea").get_attribute("value"), "the second visitor's prompt")
    chrome.close()
    chrome.switch_to.window(first)


# ---- without a browser ------------------------------------------------------------------------------------


def test_read_upload_limits_and_messages():
    from onnxforge.web import Limits, read_upload

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buf, format="PNG")
    png = buf.getvalue()
    assert read_upload("a.png", png, Limits(10**6, 40 * 30)).size == (40, 30)
    with pytest.raises(ValueError, match=r"a.png is 40x30 = 1,200 pixels; pictures are accepted up to"):
        read_upload("a.png", png, Limits(10**6, 40 * 30 - 1))
    with pytest.raises(ValueError, match=rf"a.png is {len(png)} bytes; pictures are accepted up to 20 bytes and"):
        read_upload("a.png", png, Limits(20, 10**6))
    with pytest.raises(ValueError, match=r"a.png is 2 MB; pictures are accepted up to 1 MB and 100 pixels"):
        read_upload("a.png", png + bytes(2 * 1024 * 1024 - len(png)), Limits(1024 * 1024, 100))
    with pytest.raises(ValueError, match="x.pdf is not a picture this page can read"):
        read_upload("x.pdf", b"%PDF-1.4 not a picture", Limits(10**6, 10**6))
    with pytest.raises(ValueError, match="cut.png is not a picture"):
        read_upload("cut.png", png[:60], Limits(10**6, 10**6))  # a truncated PNG
    with pytest.raises(ValueError, match="empty.png is empty"):
        read_upload("empty.png", b"", Limits(10**6, 10**6))


def test_host_other_than_localhost_prints_a_warning(tmp_path):
    proc = run_cli("web", "--host", "0.0.0.0", "--artifacts", str(tmp_path / "none"))
    assert "warning: --host 0.0.0.0: the page is reachable from other machines" in proc.stderr
    # no artifacts: one line naming what to build, before any server starts
    assert proc.returncode == 2 and "doit build" in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_without_the_web_extra_one_line_says_how_to_install_it():
    code = ("import sys; sys.modules['nicegui'] = None\n"  # what an install without the extra looks like
            "from onnxforge.cli import main; sys.exit(main(['web']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "onnxforge web: error: the web page needs the web extra: pip install onnxforge[web]"


def test_an_uploaded_picture_run_replays_from_its_folder(demo_artifacts, tmp_path):
    from onnxforge.runtime.demo import Demo

    demo = Demo(artifacts=demo_artifacts, out=tmp_path / "runs", log=lambda line: None)
    demo.start_run("boat", seed=3)
    pixels = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    demo.use_picture(Image.fromarray(pixels), name="boat.png")
    demo.select(points=[(20, 30)], labels=[1])
    demo.edit("make it blue")
    demo.finish()
    assert demo.record["prompt_source"] is None and demo.record["steps"] is None
    assert demo.command() == f"onnxforge demo --replay {demo.run_dir / 'run.json'}"
    proc = run_cli("demo", "--replay", str(demo.run_dir / "run.json"), "--out", str(tmp_path / "again"),
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    again = only_run(tmp_path / "again", "boat")
    for name in ("image.png", "mask.png", "edited.png"):
        assert (np.asarray(Image.open(again / name)) == np.asarray(Image.open(demo.run_dir / name))).all(), name


def test_a_long_step_can_be_cancelled_and_leaves_a_consistent_run(demo_artifacts, tmp_path):
    from onnxforge.runtime.demo import Demo

    class Stop(Exception):
        pass

    steps = []

    def on_step(stage, i, t):
        steps.append((stage, i, t))
        if i == 1:
            raise Stop  # what the page's Cancel button does between two denoising steps

    demo = Demo(artifacts=demo_artifacts, out=tmp_path / "runs", log=lambda line: None)
    demo.on_step = on_step
    demo.start_run("castle", seed=1)
    demo.use_prompt("a castle")
    with pytest.raises(Stop):
        demo.picture()
    assert [s[:2] for s in steps] == [("picture", 0), ("picture", 1)] and steps[0][2] > steps[1][2]
    assert demo.image is None and not (demo.run_dir / "image.png").exists()
    assert json.loads((demo.run_dir / "run.json").read_text())["completed"] == ["prompt"]
    demo.on_step = None
    demo.picture()  # the same run goes on after a cancel
    assert (demo.run_dir / "image.png").is_file()
