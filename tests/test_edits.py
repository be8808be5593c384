"""The demo's edits: grammar, OKLab recolour on a synthetic picture with a known mask, the other
model-free edits, and the generative (masked latent blending) edit on the tiny SD artifact."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from onnxforge.runtime import edits as ed
from onnxforge.runtime.edits import EditNotUnderstood, apply_edit, parse_edit, srgb_to_oklab

H, W = 48, 64


def _picture() -> np.ndarray:
    """Shaded, textured, mostly greenish-grey picture: lightness varies across x, noise on top."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.15, 0.85, W)[None, :, None]
    base = np.array([0.45, 0.55, 0.40])[None, None, :] * 2 * ramp
    pix = np.clip(base + rng.normal(0, 0.04, (H, W, 3)), 0, 1)
    return np.round(pix * 255).astype(np.uint8)


def _mask() -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[10:38, 12:52] = True
    return m


def _hue_deg(lab: np.ndarray) -> np.ndarray:
    return np.degrees(np.arctan2(lab[..., 2], lab[..., 1]))


def _angle_diff(a, b):
    return np.abs((a - b + 180) % 360 - 180)


# ---- grammar -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, kind, region, extra", [
    ("make it red", "recolor", "object", {"color": "#ff0000"}),
    ("Make it light blue.", "recolor", "object", {"color": "#add8e6"}),
    ("recolor it to #0f0", "recolor", "object", {"color": "#00ff00"}),
    ("paint it #1E90FF", "recolor", "object", {"color": "#1e90ff"}),
    ("teal", "recolor", "object", {"color": "#008080"}),
    ("make it brighter", "lightness", "object", {"amount": ed.LIGHTNESS_STEP}),
    ("darker", "lightness", "object", {"amount": -ed.LIGHTNESS_STEP}),
    ("make it more saturated", "saturation", "object", {"amount": ed.SATURATION_FACTOR}),
    ("make it less saturated", "saturation", "object", {"amount": 1 / ed.SATURATION_FACTOR}),
    ("blur the background", "blur", "background", {}),
    ("cut it out", "cutout", "object", {}),
    ("remove the background", "cutout", "object", {}),
    ("cut out the background", "cutout", "background", {}),
    ("replace it with a white cat", "generate", "object", {"prompt": "a white cat"}),
    ("make it a golden statue", "generate", "object", {"prompt": "a golden statue"}),
    ("remove it", "generate", "object", {"prompt": ed.REMOVE_PROMPT}),
])
def test_grammar(text, kind, region, extra):
    d = parse_edit(text).describe()
    assert (d["kind"], d["region"]) == (kind, region)
    for k, v in extra.items():
        assert d[k] == pytest.approx(v) if isinstance(v, float) else d[k] == v


@pytest.mark.parametrize("text", ["dance", "hello there", "make", "", "   ", "recolor"])
def test_not_understood_lists_the_grammar(text):
    with pytest.raises(EditNotUnderstood) as err:
        parse_edit(text)
    msg = str(err.value)
    for form in ("make it <colour>", "blur the background", "cut it out", "replace it with <text>", "remove it"):
        assert form in msg


def test_recolor_to_an_unknown_colour_says_what_is_a_colour():
    with pytest.raises(EditNotUnderstood, match=r"'blorange' is not a colour: use a CSS colour name"):
        parse_edit("paint it blorange")


# ---- recolour on a known mask ----------------------------------------------------------------------


@pytest.mark.parametrize("colour", ["red", "#1e90ff", "gold"])
def test_recolor_takes_the_hue_keeps_lightness_and_leaves_outside_identical(colour):
    rgb, mask = _picture(), _mask()
    out = apply_edit(parse_edit(f"make it {colour}"), rgb, mask, feather_px=3)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[~mask], rgb[~mask])  # outside: byte-identical
    inner = ed.erode(mask, 3)  # past the feathered edge: fully recoloured
    before, after = srgb_to_oklab(rgb / 255.0), srgb_to_oklab(out / 255.0)
    target = srgb_to_oklab(np.array(parse_edit(f"make it {colour}").color, np.float32)[None] / 255)[0]
    # lightness kept: the change left is 8-bit rounding (an sRGB step is <= ~0.01 in L)
    assert np.abs(after[inner][:, 0] - before[inner][:, 0]).max() < 0.012
    # hue taken where the result has visible chroma (near black/white the gamut leaves little)
    chroma = np.hypot(after[..., 1], after[..., 2])
    coloured = inner & (chroma > 0.03)
    assert coloured.sum() > 0.5 * inner.sum()
    assert _angle_diff(_hue_deg(after[coloured]), _hue_deg(target[None])[0]).max() < 6.0
    # and it did change: the picture was greenish-grey
    assert np.abs(out[inner].astype(int) - rgb[inner]).mean() > 10


