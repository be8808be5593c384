"""The demo chain on the pocket models (issue 16), checked by the world's oracles: "star" -> the pocket GPT-2
writes a caption with a star -> the world renders that caption (the pocket SD is not trained yet: see
recipes/sd-pocket-train.yaml) -> a click on the star and the pocket SAM selects it -> "make it green" -> the
star is green and every other pixel keeps its bytes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, new_project
from onnxforge import world
from onnxforge.runtime.demo import Demo, choose_artifact
from onnxforge.runtime.edits import srgb_to_oklab



@pytest.fixture(scope="session")
def pocket_artifacts(tmp_path_factory, pocket_defaults):
    """gpt2-pocket (the default build's) and sam-pocket, both from the committed weights under pocket/."""
    project = new_project(tmp_path_factory.mktemp("pocket-sam-project"),
                          {"sam-pocket": (REPO / "recipes" / "sam-pocket.yaml").read_text()})
    project.doit("build", "recipes=sam-pocket")  # not a default recipe: built by name
    (project.artifacts / "gpt2-pocket").symlink_to(pocket_defaults.artifacts / "gpt2-pocket", target_is_directory=True)
    return project.artifacts


def test_the_demo_chooses_the_pocket_models(pocket_artifacts):
    for role, recipe in (("text", "gpt2-pocket"), ("mask", "sam-pocket")):
        choice = choose_artifact(role, pocket_artifacts)
        assert choice.recipe == recipe


def _inside_point(mask: np.ndarray) -> tuple[float, float]:
    """The mask pixel farthest from its edge (where a person would click to pick the shape)."""
    inside, last = mask.copy(), np.argwhere(mask)
    while inside.any():
        last = np.argwhere(inside)
        core = inside.copy()
        core[1:-1, 1:-1] = inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
        core[[0, -1], :] = False
        core[:, [0, -1]] = False
        inside = core
    y, x = last[len(last) // 2]
    return float(x), float(y)


def _hue(rgb) -> float:
    """OKLab hue angle in degrees."""
    lab = srgb_to_oklab(np.asarray(rgb, np.float32) / 255)
    return float(np.degrees(np.arctan2(lab[..., 2], lab[..., 1])))


@pytest.mark.parametrize("word, seed", [("star", 0), ("circle", 1), ("red", 2)])
def test_issue_16_word_to_caption_to_object_to_green(pocket_artifacts, tmp_path, word, seed):
    demo = Demo(pocket_artifacts, tmp_path)
    demo.start_run(word, seed=seed)
    caption = demo.prompt(word, seed=seed)
    scene = world.parse_caption(caption)
    assert scene is not None and world.caption_mentions(scene, word), caption
    scene = world.Scene((world.Shape(scene.shapes[0].shape, scene.shapes[0].colour, "large", 0.5, 0.5),),
                        scene.background)
    picture, masks = world.render(scene, 64)
    demo.use_picture(picture, name=f"world render of {caption!r}")
    mask = demo.select(points=[_inside_point(masks[0])], labels=[1])
    assert world.mask_iou(mask, masks[0]) >= 0.85
    demo.edit("make it green")
    edited = np.asarray(Image.open(demo.run_dir / "edited.png").convert("RGB"))
    after = world.read_picture(Image.fromarray(edited))
    assert after.shape == scene.shapes[0].shape and after.background == scene.background
    # The recolour keeps each pixel's lightness (shading survives), so a yellow star becomes a light green
    # one: "green" is judged by hue, the OKLab angle of the object's median colour against the world's green.
    got, want = _hue(np.median(edited[masks[0] & mask], axis=0)), _hue(world.COLOURS["green"])
    assert abs((got - want + 180) % 360 - 180) < 15, (got, want)
    assert (edited[~mask] == demo.image[~mask]).all()  # outside the selection: the same bytes
