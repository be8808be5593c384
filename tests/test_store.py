"""Atomic publishing: a failed or killed build leaves nothing that looks complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onnxforge.runtime import artifact as art
from onnxforge.store import STAGE_MARKER, atomic_dir, clean_stale_tmp, digest_of

from conftest import REPO, new_project

QUICK_RECIPE = """
family: gpt2
default: true
source:
  random:
    config: {n_layer: 1, n_head: 2, n_embd: 32, n_positions: 64}
    seed: 1
    tokenizer: {train_on: calibration/tokenizer-corpus.txt, vocab_size: 400}
validate: {greedy_tokens: 8, eval_window: 32}
variants:
  kv: {}
"""


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    final = tmp_path / "v1"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "model.onnx").write_bytes(b"half")
            raise RuntimeError("export crashed")
    assert not final.exists() and list(tmp_path.iterdir()) == []


def test_stale_tmp_of_dead_process_is_cleaned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".tmp-v1-{dead.pid}"
    stale.mkdir()
    live = tmp_path / f".tmp-v2-{os.getpid()}"
    live.mkdir()
    clean_stale_tmp(tmp_path)
    assert not stale.exists() and live.exists()


def test_digest_is_stable_and_sensitive():
    assert digest_of({"a": 1, "b": [1, 2]}) == digest_of({"b": [1, 2], "a": 1})
    assert digest_of({"a": 1}) != digest_of({"a": 2})


def complete_looking(root):
    """Folders that claim to be complete: stage dirs with stage.json, versions with manifest.json."""
    done = set()
    for p in root.rglob("*"):
        if p.is_dir() and ((p / STAGE_MARKER).is_file() or (p / art.MANIFEST).is_file()):
            done.add(p)
    return done


def test_killed_build_leaves_no_complete_looking_artifact_and_next_build_succeeds(tmp_path):
    project = new_project(tmp_path / "proj", {"quick": QUICK_RECIPE})
    proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "--dir", str(project.dir), "build"],
                            env=project.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # Kill it while the export writes into its temporary folder.
    deadline = time.time() + 120
    stages = project.artifacts / "quick" / ".stages"
    while time.time() < deadline:
        if any(p.name.startswith(".tmp-export") for p in stages.glob(".tmp-*")) if stages.is_dir() else False:
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("the build never reached the export stage")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    leftovers = list(stages.glob(".tmp-*"))
    assert leftovers, "expected the killed export's temporary folder"
    for p in complete_looking(project.artifacts):
        # only the source stage finished before the kill; nothing was published
        assert p.parent.name == ".stages" and p.name.startswith("source-"), p
    assert not (project.artifacts / "quick" / "kv").exists()

    project.doit("build")
    published = art.load(project.artifacts / "quick" / "kv")
    assert published.manifest["validation"]["passed"]
    assert not list(stages.glob(".tmp-*")), "stale temporary folders were not cleaned"


def _stage_processes(parent: int) -> list[int]:
    found = []
    for proc_dir in Path("/proc").iterdir():
        try:
            cmdline = (proc_dir / "cmdline").read_bytes()
            ppid = int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"onnxforge.stage_process" in cmdline and ppid == parent:
            found.append(int(proc_dir.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def test_sigterm_to_the_build_stops_its_stage_process_too(tmp_path):
    # `kill PID` of a build (not its process group) used to leave the stage's own process running on.
    project = new_project(tmp_path / "proj", {"quick": QUICK_RECIPE})
    proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "--dir", str(project.dir), "build"],
                            env=project.env(), stdout=subprocess.DEVNULL, stderr=(tmp_path / "err").open("wb"),
                            start_new_session=True)  # a file: a pipe would stay open while the child lives on
    deadline, children = time.time() + 120, []
    while time.time() < deadline and not children:
        children = _stage_processes(proc.pid)
        time.sleep(0.02)
    if not children:
        proc.kill()
        pytest.fail("the build never started a stage process")
    proc.send_signal(signal.SIGTERM)  # the build's process alone
    proc.wait(timeout=60)
    err = (tmp_path / "err").read_bytes()
    assert proc.returncode != 0
    # The stage process is still importing torch or building (seconds): ended within a second means stopped.
    deadline = time.time() + 1.0
    while time.time() < deadline and any(_running(pid) for pid in children):
        time.sleep(0.1)
    alive = [pid for pid in children if _running(pid)]
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not alive, f"stage processes still running after SIGTERM: {alive}"
    assert b"Traceback" not in err, err.decode()[-2000:]
    project.doit("build")  # and the next build completes
    assert art.load(project.artifacts / "quick" / "kv").manifest["validation"]["passed"]


def test_peak_rss_counts_the_processes_a_stage_starts():
    """Issue 10, item 17: a stage's peak includes what its child processes hold (300 MiB here)."""
    from onnxforge.store import peak_rss

    hold = "b = b'x' * (300 * 2**20); import time; time.sleep(1.0)"  # touched pages: resident
    with peak_rss(interval=0.02) as own:
        pass
    with peak_rss(interval=0.02) as peak:
        subprocess.run([sys.executable, "-c", hold], check=True)
    assert peak[0] - own[0] > 250 * 2**20, (own[0], peak[0])

