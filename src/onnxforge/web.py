"""`onnxforge web`: the demo as a local web page. Click the object, type the edit, watch it happen.

word -> creative prompt (editable, regenerate) -> picture with live progress (or an uploaded picture)
-> clicks on the picture (a point on the object, a "not here" point, or two clicks for a box) and the
mask overlay redraws after each click (SAM's encoder runs once per picture, each click is one decoder
call), or a numbered candidate from "segment everything" -> the edit in words -> original | mask | edited
and downloads. Every run is the terminal demo's run folder with its run.json (`onnxforge demo --replay`).

The page is NiceGUI (FastAPI + Vue/Quasar, maintained, made for Python-driven interactive pages). Gradio,
the usual choice for model demos, is not used because no Gradio release on the package index installs
beside this project's pins: every one caps Pillow below 13 (the runtime pins pillow==13.0.0) and those
from 6.18 on need huggingface_hub >= 1.2, which transformers 4.57.6 refuses.

All model work is onnxforge.runtime.demo.Demo's; this module only shows it. One job runs at a time per
process (a lock; a waiting visitor is told so); long steps report progress and can be cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from .demo_cli import parse_size
from .runtime.artifact import ArtifactError
from .runtime.demo import DEFAULT_EDIT, ROLES
from .runtime.edits import GRAMMAR

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
DEFAULT_MAX_MB, DEFAULT_MAX_PIXELS = 20, 4096 * 4096
DEFAULT_WORD = "lighthouse"
DISPLAY_PX = 448  # the clickable picture's width on the page; small pictures are scaled up, pixelated

EPILOG = """\
examples:
  onnxforge web                                   # http://127.0.0.1:7860 on the default artifacts
  onnxforge web --port 8080 --out runs/
  onnxforge web --image-model sd-v1-4-random/int8 --mask-model sam-vit-base-random/int8 --low-memory
  onnxforge web --host 0.0.0.0                    # reachable from other machines: read the warning

Needs the web extra: pip install onnxforge[web]. Runs are saved like `onnxforge demo`'s (run.json in
each run folder) and replay with `onnxforge demo --replay RUN/run.json`."""


def add_parser(sub) -> argparse.ArgumentParser:
    w = sub.add_parser("web", help="the demo as a local web page: click the object, type the edit",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__, epilog=EPILOG)
    w.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST}, this "
                                                        "machine only)")
    w.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    w.add_argument("--out", default="runs", help="folder for the run folders (default: runs)")
    w.add_argument("--artifacts", default="artifacts", help="artifacts root (default: artifacts)")
    w.add_argument("--text-model", help="GPT-2 artifact: recipe, recipe/variant or folder (default: automatic)")
    w.add_argument("--image-model", help="Stable Diffusion artifact: recipe, recipe/variant or folder")
    w.add_argument("--mask-model", help="SAM artifact: recipe, recipe/variant or folder")
    w.add_argument("--low-memory", action="store_true", help="one large model loaded at a time (slower)")
    w.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    w.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_MB,
                   help=f"largest picture file accepted (default: {DEFAULT_MAX_MB} MB)")
    w.add_argument("--max-upload-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"largest picture accepted, width x height (default: {DEFAULT_MAX_PIXELS})")
    w.set_defaults(func=main)
    return w


def main(args) -> int:
    try:
        import nicegui  # noqa: F401
    except ImportError:
        raise ValueError("the web page needs the web extra: pip install onnxforge[web]") from None
    from .runtime.demo import Demo

    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: a port number from 1 to 65535")
    if not args.max_upload_mb > 0 or args.max_upload_pixels < 1:
        raise ValueError("--max-upload-mb and --max-upload-pixels must be positive")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host}: the page is reachable from other machines and has no login; "
              "anyone who can reach it can run the models and write files under --out", file=sys.stderr, flush=True)
    demo = Demo(artifacts=args.artifacts, out=args.out,
                models={"text": args.text_model, "image": args.image_model, "mask": args.mask_model},
                low_memory=args.low_memory, threads=args.threads, log=_log)
    for role in ROLES:  # a missing artifact stops here, in one line, before the page starts
        demo.choice(role)
    limits = Limits(int(args.max_upload_mb * 1024 * 1024), args.max_upload_pixels)
    serve(demo, args.host, args.port, limits)
    return 0


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Limits:
    def __init__(self, max_bytes: int, max_pixels: int):
        self.max_bytes, self.max_pixels = max_bytes, max_pixels

    def describe(self) -> str:
        return f"up to {size_text(self.max_bytes)} and {self.max_pixels:,} pixels"


def size_text(n: int) -> str:
    return f"{n / 1024 / 1024:.3g} MB" if n >= 1024 * 1024 else f"{n:,} bytes"


def read_upload(name: str, data: bytes, limits: Limits):
    """Bytes of an uploaded file -> an RGB PIL image, or a ValueError saying what is wrong and what to do."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise ValueError(f"{name} is {size_text(len(data))}; pictures are accepted {limits.describe()}")
    if not data:
        raise ValueError(f"{name} is empty: upload a picture file (PNG, JPEG, WebP ...)")
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size  # from the header, before any pixel is decoded
        if w * h > limits.max_pixels:
            raise ValueError(f"{name} is {w}x{h} = {w * h:,} pixels; pictures are accepted {limits.describe()}")
        im.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError):
        raise ValueError(f"{name} is not a picture this page can read: upload a PNG, JPEG, WebP, BMP or GIF file")
    return im.convert("RGB")


