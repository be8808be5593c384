"""The family registry (issue 9): a new family is one folder; shared code knows no family; validate apart
from publish; broken recipes do not block the others (issue 10, item 14); the runtime stays torch-free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, new_project

TESTS = Path(__file__).resolve().parent
TOY = """family: toy
default: true
width: 8
runtime: {greeting: hello}
variants:
  small: {scale: 0.5}
  big: {scale: 2.0}
"""


def toy_env(**extra) -> dict:
    """The toy family (tests/toyfamily) registered through ONNXFORGE_FAMILIES, nothing else changed."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"ONNXFORGE_FAMILIES": "toyfamily", "PYTHONPATH": path, **extra}


def ran(proc) -> list[str]:
    return sorted(line[3:] for line in proc.stdout.splitlines() if line.startswith(".  "))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("toy"), {"toy-a": TOY})
    project.doit("build", **toy_env())
    return project


def test_a_family_from_one_folder_builds_and_publishes_through_doit(toy):
    from onnxforge.runtime import artifact as art

    for variant in ("small", "big"):
        a = art.load(toy.variant(variant, "toy-a"))
        m = a.manifest
        assert m["artifact"]["family"] == "toy" and m["runtime"] == {"kind": "toy", "width": 8, "greeting": "hello"}
        assert [s["stage"] for s in m["stages"]] == ["source", "export", "validate", "publish"]
        # every stage records its time and peak memory (issue 10, item 17: find the stages that hold copies)
        assert all(s["peak_rss_mib"] > 10 and s["seconds"] >= 0 for s in m["stages"])
        assert m["validation"]["passed"] is True and m["components"]["model"]["inputs"][0]["name"] == "x"
        assert (a.dir / "facts.json").is_file() and not (a.dir / "stage.json").exists()
    listed = toy.doit("list", "--all", **toy_env()).stdout
    for task in ("source:toy-a", "export:toy-a-big", "validate:toy-a-small", "publish:toy-a-big"):
        assert task in listed


def test_changing_a_runtime_default_republishes_without_validating_again(toy):
    recipe = toy.recipes / "toy-a.yaml"
    original = recipe.read_text()
    old = toy.variant("small", "toy-a")
    try:
        recipe.write_text(original.replace("greeting: hello", "greeting: bonjour"))
        proc = toy.doit("build", **toy_env())
        assert ran(proc) == ["publish:toy-a-big", "publish:toy-a-small"]
        new = toy.variant("small", "toy-a")
        assert new != old and json.loads((new / "manifest.json").read_text())["runtime"]["greeting"] == "bonjour"
    finally:
        recipe.write_text(original)
    toy.doit("build", **toy_env())
    assert toy.variant("small", "toy-a") == old


def test_a_planned_stage_the_family_does_not_define_is_an_error_not_skipped(toy):
    (toy.recipes / "toy-bad.yaml").write_text(TOY.replace("default: true", "default: false") + "extra_stage: polish\n")
    try:
        proc = toy.doit("build", "recipes=toy-bad", check=False, **toy_env())
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "Traceback" not in text
        assert "family 'toy' plans a 'polish' stage for toy-bad-small but defines no such stage" in text
    finally:
        (toy.recipes / "toy-bad.yaml").unlink()


def test_a_broken_recipe_is_reported_and_the_others_still_build(toy):
    """Issue 10, item 14: one broken YAML file no longer blocks every build."""
    (toy.recipes / "broken.yaml").write_text("family: toy\nvariants: [oops\n")
    try:
        proc = toy.doit("build", **toy_env())
        assert proc.returncode == 0
        assert "warning: skipping a broken recipe:" in proc.stderr and "broken.yaml: malformed YAML at line 3" in proc.stderr
        assert toy.doit("list", **toy_env()).returncode == 0
        named = toy.doit("build", "recipes=broken", check=False, **toy_env())
        assert named.returncode != 0 and "broken.yaml: malformed YAML" in named.stdout + named.stderr
        assert "Traceback" not in named.stdout + named.stderr
    finally:
        (toy.recipes / "broken.yaml").unlink()


def test_shared_code_never_names_a_family():
    """config, tasks, store, dodo.py, the benchmark harness and the CLI read the registry, never a family name."""
    shared = [REPO / "dodo.py"] + [REPO / "src" / "onnxforge" / f for f in
                                   ("config.py", "tasks.py", "store.py", "bench.py", "budgets.py", "families/common.py")]
    from onnxforge.families import FAMILIES

    for path in shared:
        text = path.read_text()
        for name in FAMILIES:
            for spelled in (f'"{name}"', f"'{name}'", f"families.{name}", f"from .{name}", f"families import {name}"):
                assert spelled not in text, f"{path.name} names the {name} family ({spelled})"


@pytest.mark.parametrize("entry", [
    "onnxforge.runtime.text", "onnxforge.runtime.sam", "onnxforge.runtime.sd", "onnxforge.runtime.schedulers",
    "onnxforge.runtime.artifact", "onnxforge.runtime.demo", "onnxforge.runtime.edits", "onnxforge.families",
    "onnxforge.bench", "onnxforge.budgets", "onnxforge.cli", "onnxforge.demo_cli",
])
def test_runtime_entry_points_never_import_the_build_stack(entry):
    code = (f"import sys, importlib; importlib.import_module({entry!r}); "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'optimum', 'doit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"{entry} imports {out}"
