"""Atomic publishing: a failed or killed build leaves nothing that looks complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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


def test_peak_rss_counts_the_processes_a_stage_starts():
    """Issue 10, item 17: a stage's peak includes what its child processes hold (300 MiB here)."""
    from onnxforge.store import peak_rss

    hold = "b = b'x' * (300 * 2**20); import time; time.sleep(1.0)"  # touched pages: resident
    with peak_rss(interval=0.02) as own:
        pass
    with peak_rss(interval=0.02) as peak:
        subprocess.run([sys.executable, "-c", hold], check=True)
    assert peak[0] - own[0] > 250 * 2**20, (own[0], peak[0])