class Cancelled(Exception):
    """The visitor pressed Cancel during a long step."""


class Jobs:
    """One model job at a time in this process; the others wait their turn and are told so."""

    def __init__(self):
        self.lock = asyncio.Lock()
        self.waiting = 0


# ---- the page -------------------------------------------------------------------------------------------


def describe_pick(pick: dict) -> str:
    if "number" in pick:
        return f"candidate {pick['number']}"
    parts = [f"{x:g},{y:g} ({'object' if lab else 'not here'})" for (x, y), lab in zip(pick.get("points", []),
                                                                                      pick.get("labels", []))]
    if pick.get("box"):
        parts.append("box " + ",".join(f"{v:g}" for v in pick["box"]))
    return ", ".join(parts)


def frame(image, margin: int):
    """The picture on a grey frame: clicks on the frame are clicks outside the picture (and say so)."""
    from PIL import ImageOps

    return ImageOps.expand(image.convert("RGB"), border=margin, fill=(96, 96, 96))


def serve(shared, host: str, port: int, limits: Limits) -> None:
    from nicegui import app, ui

    jobs = Jobs()
    artifacts = [shared.choice(role).line() for role in ROLES]
    print(f"onnxforge web: http://{host}:{port} (one job at a time; runs saved under {shared.out}/)", flush=True)

    def page():
        Page(shared.share(log=_log), jobs, artifacts, limits).build()

    app.on_startup(lambda: print("onnxforge web: ready", flush=True))
    ui.run(root=page, host=host, port=port, title="onnxforge demo", reload=False, show=False,
           show_welcome_message=False, favicon="🛠")


