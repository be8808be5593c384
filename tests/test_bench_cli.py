"""The one bench command and inspect across families, and a runtime-only install (issue 10, items 5, 6, 10)."""

from __future__ import annotations

import json
import os

import pytest

from conftest import run_cli

BLOCKER = '''
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Absent())
'''


def runtime_only_env(tmp_path, blocked=("torch", "doit", "matplotlib", "transformers", "diffusers")) -> dict:
    """A `pip install .` (runtime extra only) simulated: the build packages fail to import."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER.replace("{BLOCKED}", repr(set(blocked))))
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore")


def test_issue10_item5_bench_refuses_another_familys_options_and_mixed_families(tiny, sam_tiny):
    proc = run_cli("bench", "--recipe", "sam-tiny", "--artifacts", str(sam_tiny.artifacts), "--prompt-tokens", "8")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--prompt-tokens: not an option of the sam benchmark" in proc.stderr
    proc = run_cli("bench", "--artifact", f"a={tiny.variant('kv')}", "--artifact", f"b={sam_tiny.variant('fp32', 'sam-tiny')}")
    assert proc.returncode == 2 and "compare artifacts of one family at a time (got gpt2, sam)" in proc.stderr
    for alias in ("bench-sam", "bench-sd"):  # the old commands are aliases of the one harness
        proc = run_cli(alias, "--recipe", "gpt2-tiny", "--artifacts", str(tiny.artifacts), "--image", "64x48")
        assert proc.returncode == 2 and "--image: not an option of the gpt2 benchmark" in proc.stderr


def test_issue10_item6_runtime_only_install_says_which_extra_and_still_benchmarks(tiny, tmp_path):
    env = runtime_only_env(tmp_path)
    proc = run_cli("build", "gpt2-tiny", env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "building needs the build extra" in proc.stderr and "pip install 'onnxforge[build]'" in proc.stderr
    out = tmp_path / "bench"
    proc = run_cli("bench", "--artifact", f"kv={tiny.variant('kv')}", "--runs", "1", "--warmup", "0", "--new-tokens", "3",
                   "--prompt-tokens", "4", "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "bench.json").read_text())["variants"]["kv"]["decode_ms_per_token"]["n"] == 2
    assert "no chart: matplotlib is not installed" in proc.stdout and not (out / "bench.png").exists()


def test_issue10_item10_inspect_shows_every_familys_benchmark_and_cuts_no_word(sam_tiny, tmp_path):
    art = sam_tiny.variant("int8", "sam-tiny")
    proc = run_cli("bench", "--artifact", f"int8={art}", "--runs", "2", "--warmup", "0", "--prompts", "1",
                   "--points-per-side", "2", "--image", "64x48", "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    shown = run_cli("inspect", str(art))
    assert shown.returncode == 0
    line = next(x for x in shown.stdout.splitlines() if x.startswith("benchmark:"))
    assert "encoder" in line and "mean" in line and "n 2" in line and "not measured" not in line
    for row in shown.stdout.splitlines():  # stage records are cut between key=value pairs, never mid-word
        assert not row.rstrip(" │|").endswith(("\\", '"')), row
