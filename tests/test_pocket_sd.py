"""Pocket Stable Diffusion and committed pocket weights (issue 16).

Committed pocket weights (pocket/<model>/ with each file's sha256 in pocket.json, written by `onnxforge
pocket-train`) and the pocket SD's trainer (recipes/sd-pocket-train.yaml; its weights are pocket/sd, which the
default recipe sd-pocket reads: tests/test_pocket_demo.py runs them). These tests check the folder guard, a
short training run through `onnxforge pocket-train`, and the world-oracle gate of the SD validate stage.
"""

import json
import shutil

import pytest
import yaml

from conftest import REPO, built_project, new_project, run_cli
from onnxforge.sources import SourceError, local_folder, verify_pocket_folder, write_pocket_manifest


@pytest.fixture
def pocket_folder(tmp_path):
    folder = tmp_path / "weights"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"0123456789")
    (folder / "sub" / "vocab.json").write_text('{"a": 0}')
    write_pocket_manifest(folder, "onnxforge pocket-train --recipe x-train --out weights --replace", {"steps": 1})
    return folder


def test_an_untouched_pocket_folder_passes(pocket_folder, tmp_path):
    assert verify_pocket_folder(pocket_folder)["training"] == {"steps": 1}
    assert local_folder(pocket_folder, tmp_path) == pocket_folder
    assert verify_pocket_folder(tmp_path) is None  # no pocket.json: any other folder


@pytest.mark.parametrize("damage, named", [
    (lambda f: (f / "model.safetensors").write_bytes(b"0123456780"), "model.safetensors: sha256 does not match"),
    (lambda f: (f / "sub" / "vocab.json").write_text('{"a": 1}'), "vocab.json: sha256 does not match"),
    (lambda f: (f / "model.safetensors").unlink(), "model.safetensors: missing from the pocket folder"),
    (lambda f: (f / "extra.bin").write_bytes(b"x"), "extra.bin: not listed"),
    (lambda f: (f / "pocket.json").write_text("{"), "not a pocket manifest"),
])
def test_issue_16_committed_weights_that_differ_from_their_manifest_are_refused(pocket_folder, tmp_path, damage, named):
    damage(pocket_folder)
    with pytest.raises(SourceError) as err:
        local_folder(pocket_folder, tmp_path)
    message = str(err.value)
    assert named in message and "\n" not in message
    assert "git checkout" in message or "remove it" in message
    if "manifest" not in named:
        assert "onnxforge pocket-train --recipe x-train" in message  # the command that rebuilds them


def test_pocket_train_refuses_a_recipe_without_a_train_source():
    proc = run_cli("pocket-train", "--recipe", "sd-tiny", "--out", "/tmp/never-written")
    assert proc.returncode == 2
    assert "has a random source, not train" in proc.stderr and "Traceback" not in proc.stderr


def test_a_zero_step_training_source_is_a_recipe_error(tmp_path):
    text = yaml.safe_load((REPO / "recipes" / "sd-pocket-train.yaml").read_text())
    text["source"]["train"]["unet_steps"] = 0
    project = new_project(tmp_path / "p", {"sd-bad": yaml.safe_dump(text)})
    proc = project.doit("build", "recipes=sd-bad", check=False)
    assert proc.returncode != 0
    assert "unet_steps" in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr


def test_pocket_train_trains_the_source_stage_and_writes_a_folder_the_path_source_reads(tmp_path):
    """A few steps of the real trainer through `onnxforge pocket-train` (the source stage in its own process, as
    a user runs it): the folder is what diffusers and the `path` source read, with each file's sha256."""
    from diffusers import StableDiffusionPipeline

    from onnxforge.families.sd.source import _check_layout

    text = yaml.safe_load((REPO / "recipes" / "sd-pocket-train.yaml").read_text())
    text["source"]["train"] = {"seed": 0, "examples": 100, "vae_steps": 2, "unet_steps": 2}
    project = new_project(tmp_path / "p", {"sd-short-train": yaml.safe_dump(text)})
    out = tmp_path / "pocket-sd"
    proc = run_cli("pocket-train", "--recipe", "sd-short-train", "--out", str(out), env=project.env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pocket SD: oracle on 32 held-out captions" in proc.stderr  # progress is shown, not swallowed
    manifest = verify_pocket_folder(out)
    assert manifest["training"]["source"]["pocket"]["training"]["unet_steps"] == 2
    _check_layout(out)
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.vae.config.scaling_factor == pytest.approx(
        manifest["training"]["source"]["pocket"]["training"]["latent_scaling_factor"], rel=1e-5)
    assert pipe.tokenizer("a red star on a yellow background").input_ids[-1] == pipe.tokenizer.eos_token_id
    stage = next((project.artifacts / "sd-short-train" / ".stages").glob("source-*"))
    assert (stage / "training-check-1.png").is_file()  # the oracle's pictures at the end of training


def test_the_world_oracle_gate_fails_a_variant_below_its_floor():
    from onnxforge.families.common import fail_on
    from onnxforge.families.sd.validate import world_checks
    from onnxforge.store import ValidationFailed

    checks, results = [], {}
    world_checks(checks, {"pictures": 10, "colour": 0.9, "shape": 0.5, "fp32": {"colour": 0.95, "shape": 0.9}},
                 {"min_colour": 0.8, "min_shape": 0.8, "max_drop": 0.03})
    with pytest.raises(ValidationFailed) as err:
        fail_on(checks, results)
    assert "shape right" in str(err.value) and "shape drop vs fp32" in str(err.value)
    assert "colour right" not in str(err.value)  # 0.9 >= 0.8 passed
