"""The pocket world (issue 16): deterministic scenes, exact masks, and oracles that are exact on it."""

import numpy as np
import pytest
from PIL import ImageFilter

from onnxforge.world import (COLOURS, SHAPES, WorldConfig, WorldError, caption_mentions, contact_sheet, dataset,
                             mask_iou, parse_caption, read_picture)


def test_same_seed_same_world_other_seed_other_world():
    first = [(s.caption, np.asarray(i).tobytes(), m.tobytes()) for s, i, m in dataset(WorldConfig(), 7, 20)]
    again = [(s.caption, np.asarray(i).tobytes(), m.tobytes()) for s, i, m in dataset(WorldConfig(), 7, 20)]
    other = [(s.caption, np.asarray(i).tobytes(), m.tobytes()) for s, i, m in dataset(WorldConfig(), 8, 20)]
    assert first == again
    assert first != other


def test_every_colour_and_shape_appears_and_shapes_never_share_a_colour_with_the_background():
    scenes = [s for s, _, _ in dataset(WorldConfig(max_shapes=2), 0, 400)]
    assert {sh.colour for s in scenes for sh in s.shapes} == set(COLOURS)
    assert {sh.shape for s in scenes for sh in s.shapes} == set(SHAPES)
    assert {len(s.shapes) for s in scenes} == {1, 2}
    for scene in scenes:
        colours = [sh.colour for sh in scene.shapes]
        assert scene.background not in colours and len(set(colours)) == len(colours)


def test_masks_are_the_shapes_pixels():
    for scene, image, masks in dataset(WorldConfig(max_shapes=2, size=64), 3, 50):
        pixels = np.asarray(image)
        for shape, mask in zip(scene.shapes, masks):
            assert mask.sum() > 50
            assert (pixels[mask] == COLOURS[shape.colour]).all(axis=1).mean() > 0.97
        if len(masks) == 2:
            assert not np.logical_and(masks[0], masks[1]).any()


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_picture_oracle_is_exact_on_rendered_pictures(size, blur):
    # Blur (a radius of 1 px at 64 px) stands in for the soft edges a trained decoder draws.
    for scene, image, masks in dataset(WorldConfig(size=size), 11, 150):
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur * size / 64))
        reading = read_picture(image)
        shape = scene.shapes[0]
        assert (reading.background, reading.colour, reading.shape) == (scene.background, shape.colour, shape.shape)
        assert mask_iou(reading.mask, masks[0]) > 0.85


def test_contact_sheet_frames_each_picture_by_its_reading():
    # Rendered pictures read right (green frames); a plain picture reads no shape (red frame).
    from PIL import Image
    items = list(dataset(WorldConfig(size=64), 2, 3))
    pictures = [image for _, image, _ in items] + [Image.new("RGB", (64, 64), COLOURS["blue"])]
    captions = [scene.caption for scene, _, _ in items] + ["a red star on a blue background"]
    sheet = np.asarray(contact_sheet(pictures, captions, columns=2, cell=64))
    assert sheet.shape == (2 * (64 + 8 + 26), 2 * (64 + 8), 3)
    frames = [tuple(sheet[row * 98 + 1, col * 72 + 1]) for row in (0, 1) for col in (0, 1)]
    assert frames == [(40, 160, 60)] * 3 + [(200, 40, 40)]
    assert (sheet[4:68, 4:68] == np.asarray(pictures[0])).all()


def test_picture_oracle_sees_no_shape_in_a_plain_picture():
    from PIL import Image
    reading = read_picture(Image.new("RGB", (64, 64), COLOURS["blue"]))
    assert (reading.background, reading.colour, reading.shape) == ("blue", None, None)


def test_caption_grammar_round_trips_and_refuses_other_text():
    for scene, _, _ in dataset(WorldConfig(max_shapes=2), 5, 100):
        parsed = parse_caption(scene.caption)
        assert parsed is not None and parsed.caption == scene.caption
    for text in ["a red star", "a red star on a yellow", "a pink star on a yellow background",
                 "a red dog on a yellow background", "the red star on a yellow background", ""]:
        assert parse_caption(text) is None, text
    scene = parse_caption("A red star and a blue circle on a yellow background.")
    assert caption_mentions(scene, "star") and caption_mentions(scene, "blue")
    assert not caption_mentions(scene, "square")


@pytest.mark.parametrize("kwargs, message", [
    ({"colours": ("red", "pink")}, "unknown colour 'pink'"),
    ({"shapes": ("circle", "dog")}, "unknown shape 'dog'"),
    ({"backgrounds": ("mauve",)}, "unknown colour 'mauve'"),
    ({"max_shapes": 3}, "max_shapes must be 1 or 2"),
    ({"size": 8}, "picture size must be 16-1024 px"),
    ({"colours": ("red",)}, "at least two colours"),
])
def test_issue_16_bad_world_config_is_one_line(kwargs, message):
    with pytest.raises(WorldError, match=message) as caught:
        WorldConfig(**kwargs)
    assert "\n" not in str(caught.value)
