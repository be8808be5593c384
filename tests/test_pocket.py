"""Pocket models trained here on the shapes world (issue 16): the `train` source and the world's oracles.

The shipped gpt2-pocket recipe trains for minutes; these tests train the same recipe for a few steps (the
plumbing, the recorded scores, the gate) and leave its quality to the build, whose oracle floor gates it.
"""

import json

import pytest
import yaml

from conftest import REPO, new_project, run_cli
from onnxforge.config import load_recipes


def pocket_recipe() -> str:
    """The shipped recipe, trained for 40 steps, its floor off (a 40-step model meets none)."""
    recipe = yaml.safe_load((REPO / "recipes" / "gpt2-pocket-train.yaml").read_text())
    recipe["source"]["train"].update(steps=40, examples=300)
    recipe["validate"].update(min_world_caption_score=None, world_samples_per_word=2)
    return yaml.safe_dump(recipe)


@pytest.fixture(scope="session")
def pocket(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("pocket-project"), {"gpt2-pocket": pocket_recipe()})
    project.doit("build", "recipes=gpt2-pocket")
    return project


def manifest(project, variant):
    return json.loads((project.variant(variant, "gpt2-pocket") / "manifest.json").read_text())


def test_every_variant_records_its_world_caption_score(pocket):
    scores = {}
    for variant in ("base", "kv", "pruned", "kv-int8"):
        m = manifest(pocket, variant)
        world = m["validation"]["world_captions"]
        assert world["count"] == 12 * 2  # 8 colours + 4 shapes, 2 samples each
        assert 0.0 <= world["score"] <= 1.0
        assert "world_captions" in m["validation"]["checks_run"]
        scores[variant] = world["score"]
    source = manifest(pocket, "kv")["source"]
    assert source["kind"] == "train" and source["steps"] == 40 and source["world"]["max_shapes"] == 1
    # base and kv are the same weights and sampling: the same captions
    assert scores["base"] == scores["kv"]


def test_pocket_generate_prints_the_caption_without_the_template(pocket):
    proc = run_cli("generate", "star", "--artifact", str(pocket.artifacts / "gpt2-pocket" / "kv"), "--seed", "0",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    text = json.loads(proc.stdout)["text"]
    assert not text.startswith("draw star:") and text == text.strip()


def test_issue_16_the_caption_oracle_gates_the_build(tmp_path):
    # One training step cannot write captions of the world: a floor of 0.5 must stop publishing.
    text = yaml.safe_load(pocket_recipe())
    text["source"]["train"]["steps"] = 1
    text["validate"]["min_world_caption_score"] = 0.5
    text["variants"] = {"kv": {}}
    project = new_project(tmp_path, {"gpt2-pocket": yaml.safe_dump(text)})
    proc = project.doit("build", "recipes=gpt2-pocket", check=False)
    assert proc.returncode != 0
    assert "world captions that parse and mention the word" in proc.stdout + proc.stderr
    assert not (project.artifacts / "gpt2-pocket" / "kv").exists()


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "steps must be at least 1"),
    ({"world": {"colours": ["red", "pink"]}}, "unknown colour 'pink'"),
    ({"world": {"shapes": ["dog"]}}, "unknown shape 'dog'"),
    ({"world": {"max_shapes": 5}}, "max_shapes must be 1 or 2"),
])
def test_issue_16_bad_train_source_is_one_line(tmp_path, change, message):
    recipe = yaml.safe_load(pocket_recipe())
    recipe["source"]["train"].update(change)
    (tmp_path / "gpt2-pocket.yaml").write_text(yaml.safe_dump(recipe))
    errors: dict[str, str] = {}
    load_recipes(tmp_path, errors=errors)
    assert message in errors["gpt2-pocket"]
    assert "\n" not in errors["gpt2-pocket"]
