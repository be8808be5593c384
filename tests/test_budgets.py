"""Artifact budgets (issue 14): recipe schema, bad input, and the four regressions the tiny recipes' budgets catch.

Each regression is made from the session's tiny builds (the shipped recipes, budgets included) the way it would
arrive in a change, then `check_recipe` runs on an artifacts root where that one variant is replaced: the
unchanged variants are links to the real builds, so nothing is built twice. The unchanged build passes the same
budgets (test_check_on_an_unchanged_build_passes_and_writes_its_report; the batch-1 case of the fast-path test),
so a test that could only fail cannot pass by accident.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from onnxforge.budgets import CheckError, broken_lines, check_recipe
from onnxforge.config import RecipeError, load_recipe
from onnxforge.runtime import artifact as art

from conftest import REPO, new_project, run_cli

REPS = 3  # interleaved repetitions, as `doit check` in CI (the fast-path latency ratio misses by ~1.6x, not 2x)


def recipe_with(tmp_path: Path, name: str, save_as: str | None = None, **changes) -> Path:
    """The shipped recipe `name` with top-level keys replaced, written as <tmp>/recipes/<save_as or name>.yaml."""
    body = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
    body.update(changes)
    path = tmp_path / "recipes" / f"{save_as or name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


# ---- bad input: one line each -----------------------------------------------------------------------------------


@pytest.mark.parametrize("budgets, match", [
    ({"kv-fast": {"size_mib": 2}}, r"budgets\.kv-fast: no such variant \(this recipe's variants: base, kv, pruned, kv-int8\)"),
    ({"kv": {"ratio": {"decode_speed": {"of": "base", "max": 0.5}}}},
     r"budgets\.kv\.ratio\.decode_speed: unknown figure; gpt2 figures: size_mib, peak_rss_mib, float_weight_mib, decode_ms, prefill_ms"),
    ({"kv": {"ceiling": {"latency": {"max": 1, "cpu": "x", "simd": []}}}}, r"budgets\.kv\.ceiling\.latency: unknown figure"),
    ({"kv": {"decode_ms": 3}}, r"budgets\.kv\.decode_ms: unknown key; allowed: size_mib, peak_rss_mib, ratio, ceiling"),
    ({"kv": {"size_mib": 0}}, r"budgets\.kv\.size_mib: Input should be greater than 0 \(got 0\)"),
    ({"kv": {"peak_rss_mib": -5}}, r"budgets\.kv\.peak_rss_mib: Input should be greater than 0 \(got -5\)"),
    ({"kv": {"ratio": {"decode_ms": {"of": "base", "max": 0}}}}, r"budgets\.kv\.ratio\.decode_ms\.max: Input should be greater than 0"),
    ({"kv": {"ratio": {"decode_ms": {"of": "base", "max": -0.5}}}}, r"budgets\.kv\.ratio\.decode_ms\.max: Input should be greater than 0"),
    ({"kv": {"ceiling": {"decode_ms": {"max": -1, "cpu": "x", "simd": []}}}}, r"budgets\.kv\.ceiling\.decode_ms\.max: Input should be greater than 0"),
    ({"kv": {"ratio": {"decode_ms": {"of": "bse", "max": 0.5}}}}, r"budgets\.kv\.ratio\.decode_ms\.of: no such variant 'bse'"),
    ({"kv": {"ratio": {"decode_ms": {"of": "kv", "max": 0.5}}}}, r"budgets\.kv\.ratio\.decode_ms\.of: a variant cannot be its own reference"),
    ({"kv": {"ceiling": {"decode_ms": {"max": 1}}}}, r"budgets\.kv\.ceiling\.decode_ms\.cpu: required key is missing"),
])
def test_bad_budget_is_one_line_naming_file_and_key(tmp_path, budgets, match):
    path = recipe_with(tmp_path, "gpt2-tiny", budgets=budgets)
    with pytest.raises(RecipeError, match=match) as info:
        load_recipe(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_sd_figures_are_the_sd_familys(tmp_path):
    path = recipe_with(tmp_path, "sd-tiny", budgets={"int8": {"ratio": {"decode_ms": {"of": "fp32", "max": 1}}}})
    with pytest.raises(RecipeError, match=r"int8\.ratio\.decode_ms: unknown figure; sd figures: size_mib, peak_rss_mib, float_weight_mib, unet_step_ms"):
        load_recipe(path)


def test_check_before_anything_is_built_names_the_doit_command(tmp_path):
    project = new_project(tmp_path / "p")
    proc = run_cli("check", "--recipe", "gpt2-tiny", env=project.env())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"onnxforge check: error: nothing of gpt2-tiny is built under {project.artifacts}: "
                                   "run `doit build recipes=gpt2-tiny` first")
    proc = project.doit("check", check=False)
    assert proc.returncode != 0
    assert (f"check:gpt2-tiny: nothing of gpt2-tiny is built under {project.artifacts}: run `doit build "
            "recipes=gpt2-tiny` first") in proc.stdout + proc.stderr


def test_ratio_whose_reference_is_not_built_says_so(tiny, tmp_path):
    root = tmp_path / "artifacts"
    (root / "gpt2-tiny").mkdir(parents=True)
    (root / "gpt2-tiny" / "kv").symlink_to(tiny.artifacts / "gpt2-tiny" / "kv", target_is_directory=True)
    recipe = load_recipe(tiny.recipes / "gpt2-tiny.yaml")
    with pytest.raises(CheckError, match=r"^gpt2-tiny/base has budgets but is not built"):
        check_recipe(recipe, root, reps=1)
    with pytest.raises(CheckError, match=r"^gpt2-tiny/kv: budget decode_ms is a ratio to base, which is not built under "
                                         r".*: run `doit build recipes=gpt2-tiny`$"):
        check_recipe(recipe, root, reps=1, variants=["kv"])


def test_check_on_an_unchanged_build_passes_and_writes_its_report(tiny, tmp_path):
    proc = run_cli("check", "--recipe", "gpt2-tiny", "--reps", "2", "--out", str(tmp_path / "report"), env=tiny.env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report" / "check.json").read_text())
    assert report["passed"] and report["reps"] == 2
    assert {r["verdict"] for r in report["budgets"]} == {"ok"}
    assert "| gpt2-tiny/kv | decode_ms / base |" in proc.stdout


# ---- the four regressions -------------------------------------------------------------------------------------


def mixed_root(tmp_path: Path, project, recipe: str, replaced: dict[str, Path]) -> Path:
    """An artifacts root: the project's built variants as links, except `replaced` (variant -> version folder)."""
    root = tmp_path / "artifacts"
    (root / recipe).mkdir(parents=True)
    for variant in (project.artifacts / recipe).iterdir():
        if variant.name.startswith(".") or variant.name in ("bench", "check") or variant.name in replaced:
            continue
        (root / recipe / variant.name).symlink_to(variant, target_is_directory=True)
    for variant, folder in replaced.items():
        (root / recipe / variant).mkdir()
        shutil.copytree(folder, root / recipe / variant / folder.name, symlinks=True)
        (root / recipe / variant / art.LATEST).write_text(folder.name)
    return root


