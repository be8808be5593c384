"""Pocket SAM (issue 16): the `train` source of the sam family and the world mask oracle.

The shipped recipe trains for minutes; here the same recipe trains for a few steps (the plumbing, the
recorded scores, stage reuse) and its quality is left to the build, whose oracle floor gates it.
"""

import json

import numpy as np
import pytest
import yaml

from conftest import REPO, new_project
from onnxforge.config import load_recipes
from onnxforge.families.sam import pocket
from onnxforge.runtime import sam_processing as sp
from onnxforge.world import WorldConfig

RECIPE = "sam-pocket-train"


def short_recipe(**validate) -> dict:
    """The shipped recipe, trained for 2 steps on 16 pictures, the oracle on 3 pictures, its floors off."""
    recipe = yaml.safe_load((REPO / "recipes" / f"{RECIPE}.yaml").read_text())
    recipe["source"]["train"].update(steps=2, examples=16, batch=2)
    recipe["validate"].update({"world_pictures": 3, "min_world_mask_iou": None, **validate})
    recipe["variants"]["int8"]["max_world_mask_iou_drop"] = None
    return recipe


@pytest.fixture(scope="session")
def sam_pocket(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("sam-pocket"), {RECIPE: yaml.safe_dump(short_recipe())})
    project.doit("build", f"recipes={RECIPE}")
    return project


def manifest(project, variant):
    return json.loads((project.variant(variant, RECIPE) / "manifest.json").read_text())


def test_every_variant_records_its_world_mask_iou_and_a_second_build_reuses_the_training(sam_pocket):
    for variant in ("fp32", "int8"):
        world = manifest(sam_pocket, variant)["validation"]["world_mask_iou"]
        assert world["pictures"] == 3 and world["masks"] >= 3 and 0.0 <= world["mean"] <= 1.0
    int8 = manifest(sam_pocket, "int8")["validation"]
    assert int8["world_mask_iou_fp32"] == manifest(sam_pocket, "fp32")["validation"]["world_mask_iou"]
    assert int8["world_mask_iou_drop_vs_fp32"] == pytest.approx(int8["world_mask_iou_fp32"]["mean"] - int8["world_mask_iou"]["mean"])
    source = manifest(sam_pocket, "fp32")["source"]
    assert source["kind"] == "train" and source["steps"] == 2 and source["world"]["max_shapes"] == 1
    out = sam_pocket.doit("build", f"recipes={RECIPE}").stdout
    assert [line for line in out.splitlines() if line.startswith(".  ")] == []  # nothing trained or built again


def test_the_trained_folder_reads_back_as_a_path_source_with_its_world_oracle(sam_pocket, tmp_path):
    """training.json says the folder is a world model: a `path` source of it gets the oracle (plan only)."""
    from onnxforge.config import load_recipe
    from onnxforge.families.sam import build

    folder = next(p for p in (sam_pocket.dir).rglob("training.json")).parent
    assert json.loads((folder / "training.json").read_text())["trained_on"] == "world"
    recipe = short_recipe()
    recipe["source"] = {"path": str(folder)}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(recipe))
    specs = build.plan(load_recipe(tmp_path / "p.yaml"), tmp_path)
    validate = specs["fp32"].upstream[0]
    assert validate.params.world["max_shapes"] == 1


def test_training_preprocesses_pictures_as_the_runtime_and_transformers_do(sam_pocket):
    """The pixels the model learnt from are the ones it is run on: pocket.pixel_values against the runtime's
    preprocessing with the published runtime block, and against transformers' SamProcessor."""
    from onnxforge.families.sam.build import reference_processor

    runtime = manifest(sam_pocket, "fp32")["runtime"]
    folder = next(p for p in (sam_pocket.dir).rglob("training.json")).parent
    reference = reference_processor(folder, runtime["image_size"])
    for picture, _, _ in pocket.held_out(pocket.world_config(), seed=5, count=3):
        ours, _, _ = pocket.pixel_values(picture, runtime["image_size"])
        runtime_pixels, _, _ = sp.preprocess(picture, runtime["image_size"], runtime["pixel_mean"], runtime["pixel_std"])
        np.testing.assert_array_equal(ours, runtime_pixels)
        np.testing.assert_allclose(ours, reference(images=picture, return_tensors="np")["pixel_values"], atol=1e-6)


def test_the_world_oracle_scores_ground_truth_one_and_wrong_masks_less():
    world = WorldConfig(max_shapes=2, size=64)
    truth = {(picture.tobytes(), point): mask
             for picture, masks, points in pocket.held_out(world, seed=7, count=6) for mask, point in zip(masks, points)}
    assert pocket.world_mask_iou(lambda pic, pt: truth[pic.tobytes(), pt], world, seed=7, count=6)["mean"] == 1.0
    assert pocket.world_mask_iou(lambda pic, pt: np.zeros(pic.shape[:2], bool), world, seed=7, count=6)["mean"] == 0.0
    shifted = pocket.world_mask_iou(lambda pic, pt: np.roll(truth[pic.tobytes(), pt], 3, axis=1), world, seed=7, count=6)
    assert 0.3 < shifted["mean"] < 0.95
    for picture, masks, points in pocket.held_out(world, seed=7, count=6):
        assert all(m[y, x] for m, (x, y) in zip(masks, points))  # each point is on its shape


def test_issue_16_the_world_oracle_gates_the_build(tmp_path):
    # One training step cannot segment the world: a floor of 0.9 must stop publishing.
    recipe = short_recipe(min_world_mask_iou=0.9)
    recipe["source"]["train"]["steps"] = 1
    recipe["variants"] = {"fp32": {}}
    project = new_project(tmp_path, {RECIPE: yaml.safe_dump(recipe)})
    proc = project.doit("build", f"recipes={RECIPE}", check=False)
    assert proc.returncode != 0
    assert "world mask IoU (held-out world pictures, a point on each shape)" in proc.stdout + proc.stderr
    assert not (project.artifacts / RECIPE / "fp32").exists()


@pytest.mark.parametrize("change, message", [
    ({"source": {"train": {"steps": 0}}}, "steps must be at least 1"),
    ({"source": {"train": {"world": {"shapes": ["dog"]}}}}, "unknown shape 'dog'"),
])
def test_issue_16_bad_train_source_is_one_line(tmp_path, change, message):
    recipe = short_recipe()
    recipe["source"]["train"].update(change["source"]["train"])
    (tmp_path / f"{RECIPE}.yaml").write_text(yaml.safe_dump(recipe))
    errors: dict[str, str] = {}
    load_recipes(tmp_path, errors=errors)
    assert message in errors[RECIPE] and "\n" not in errors[RECIPE]


def test_zero_steps_given_to_the_trainer_is_one_line(tmp_path):
    with pytest.raises(pocket.TrainError, match="steps must be at least 1"):
        pocket.train_pocket(tmp_path / "m", steps=0)


def test_a_world_floor_on_a_model_not_of_the_world_is_one_line(tmp_path):
    from onnxforge.config import RecipeError, load_recipe
    from onnxforge.families.sam import build

    recipe = yaml.safe_load((REPO / "recipes" / "sam-tiny.yaml").read_text())
    recipe["validate"]["min_world_mask_iou"] = 0.9
    (tmp_path / "sam-tiny.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match="validate.min_world_mask_iou needs a model of the pocket world") as err:
        build.plan(load_recipe(tmp_path / "sam-tiny.yaml"), tmp_path)
    assert "\n" not in str(err.value)