class Page:
    """One visitor's page over one Demo (sharing the process's loaded models)."""

    def __init__(self, demo, jobs: Jobs, artifacts: list[str], limits: Limits):
        self.demo, self.jobs, self.artifacts, self.limits = demo, jobs, artifacts, limits
        self.points: list[tuple[float, float]] = []
        self.labels: list[int] = []
        self.corner: tuple[float, float] | None = None  # the first click of a box
        self.box: tuple[float, float, float, float] | None = None
        self.margin = 0
        self.cancel = threading.Event()
        self.step = None  # (stage, i, t) from the worker thread, shown by a timer
        self.t_first = None
        self.prompt_seed = 0

    # ---- layout ----

    def build(self) -> None:
        from nicegui import ui

        self.demo.on_step = self._on_step
        ui.label("onnxforge demo: a word becomes a picture you can edit").classes("text-h5")
        with ui.expansion("Artifacts in use", icon="memory").classes("w-full of-artifacts"):
            for line in self.artifacts:
                ui.label(line).classes("text-caption")
        self.error = ui.label("").classes("text-negative text-body1 of-error")
        self.error.set_visibility(False)
        with ui.row().classes("items-center w-full"):
            self.status = ui.label("Ready. One job runs at a time in this server.").classes("of-status")
            self.bar = ui.linear_progress(value=0, show_value=False).classes("w-64")
            self.bar.set_visibility(False)
            self.cancel_button = ui.button("Cancel", on_click=self._cancel, color="negative") \
                .props("dense").classes("of-cancel")
            self.cancel_button.set_visibility(False)
        ui.timer(0.25, self._show_step)

        with ui.card().classes("w-full"):
            ui.label("1. A word or phrase, and GPT-2 writes a picture prompt").classes("text-subtitle1")
            with ui.row().classes("items-end"):
                self.word = ui.input("Word or phrase", value=DEFAULT_WORD).classes("of-word")
                self.seed = ui.number("Seed", value=int(time.time()) % 1000, min=0, precision=0, format="%d")
                ui.button("Write prompt", on_click=self.write_prompt).classes("of-write")
            self.prompt = ui.textarea("Picture prompt (edit it freely)").classes("w-full of-prompt")
            with ui.row().classes("items-center"):
                ui.button("Regenerate", on_click=self.regenerate).classes("of-regenerate")
                self.size = ui.input("Size WxH", placeholder="artifact's").classes("w-28 of-size")
                self.steps = ui.number("Steps", placeholder="artifact's", min=1, precision=0, format="%d") \
                    .classes("w-24 of-steps")
                ui.button("Draw picture", on_click=self.draw).classes("of-draw")
                ui.label("or upload your own picture:")
                ui.upload(label=f"picture file ({self.limits.describe()})", auto_upload=True,
                          max_file_size=self.limits.max_bytes, on_upload=self.upload,
                          on_rejected=self._rejected).classes("of-upload").props("flat bordered")

        with ui.card().classes("w-full"):
            ui.label("2. Click the object").classes("text-subtitle1")
            with ui.row().classes("items-center"):
                self.mode = ui.toggle({"here": "object here", "not": "not here", "box": "box (two clicks)"},
                                      value="here").classes("of-mode")
                ui.button("Clear clicks", on_click=self.clear_clicks).props("outline").classes("of-clear")
                ui.button("Segment everything", on_click=self.everything).props("outline").classes("of-everything")
                self.pick = ui.select([], label="candidate", on_change=self.pick_candidate).classes("w-32 of-pick")
            with ui.row():
                self.view = ui.interactive_image(on_mouse=self.click, events=["click"], cross="red") \
                    .classes("of-picture").style(f"width: {DISPLAY_PX}px; image-rendering: pixelated")
                self.candidates = ui.image().style(f"width: {DISPLAY_PX // 2}px; image-rendering: pixelated")
            self.view.set_visibility(False)
            self.candidates.set_visibility(False)
            self.selection = ui.label("").classes("text-caption of-selection")

        with ui.card().classes("w-full"):
            ui.label("3. Type the edit").classes("text-subtitle1")
            with ui.row().classes("items-end"):
                self.edit_text = ui.input("Edit", value=DEFAULT_EDIT).classes("w-96 of-edit")
                ui.button("Apply edit", on_click=self.apply_edit).classes("of-apply")
            with ui.expansion("Edits understood"):
                ui.label(GRAMMAR).style("white-space: pre-wrap").classes("text-caption")
            self.sheet = ui.image().classes("of-sheet").style("width: 100%; max-width: 1100px; "
                                                             "image-rendering: pixelated")
            self.sheet.set_visibility(False)
            self.sheet_caption = ui.label("original | mask | edited").classes("text-caption")
            self.sheet.bind_visibility_to(self.sheet_caption)
            with ui.row():
                self.downloads = [ui.button(f"Download {name}", on_click=lambda n=name: self._download(n))
                                  .props("outline").classes(f"of-download-{name.split('.')[0]}")
                                  for name in ("edited.png", "sheet.png")]
            for b in self.downloads:
                b.set_visibility(False)
            self.folder = ui.label("").classes("text-caption of-folder")

    # ---- messages and jobs ----

    def say(self, text: str) -> None:
        self.status.set_text(text)

    def fail(self, text: str) -> None:
        from nicegui import ui

        self.error.set_text(text)
        self.error.set_visibility(True)
        ui.notify(text, type="negative", multi_line=True, timeout=8000)

    def _clear_error(self) -> None:
        self.error.set_text("")
        self.error.set_visibility(False)

    async def job(self, what: str, fn, *args, cancellable: bool = False, **kwargs):
        """Run fn in a worker thread, after any other visitor's job; every failure lands on the page."""
        self._clear_error()
        queued = self.jobs.lock.locked()
        if queued:
            self.jobs.waiting += 1
            self.say(f"Waiting: another job is running in this server (one at a time; {self.jobs.waiting} waiting)")
        try:
            async with self.jobs.lock:
                if queued:
                    self.jobs.waiting -= 1
                    queued = False
                self.cancel.clear()
                self.step, self.t_first = None, None
                self.say(f"{what} ...")
                self.bar.set_value(0)
                if cancellable:  # a denoising loop reports its steps; the other steps only a moving bar
                    self.bar.props(remove="indeterminate")
                else:
                    self.bar.props("indeterminate")
                self.bar.set_visibility(True)
                self.cancel_button.set_visibility(cancellable)
                started = time.perf_counter()
                work = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
                try:
                    result = await asyncio.shield(work)
                except asyncio.CancelledError:
                    # the visitor left mid-job: stop at the next step and keep the lock until the thread is
                    # done, so the next job never runs beside it
                    self.cancel.set()
                    await asyncio.wait([work])
                    raise
                finally:
                    self.bar.set_visibility(False)
                    self.cancel_button.set_visibility(False)
                self.say(f"{what}: done in {time.perf_counter() - started:.2f} s")
                return result
        except asyncio.CancelledError:  # the visitor left while waiting: the queue forgets them
            if queued:
                self.jobs.waiting -= 1
            raise
        except Cancelled:
            self.say(f"{what}: cancelled")
            self.fail(f"{what} was cancelled; the files saved before it stay in {self.demo.run_dir}")
        except (ValueError, ArtifactError) as exc:  # the pipeline's one-line messages (bad input, missing model)
            self.say(f"{what}: stopped")
            self.fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - an unexpected failure is still shown, never a silent hang
            traceback.print_exc()
            self.say(f"{what}: failed")
            self.fail(f"{what} failed: {type(exc).__name__}: {exc}")
        return None

    def _on_step(self, stage: str, i: int, t: float) -> None:  # worker thread: no UI calls here
        if self.cancel.is_set():
            raise Cancelled
        if self.t_first is None:
            self.t_first = t + 1
        self.step = (stage, i, t)

    def _show_step(self) -> None:
        if self.step is not None and self.bar.visible:
            stage, i, t = self.step
            # SD's timesteps fall towards 0: the share of the noise already removed is the honest measure
            self.bar.set_value(max(0.0, min(1.0, 1 - t / self.t_first)))
            self.say(f"{'Drawing the picture' if stage == 'picture' else 'Editing'}: step {i + 1} done "
                     f"(noise level {t:.0f} of {self.t_first - 1:.0f})")

    def _cancel(self) -> None:
        self.cancel.set()
        self.say("Cancelling after the current step ...")

    def _rejected(self) -> None:
        self.fail(f"that file is too large: pictures are accepted {self.limits.describe()}")

    def _download(self, name: str) -> None:
        from nicegui import ui

        if self.demo.run_dir is None or not (self.demo.run_dir / name).is_file():
            self.fail(f"no {name} yet: apply an edit first")
            return
        ui.download.file(self.demo.run_dir / name, filename=f"{self.demo.run_dir.name}-{name}")

    # ---- 1. prompt and picture ----

    def _seed(self) -> int:
        value = self.seed.value
        if value is None or value < 0 or value != int(value):
            raise ValueError(f"seed {value!r}: a whole number >= 0")
        return int(value)

    async def write_prompt(self) -> None:
        def work(word, seed):
            self.demo.start_run(word, seed)
            return self.demo.prompt(word, seed=seed)

        try:
            seed = self._seed()
        except ValueError as exc:
            return self.fail(str(exc))
        self.prompt_seed = seed
        text = await self.job("Writing the prompt", work, self.word.value or "", seed)
        if text is not None:
            self.prompt.set_value(text)
            self._new_run_shown()

    async def regenerate(self) -> None:
        if self.demo.run_dir is None or self.demo.record.get("prompt_source") != "gpt2":
            return await self.write_prompt()
        self.prompt_seed += 1
        text = await self.job("Writing another prompt", self.demo.prompt, self.word.value or "",
                              seed=self.prompt_seed)
        if text is not None:
            self.prompt.set_value(text)

    async def draw(self) -> None:
        typed = " ".join((self.prompt.value or "").split())
        steps = self.steps.value
        if steps is not None and (steps < 1 or steps != int(steps)):
            return self.fail(f"steps {steps!r}: a whole number >= 1, or blank for the artifact's default")
        try:  # the terminal demo's --size parser, so both say the same
            size = parse_size(self.size.value.strip()) if (self.size.value or "").strip() else None
        except ValueError as exc:
            return self.fail(str(exc).replace("--size ", "size "))

        def work():
            if self.demo.run_dir is None:
                self.demo.start_run(self.word.value or None, self._seed())
            if not typed:
                raise ValueError("no prompt: press Write prompt, or type what the picture should show")
            if typed != self.demo.record.get("prompt"):
                self.demo.use_prompt(typed)  # the visitor's own words (or edited GPT-2's)
            return self.demo.picture(size=size, steps=None if steps is None else int(steps))

        image = await self.job("Drawing the picture", work, cancellable=True)
        if image is not None:
            self._show_picture(image)

    async def upload(self, e) -> None:
        name = e.file.name
        data = await e.file.read()
        try:
            image = read_upload(name, data, self.limits)
            seed = self._seed()
        except ValueError as exc:
            return self.fail(str(exc))

        def work():
            self.demo.start_run(self.word.value or Path(name).stem, seed)
            return self.demo.use_picture(image, name=name)

        shown = await self.job(f"Reading {name}", work)
        if shown is not None:
            self._new_run_shown()
            self._show_picture(shown)

    def _new_run_shown(self) -> None:
        self.folder.set_text(f"run folder: {self.demo.run_dir}")
        self.sheet.set_visibility(False)
        for b in self.downloads:
            b.set_visibility(False)

    def _show_picture(self, image) -> None:
        self.points, self.labels, self.corner, self.box = [], [], None, None
        self.margin = max(4, image.width // 16)
        self.view.set_source(frame(image, self.margin))
        self.view.set_content("")
        self.view.set_visibility(True)
        self.candidates.set_visibility(False)
        self.pick.set_options([])
        self.selection.set_text(f"picture {image.width}x{image.height} px: click the object "
                                "(the grey frame is outside the picture)")
        self.sheet.set_visibility(False)

    # ---- 2. the object ----

    async def click(self, e) -> None:
        if self.demo.image is None:
            return self.fail("no picture yet: draw one or upload one first")
        x, y = round(e.image_x - self.margin, 1), round(e.image_y - self.margin, 1)
        points, labels, box = list(self.points), list(self.labels), self.box
        if self.mode.value == "box":
            if self.corner is None:
                h, w = self.demo.image.shape[:2]
                if not (0 <= x < w and 0 <= y < h):
                    return self.fail(f"corner {x:g},{y:g} is outside the picture, which is {w}x{h} px: click on "
                                     "the picture, not the grey frame")
                self.corner = (x, y)
                self._draw_marks()
                self.selection.set_text(f"box corner {x:g},{y:g}: click the opposite corner")
                return
            (x0, y0), self.corner = self.corner, None
            box = (min(x0, x), min(y0, y), max(x0, x), max(y0, y))
        else:
            points.append((x, y))
            labels.append(0 if self.mode.value == "not" else 1)
        def work():
            sam = self.demo.model("mask")  # the one select() uses; its counters show what a click costs
            runs = sam.encoder_runs, sam.decoder_runs
            self.demo.select(points=points or None, labels=labels or None, box=box)
            return sam.encoder_runs - runs[0], sam.decoder_runs - runs[1]

        cost = await self.job("Finding the object", work)
        if cost is None:
            self._draw_marks()
            return
        self.points, self.labels, self.box = points, labels, box
        self._show_mask(f"; this click: {cost[0]} encoder run{'s' * (cost[0] != 1)}, "
                        f"{cost[1]} decoder call{'s' * (cost[1] != 1)}")

    async def everything(self) -> None:
        if self.demo.image is None:
            return self.fail("no picture yet: draw one or upload one first")
        found = await self.job("Segment everything", self.demo.candidates)
        if found is None:
            return
        from PIL import Image

        self.candidates.set_source(Image.open(self.demo.run_dir / "candidates.png"))
        self.candidates.set_visibility(True)
        self.pick.set_options({n: f"{n} ({c.area} px)" for n, c in enumerate(found, start=1)})
        self.selection.set_text(f"{len(found)} candidates, numbered on the right; pick one"
                                if found else "SAM found no objects here: click the object instead")

    async def pick_candidate(self, e) -> None:
        if not e.value:
            return
        mask = await self.job(f"Candidate {e.value}", self.demo.select, number=int(e.value))
        if mask is not None:
            self.points, self.labels, self.box, self.corner = [], [], None, None
            self._show_mask()

    def clear_clicks(self) -> None:
        self.points, self.labels, self.corner, self.box = [], [], None, None
        if self.demo.image is not None:
            from PIL import Image

            self.view.set_source(frame(Image.fromarray(self.demo.image), self.margin))
        self._draw_marks()
        self.selection.set_text("clicks cleared: click the object")

    def _show_mask(self, cost: str = "") -> None:
        from PIL import Image

        overlay = Image.open(self.demo.run_dir / "mask-overlay.png")
        self.view.set_source(frame(overlay, self.margin))
        self._draw_marks()
        rec = self.demo.record
        self.selection.set_text(f"mask: {rec['mask_area']} px from {describe_pick(rec['pick'])}{cost} "
                                "(saved mask.png, mask-overlay.png)")

    def _draw_marks(self) -> None:
        """The clicks as SVG marks over the picture (green: object, red: not here, blue: box)."""
        m, r = self.margin, max(1.5, self.margin / 3)
        marks = [f'<circle cx="{x + m}" cy="{y + m}" r="{r}" fill="{"lime" if lab else "red"}" stroke="black" '
                 f'stroke-width="{r / 3}" />' for (x, y), lab in zip(self.points, self.labels)]
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            marks.append(f'<rect x="{x0 + m}" y="{y0 + m}" width="{x1 - x0}" height="{y1 - y0}" fill="none" '
                         f'stroke="deepskyblue" stroke-width="{r / 2}" />')
        if self.corner is not None:
            marks.append(f'<circle cx="{self.corner[0] + m}" cy="{self.corner[1] + m}" r="{r}" fill="deepskyblue" />')
        self.view.set_content("".join(marks))

    # ---- 3. the edit ----

    async def apply_edit(self) -> None:
        text = self.edit_text.value or ""

        def work():
            out = self.demo.edit(text)
            self.demo.finish()
            return out

        out = await self.job(f"Editing: {text}", work, cancellable=True)
        if out is None:
            return
        from PIL import Image

        self.sheet.set_source(Image.open(self.demo.run_dir / "sheet.png"))
        self.sheet.set_visibility(True)
        for b in self.downloads:
            b.set_visibility(True)
        self.folder.set_text(f"run folder: {self.demo.run_dir} (edited.png, sheet.png, run.json); again: "
                             f"onnxforge demo --replay {self.demo.run_dir / 'run.json'}")