def test_feathered_edge_ramps_inside_the_mask():
    mask = _mask()
    alpha = ed.feather(mask, 4)
    assert (alpha[~mask] == 0).all() and (alpha[ed.erode(mask, 4)] == 1).all()
    row = alpha[24, 12:20]
    assert np.all(np.diff(row) >= 0) and 0 < row[0] < 1
    rgb = _picture()
    out = apply_edit(parse_edit("make it red"), rgb, mask, feather_px=4)
    edge, core = mask & ~ed.erode(mask, 1), ed.erode(mask, 4)
    red = lambda px: px[..., 0].astype(int) - px[..., 1]  # noqa: E731
    assert red(out[edge]).mean() < red(out[core]).mean()  # edge only partly recoloured


# ---- the other model-free edits -------------------------------------------------------------------


def test_brighter_darker_and_saturation_change_only_the_object():
    rgb, mask = _picture(), _mask()
    inner = ed.erode(mask, 3)
    L = lambda px: srgb_to_oklab(px / 255.0)[..., 0]  # noqa: E731
    C = lambda px: np.hypot(*np.moveaxis(srgb_to_oklab(px / 255.0)[..., 1:], -1, 0))  # noqa: E731
    up = apply_edit(parse_edit("make it brighter"), rgb, mask, feather_px=3)
    down = apply_edit(parse_edit("make it darker"), rgb, mask, feather_px=3)
    more = apply_edit(parse_edit("more saturated"), rgb, mask, feather_px=3)
    less = apply_edit(parse_edit("less saturated"), rgb, mask, feather_px=3)
    for out in (up, down, more, less):
        np.testing.assert_array_equal(out[~mask], rgb[~mask])
    assert L(up)[inner].mean() == pytest.approx(L(rgb)[inner].mean() + ed.LIGHTNESS_STEP, abs=0.02)
    assert L(down)[inner].mean() == pytest.approx(L(rgb)[inner].mean() - ed.LIGHTNESS_STEP, abs=0.02)
    assert C(more)[inner].mean() > 1.3 * C(rgb)[inner].mean()
    assert C(less)[inner].mean() < 0.75 * C(rgb)[inner].mean()


def test_blur_background_keeps_the_object():
    rgb, mask = _picture(), _mask()
    out = apply_edit(parse_edit("blur the background"), rgb, mask)
    np.testing.assert_array_equal(out[mask], rgb[mask])
    far = ~ed.dilate(mask, 4)
    # the noise texture is smoothed out in the background
    assert np.abs(np.diff(out.astype(int), axis=1))[far[:, 1:]].mean() < \
        0.5 * np.abs(np.diff(rgb.astype(int), axis=1))[far[:, 1:]].mean()


def test_cut_out_object_and_background_are_transparent_pngs():
    rgb, mask = _picture(), _mask()
    obj = apply_edit(parse_edit("cut it out"), rgb, mask, feather_px=2)
    bg = apply_edit(parse_edit("cut out the background"), rgb, mask, feather_px=2)
    for out in (obj, bg):
        assert out.shape == (H, W, 4)
        np.testing.assert_array_equal(out[..., :3], rgb)
    assert (obj[..., 3][~mask] == 0).all() and (obj[..., 3][ed.erode(mask, 2)] == 255).all()
    assert (bg[..., 3][mask] == 0).all() and (bg[..., 3][ed.erode(~mask, 2)] == 255).all()