def broken_by(tmp_path, project, recipe: str, variant: str, regressed: Path) -> list[str]:
    """Budget lines of `variant` broken with it replaced by `regressed` (the unchanged build passes every budget:
    test_check_on_an_unchanged_build_passes_and_writes_its_report). These regressions miss their budgets by 2x or
    more, so two repetitions do."""
    r = load_recipe(project.recipes / f"{recipe}.yaml")
    root = mixed_root(tmp_path, project, recipe, {variant: regressed})
    return broken_lines(check_recipe(r, root, reps=2, variants=[variant], out_dir=tmp_path / "regressed"))


def rehash(version: Path, changed: str) -> None:
    """Record a changed file's new size and sha256 in the manifest, as a build that wrote it would."""
    mpath = version / art.MANIFEST
    m = json.loads(mpath.read_text())
    size, sha = (version / changed).stat().st_size, hashlib.sha256((version / changed).read_bytes()).hexdigest()
    for rec in [f for c in m["components"].values() for f in c["files"]] + m["files"]:
        if rec["file"] == changed:
            rec.update(bytes=size, sha256=sha)
    m["artifact"]["bytes_on_disk"] = sum(p.stat().st_size for p in version.rglob("*") if p.is_file())
    mpath.write_text(json.dumps(m, indent=2))


def test_int8_variant_whose_graph_is_fp32_is_caught(tiny, tmp_path):
    # A quantize stage that silently wrote its fp32 input: kv-int8 holds the kv graph.
    broken = broken_by(tmp_path, tiny, "gpt2-tiny", "kv-int8", tiny.variant("kv"))
    assert any(line.startswith("gpt2-tiny/kv-int8: size_mib / kv ") for line in broken), broken


def test_kv_variant_that_recomputes_the_whole_sequence_is_caught(tiny, tmp_path):
    # An export that lost the past inputs: the runtime then recomputes the whole sequence for every token.
    broken = broken_by(tmp_path, tiny, "gpt2-tiny", "kv", tiny.variant("base"))
    assert any(line.startswith("gpt2-tiny/kv: decode_ms / base ") for line in broken), broken


