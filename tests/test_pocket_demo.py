"""The demo chain on the pocket models (issue 16), checked by the world's oracles: "star" -> the pocket GPT-2
writes a caption with a star -> the pocket SD draws it -> a click on the star and the pocket SAM selects it ->
"make it green" -> the star is green and every other pixel keeps its bytes. All three are default recipes,
built from the committed weights under pocket/ (no training)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from onnxforge import world
from onnxforge.runtime.demo import Demo, choose_artifact
from onnxforge.runtime.edits import srgb_to_oklab


@pytest.fixture(scope="session")
def pocket_artifacts(pocket_defaults):
    return pocket_defaults.artifacts


def test_the_demo_chooses_the_pocket_models(pocket_artifacts, demo_artifacts, tmp_path):
    # beside the random-weight defaults too, as after `make demo`: the pocket-world models win each role
    root = tmp_path / "artifacts"
    root.mkdir()
    for folder in (pocket_artifacts, demo_artifacts):
        for entry in folder.iterdir():
            (root / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
    for role, recipe in (("text", "gpt2-pocket"), ("image", "sd-pocket"), ("mask", "sam-pocket")):
        assert choose_artifact(role, root).recipe == recipe


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
def test_issue_16_word_to_caption_to_picture_to_object_to_green(pocket_artifacts, tmp_path, word, seed):
    demo = Demo(pocket_artifacts, tmp_path)
    demo.start_run(word, seed=seed)
    caption = demo.prompt(word, seed=seed)
    scene = world.parse_caption(caption)
    assert scene is not None and world.caption_mentions(scene, word), caption
    picture = demo.picture()
    drawn = world.read_picture(picture)
    want = scene.shapes[0]
    assert (drawn.colour, drawn.shape, drawn.background) == (want.colour, want.shape, scene.background), caption
    mask = demo.select(points=[_inside_point(drawn.mask)], labels=[1])
    assert world.mask_iou(mask, drawn.mask) >= 0.8
    demo.edit("make it green")
    edited = np.asarray(Image.open(demo.run_dir / "edited.png").convert("RGB"))
    after = world.read_picture(Image.fromarray(edited))
    assert after.shape == want.shape and after.background == scene.background
    # The recolour keeps each pixel's lightness (shading survives), so a yellow star becomes a light green
    # one: "green" is judged by hue, the OKLab angle of the object's median colour against the world's green.
    got, wanted = _hue(np.median(edited[drawn.mask & mask], axis=0)), _hue(world.COLOURS["green"])
    assert abs((got - wanted + 180) % 360 - 180) < 15, (got, wanted)
    assert (edited[~mask] == demo.image[~mask]).all()  # outside the selection: the same bytes