def test_apply_edit_bad_input():
    rgb, mask = _picture(), _mask()
    with pytest.raises(ValueError, match=r"mask is 10x10 px but the picture is 64x48 px"):
        apply_edit(parse_edit("make it red"), rgb, np.ones((10, 10), bool))
    with pytest.raises(ValueError, match="the object is empty in this mask"):
        apply_edit(parse_edit("make it red"), rgb, np.zeros((H, W), bool))
    with pytest.raises(ValueError, match="is a generative edit: it needs Stable Diffusion"):
        apply_edit(parse_edit("replace it with a boat"), rgb, mask)


def test_oklab_round_trip_and_gamut_mapping_keep_lightness():
    rgb = np.random.default_rng(1).random((500, 3))
    np.testing.assert_allclose(ed.oklab_to_srgb(srgb_to_oklab(rgb)), rgb, atol=1e-5)
    # a saturated blue pushed onto light pixels is out of gamut: chroma gives way, L does not
    lab = srgb_to_oklab(np.full((20, 3), 0.9))
    lab[:, 1:] = srgb_to_oklab(np.array([[0.0, 0.0, 1.0]]))[0, 1:]
    mapped = ed.oklab_to_srgb_in_gamut(lab)
    assert mapped.min() >= 0 and mapped.max() <= 1
    np.testing.assert_allclose(srgb_to_oklab(mapped)[:, 0], lab[:, 0], atol=2e-3)
    h_in = colorsys.rgb_to_hsv(*mapped[0])[0] * 360
    assert 200 < h_in < 260  # still blue


# ---- the generative edit (masked latent blending) on the tiny SD -----------------------------------


@pytest.fixture(scope="module")
def sd(sd_tiny):
    from onnxforge.runtime.sd import StableDiffusion

    return StableDiffusion(sd_tiny.artifacts / "sd-tiny" / "fp32")


@pytest.mark.parametrize("scheduler", ["pndm", "euler", "dpm++2m"])
def test_generative_edit_keeps_outside_pixels_and_changes_inside(sd, scheduler):
    picture = np.asarray(sd.generate("a lighthouse at dusk", seed=1, steps=6).image)
    mask = np.zeros(picture.shape[:2], bool)
    mask[16:44, 20:52] = True
    result = sd.edit(picture, mask, "a red boat", strength=0.8, steps=6, seed=2, scheduler=scheduler)
    out = np.asarray(result.image)
    assert out.shape == picture.shape
    np.testing.assert_array_equal(out[~mask], picture[~mask])
    assert np.abs(out[mask].astype(int) - picture[mask]).mean() > 5
    assert result.settings["denoising_steps"] >= 1 and result.timings["unet_steps"] >= 1
    again = sd.edit(picture, mask, "a red boat", strength=0.8, steps=6, seed=2, scheduler=scheduler)
    np.testing.assert_array_equal(np.asarray(again.image), out)  # same seed, same edit


def test_lower_strength_stays_closer_to_the_picture(sd):
    picture = np.asarray(sd.generate("a lighthouse at dusk", seed=1, steps=10).image)
    mask = np.zeros(picture.shape[:2], bool)
    mask[8:56, 8:56] = True
    diff = {s: np.abs(np.asarray(sd.edit(picture, mask, "a red boat", strength=s, steps=10, seed=3).image)[mask]
                      .astype(int) - picture[mask]).mean() for s in (0.3, 1.0)}
    assert diff[0.3] < diff[1.0]


def test_generative_edit_bad_input(sd):
    picture = np.asarray(sd.generate("a fox", seed=1, steps=2).image)
    mask = np.zeros(picture.shape[:2], bool)
    mask[4:20, 4:20] = True
    for bad in (0, -0.1, 1.5, "high"):
        with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
            sd.edit(picture, mask, "a boat", strength=bad)
    with pytest.raises(ValueError, match="leaves no denoising step"):
        sd.edit(picture, mask, "a boat", strength=0.05, steps=10)
    with pytest.raises(ValueError, match="the mask is empty"):
        sd.edit(picture, np.zeros_like(mask), "a boat")
    with pytest.raises(ValueError, match=r"mask is \(10, 10\) px \(WxH\) but the picture is 64x64 px"):
        sd.edit(picture, np.ones((10, 10), bool), "a boat")
    with pytest.raises(ValueError, match="width 60 is not a multiple of 8"):
        sd.edit(picture[:, :60], mask[:, :60], "a boat")