def test_a_file_twice_its_size_is_caught(tiny, tmp_path):
    # Weights stored twice (e.g. a tied lm_head duplicated): every initializer gets an unused copy.
    import onnx

    version = tmp_path / "doubled" / tiny.variant("kv").name
    shutil.copytree(tiny.variant("kv"), version)
    graph_file = json.loads((version / art.MANIFEST).read_text())["components"]["decoder"]["file"]
    model = onnx.load(str(version / graph_file))
    copies = []
    for init in model.graph.initializer:
        dup = onnx.TensorProto()
        dup.CopyFrom(init)
        dup.name = f"{init.name}.copy"
        copies.append(dup)
    model.graph.initializer.extend(copies)
    onnx.save(model, str(version / graph_file))
    rehash(version, graph_file)
    broken = broken_by(tmp_path, tiny, "gpt2-tiny", "kv", version)
    assert any(line.startswith("gpt2-tiny/kv: size_mib ") for line in broken), broken


def unet_at_batch(fp32: Path, out: Path, batch: int) -> Path:
    """The fp32 UNet graph with its batch dimension fixed: what an export traced at that batch without a dynamic
    batch axis gives (the weights file is shared: only the graph's input and output shapes change)."""
    import onnx

    version = out / fp32.name
    shutil.copytree(fp32, version)
    m = json.loads((version / art.MANIFEST).read_text())
    unet = m["components"]["unet"]
    model = onnx.load(str(version / unet["file"]), load_external_data=False)
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(model, str(version / unet["file"]))
    for io in unet["inputs"] + unet["outputs"]:
        io["shape"][0] = batch
    (version / art.MANIFEST).write_text(json.dumps(m, indent=2))
    rehash(version, unet["file"])
    return version


FAST = {"ratio": {"unet_batch": {"of": "sd-tiny/fp32", "max": 0.5}, "unet_step_ms": {"of": "sd-tiny/fp32", "max": 0.8}}}


@pytest.mark.parametrize("batch, caught", [(1, False), (2, True)])
def test_fast_path_unet_exported_at_batch_2_is_caught(sd_tiny, tmp_path, batch, caught):
    # A fast-path recipe (one UNet pass per step, as LCM's one-pass guidance: its own recipe on branch lcm) whose
    # budget compares its UNet step with sd-tiny's CFG fp32 step (batch 2 at guidance 7.5) at the same size:
    # its graph at batch 1 passes, the same graph exported at batch 2 breaks both figures.
    path = recipe_with(tmp_path, "sd-tiny", save_as="sd-tiny-fast", variants={"fast": {}}, budgets={"fast": FAST})
    root = mixed_root(tmp_path, sd_tiny, "sd-tiny", {})
    fast = unet_at_batch(sd_tiny.variant("fp32", "sd-tiny"), tmp_path / "fast", batch)
    (root / "sd-tiny-fast" / "fast").mkdir(parents=True)
    (root / "sd-tiny-fast" / "fast" / fast.name).symlink_to(fast, target_is_directory=True)
    (root / "sd-tiny-fast" / "fast" / art.LATEST).write_text(fast.name)
    report = check_recipe(load_recipe(path), root, reps=REPS, out_dir=tmp_path / "report")
    broken = broken_lines(report)
    if caught:
        assert any(line.startswith("sd-tiny-fast/fast: unet_batch / sd-tiny/fp32 1 ") for line in broken), broken
        assert any(line.startswith("sd-tiny-fast/fast: unet_step_ms / sd-tiny/fp32 ") for line in broken), broken
    else:
        assert broken == [], report["budgets"]


def test_ceiling_set_on_another_machine_class_is_skipped_saying_so(tiny, tmp_path):
    budgets = {"kv": {"ceiling": {"decode_ms": {"max": 1e-6, "cpu": "Some Other CPU", "simd": ["avx2"]}}}}
    recipe = load_recipe(recipe_with(tmp_path, "gpt2-tiny", budgets=budgets))
    report = check_recipe(recipe, tiny.artifacts, reps=1, out_dir=tmp_path / "report")
    (row,) = report["budgets"]
    assert row["verdict"] == "skipped" and row["note"].startswith("set on Some Other CPU (avx2); this machine is ")
    here = report["machine"]
    budgets["kv"]["ceiling"]["decode_ms"].update(cpu=here["cpu"], simd=here["simd"])
    recipe = load_recipe(recipe_with(tmp_path, "gpt2-tiny", budgets=budgets))
    report = check_recipe(recipe, tiny.artifacts, reps=1, out_dir=tmp_path / "report")
    assert [r["verdict"] for r in report["budgets"]] == ["BROKEN"]
