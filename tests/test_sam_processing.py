"""onnxforge.runtime.sam_processing against transformers' SAM processors.

The module under test is torch-free; the reference side (SamImageProcessor,
SamProcessor, F.interpolate) needs torch + transformers, which the build
environment has. Those tests skip when they are missing.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from onnxforge.runtime import sam_processing as sp

# Measured on torch 2.13 CPU / transformers 4.57.6 / Pillow 13:
# - preprocess: pixel_values identical (max abs diff 0.0): same PIL BILINEAR resize
#   and the same float64-rescale / float32-normalize order.
PREPROCESS_ATOL = 1e-6
# - postprocess_masks: 0 to 2e-6 max abs diff on logits of magnitude ~30 (1-2 float32
#   ulps). torch picks a fused-multiply-add kernel or a plain one depending on size
#   and thread count; we emulate the FMA one, so the plain one differs by an ulp.
POSTPROCESS_ATOL = 1e-5
# - binarized masks: measured 0 differing pixels; allow this fraction for logits
#   that land within an ulp of the threshold.
BINARY_MISMATCH_FRACTION = 1e-4
# - transform_points/boxes: we return float32; equal to transformers' float64
#   result cast to float32 (difference <= 0.5 ulp, ~6e-5 near 1024).

# (height, width): landscape, tall, wide, square at target size, odd, tiny.
SIZES = [(480, 640), (1500, 300), (200, 1999), (1024, 1024), (333, 517), (5, 7)]


@pytest.fixture(scope="module")
def hf():
    """transformers' default SAM image processor and processor (no download needed)."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    image_processor = transformers.SamImageProcessor()
    return image_processor, transformers.SamProcessor(image_processor=image_processor)


def _random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------
# preprocess
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", SIZES)
def test_preprocess_matches_transformers(hf, h, w):
    image_processor, _ = hf
    image = _random_image(h, w, seed=h * 7 + w)
    ref = image_processor(image, return_tensors="np")

    pixel_values, original_size, reshaped_size = sp.preprocess(image)

    assert pixel_values.dtype == np.float32
    assert pixel_values.shape == ref["pixel_values"].shape == (1, 3, 1024, 1024)
    assert original_size == tuple(int(v) for v in ref["original_sizes"][0]) == (h, w)
    assert reshaped_size == tuple(int(v) for v in ref["reshaped_input_sizes"][0])
    assert max(reshaped_size) == 1024
    assert np.abs(pixel_values - ref["pixel_values"]).max() <= PREPROCESS_ATOL
    # Padding is exactly zero.
    assert not pixel_values[..., reshaped_size[0]:, :].any()
    assert not pixel_values[..., :, reshaped_size[1]:].any()


def test_preprocess_custom_mean_std_and_size(hf):
    transformers = pytest.importorskip("transformers")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ref_proc = transformers.SamImageProcessor(
        image_mean=list(mean), image_std=list(std),
        size={"longest_edge": 512}, pad_size={"height": 512, "width": 512},
    )
    image = _random_image(300, 410, seed=3)
    ref = ref_proc(image, return_tensors="np")
    pixel_values, _, reshaped_size = sp.preprocess(image, target_size=512, mean=mean, std=std)
    assert pixel_values.shape == (1, 3, 512, 512)
    assert reshaped_size == tuple(int(v) for v in ref["reshaped_input_sizes"][0])
    assert np.abs(pixel_values - ref["pixel_values"]).max() <= PREPROCESS_ATOL


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_preprocess_of_converted_file_matches_transformers_on_pil(hf, tmp_path, mode):
    # transformers converts PIL images with convert("RGB"); load_rgb must agree.
    image_processor, _ = hf
    pil = Image.fromarray(_random_image(90, 120, seed=5)).convert(mode)
    path = tmp_path / f"img_{mode}.png"
    pil.save(path)
    ref = image_processor(Image.open(path), return_tensors="np")
    pixel_values, original_size, _ = sp.preprocess(sp.load_rgb(path))
    assert original_size == (90, 120)
    assert np.abs(pixel_values - ref["pixel_values"]).max() <= PREPROCESS_ATOL


# ---------------------------------------------------------------------------
# prompt coordinates
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", SIZES)
def test_transform_points_and_boxes_match_samprocessor(hf, h, w):
    _, processor = hf
    rng = np.random.default_rng(h + w)
    original_size = (h, w)
    reshaped_size = sp.resized_shape(original_size, 1024)

    points = rng.uniform(0, 1, (5, 2)) * (w, h)
    points[0] = (0, 0)
    points[1] = (w, h)  # the far corner is still inside
    ours = sp.transform_points(points, original_size, reshaped_size)
    ref = processor._normalize_coordinates(1024, points, original_size)
    assert ours.dtype == np.float32 and ours.shape == (5, 2)
    np.testing.assert_array_equal(ours, ref.astype(np.float32))

    corners = np.sort(rng.uniform(0, 1, (3, 2, 2)) * (w, h), axis=1)  # x0<=x1, y0<=y1
    boxes = corners.reshape(3, 4)
    ours = sp.transform_boxes(boxes, original_size, reshaped_size)
    ref = processor._normalize_coordinates(1024, boxes, original_size, is_bounding_box=True)
    assert ours.shape == (3, 4)
    np.testing.assert_array_equal(ours, ref.astype(np.float32))


def test_transform_points_keeps_leading_shape():
    pts = np.array([[[10.0, 20.0], [30.0, 40.0]]])  # (1, 2, 2)
    out = sp.transform_points(pts, (480, 640), (768, 1024))
    assert out.shape == (1, 2, 2)
    np.testing.assert_allclose(out[0, 0], [16.0, 32.0])


# ---------------------------------------------------------------------------
# postprocess_masks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", SIZES)
def test_postprocess_masks_matches_transformers(hf, h, w):
    import torch

    image_processor, _ = hf
    original_size = (h, w)
    reshaped_size = sp.resized_shape(original_size, 1024)
    logits = np.random.default_rng(h * w).normal(0, 8, (2, 3, 256, 256)).astype(np.float32)

    ref = image_processor.post_process_masks(
        [torch.from_numpy(logits.copy())], [original_size], [reshaped_size], binarize=False
    )[0].numpy()
    ours = sp.postprocess_masks(logits, original_size, reshaped_size, binarize=False)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (2, 3, h, w)
    assert np.abs(ours - ref).max() <= POSTPROCESS_ATOL

    for threshold in (0.0, 1.5):
        ref_bin = image_processor.post_process_masks(
            [torch.from_numpy(logits.copy())], [original_size], [reshaped_size], mask_threshold=threshold
        )[0].numpy()
        ours_bin = sp.postprocess_masks(logits, original_size, reshaped_size, threshold=threshold)
        assert ours_bin.dtype == np.bool_
        assert np.mean(ours_bin != ref_bin) <= BINARY_MISMATCH_FRACTION


@pytest.mark.parametrize(
    "in_hw,out_hw", [((256, 256), (1024, 1024)), ((1024, 205), (1500, 300)), ((20, 11), (7, 5)), ((7, 5), (20, 11))]
)
def test_resize_bilinear_matches_torch_interpolate(in_hw, out_hw):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).normal(0, 8, (1, 2, *in_hw)).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x), out_hw, mode="bilinear", align_corners=False
    ).numpy()
    ours = sp.resize_bilinear(x, *out_hw)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= POSTPROCESS_ATOL


# ---------------------------------------------------------------------------
# segment everything
# ---------------------------------------------------------------------------


def test_point_grid():
    grid = sp.point_grid(4)
    assert grid.shape == (16, 2)
    assert grid.min() > 0 and grid.max() < 1
    np.testing.assert_allclose(grid[:4, 0], [0.125, 0.375, 0.625, 0.875])  # x varies fastest
    np.testing.assert_allclose(grid[:4, 1], 0.125)
    np.testing.assert_allclose(sp.point_grid(1), [[0.5, 0.5]])
    with pytest.raises(ValueError, match="n_per_side"):
        sp.point_grid(0)


def test_point_grid_matches_transformers(hf):
    from transformers.models.sam.image_processing_sam import _build_point_grid

    np.testing.assert_array_equal(sp.point_grid(32), _build_point_grid(32))


def test_stability_score_crafted():
    logits = np.full((6, 6), -5.0, dtype=np.float32)
    logits[1:5, 1:5] = 0.5  # 16 px above -1 but not above +1
    logits[2:4, 2:4] = 3.0  # 4 px above +1
    assert sp.stability_score(logits, 0.0, 1.0) == pytest.approx(4 / 16)
    # Batched: a perfectly crisp mask scores 1; an all-background one scores 0, not NaN.
    crisp = np.where(np.eye(6, dtype=bool), 10.0, -10.0).astype(np.float32)
    scores = sp.stability_score(np.stack([logits, crisp, np.full((6, 6), -9.0)]), 0.0, 1.0)
    np.testing.assert_allclose(scores, [0.25, 1.0, 0.0])


def test_stability_score_matches_transformers(hf):
    import torch
    from transformers.models.sam.image_processing_sam import _compute_stability_score_pt

    logits = np.random.default_rng(2).normal(0, 3, (5, 64, 48)).astype(np.float32)
    ref = _compute_stability_score_pt(torch.from_numpy(logits), 0.0, 1.0).numpy()
    np.testing.assert_allclose(sp.stability_score(logits, 0.0, 1.0), ref, rtol=1e-6)


def _disc_logits(h, w, cy, cx, r, sharpness=4.0):
    yy, xx = np.mgrid[:h, :w]
    return (sharpness * (r - np.hypot(yy - cy, xx - cx))).astype(np.float32)


def test_filter_candidates_crafted():
    h, w = 40, 50
    good = _disc_logits(h, w, 20, 20, 8, sharpness=40.0)  # crisp disc: stable
    low_iou = _disc_logits(h, w, 10, 35, 5, sharpness=40.0)  # stable but the model is unsure
    unstable = np.random.default_rng(0).normal(0, 0.3, (h, w)).astype(np.float32)  # all near 0
    empty = np.full((h, w), -20.0, dtype=np.float32)
    logits = np.stack([good, low_iou, unstable, empty])
    scores = np.array([0.95, 0.5, 0.99, 0.99], dtype=np.float32)

    cands = sp.filter_candidates(logits, scores)
    assert [c.index for c in cands] == [0]
    (c,) = cands
    assert c.score == pytest.approx(0.95)
    assert c.stability > 0.95
    assert c.mask.dtype == np.bool_ and c.mask.shape == (h, w)
    assert c.area == int((good > 0).sum())
    ys, xs = np.nonzero(good > 0)
    assert c.bbox == (xs.min(), ys.min(), xs.max(), ys.max())

    # Thresholds <= 0 disable a test; empty masks are still dropped; offset shifts indices.
    loose = sp.filter_candidates(logits, scores, iou_threshold=0.0, stability_threshold=0.0, index_offset=10)
    assert [c.index for c in loose] == [10, 11, 12]
    # Leading dims are flattened together with the scores (points x masks-per-point).
    nested = sp.filter_candidates(logits.reshape(2, 2, h, w), scores.reshape(2, 2))
    assert [c.index for c in nested] == [0]
    with pytest.raises(ValueError, match="iou scores"):
        sp.filter_candidates(logits, scores[:3])


def test_filter_candidates_matches_transformers(hf):
    import torch

    image_processor, _ = hf
    h, w = 48, 64
    rng = np.random.default_rng(4)
    logits = np.stack(
        [_disc_logits(h, w, rng.uniform(10, 38), rng.uniform(10, 54), rng.uniform(4, 12), rng.uniform(2, 80))
         for _ in range(8)]
    )
    scores = rng.uniform(0.8, 1.0, 8).astype(np.float32)
    # Plus one blurry disc with a confident score: only the stability test drops it.
    logits = np.concatenate([logits, _disc_logits(h, w, 24, 32, 8, sharpness=1.0)[None]])
    scores = np.append(scores, np.float32(0.99))
    _, ref_scores, ref_boxes = image_processor.filter_masks(
        torch.from_numpy(logits[None]), torch.from_numpy(scores[None]), (h, w), [0, 0, w, h]
    )
    cands = sp.filter_candidates(logits, scores)
    assert 0 < len(cands) < 8 and cands[-1].index != 8  # some kept, the blurry one dropped
    np.testing.assert_allclose([c.score for c in cands], ref_scores.numpy())
    np.testing.assert_array_equal([c.bbox for c in cands], ref_boxes.numpy())


def _square(h, w, y0, x0, size):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y0 + size, x0:x0 + size] = True
    return m


def test_mask_nms_removes_near_duplicate():
    a = _square(60, 60, 10, 10, 20)
    a_shifted = _square(60, 60, 11, 11, 20)  # box IoU 0.81
    b = _square(60, 60, 40, 40, 15)
    masks = [a, a_shifted, b]

    np.testing.assert_array_equal(sp.mask_nms(masks, [0.9, 0.8, 0.7]), [0, 2])
    np.testing.assert_array_equal(sp.mask_nms(masks, [0.8, 0.9, 0.95]), [2, 1])
    # Above the threshold's IoU both survive.
    np.testing.assert_array_equal(sp.mask_nms(masks, [0.9, 0.8, 0.7], iou_threshold=0.9), [0, 1, 2])
    assert sp.mask_nms([], []).shape == (0,)


def test_order_candidates_by_area():
    def cand(i, area, score=0.9):
        return sp.Candidate(i, np.zeros((2, 2), bool), score, 1.0, area, (0, 0, 0, 0))

    ordered = sp.order_candidates([cand(0, 5), cand(1, 50), cand(2, 20), cand(3, 20, score=0.95)])
    assert [c.index for c in ordered] == [1, 3, 2, 0]


def test_label_point_is_inside_a_ring():
    yy, xx = np.mgrid[:80, :80]
    r = np.hypot(yy - 40, xx - 40)
    ring = (r > 20) & (r < 30)  # centroid (40, 40) is outside the mask
    x, y = sp.label_point(ring)
    assert ring[y, x]
    big = np.zeros((600, 900), dtype=bool)
    big[100:500, 300:400] = True
    x, y = sp.label_point(big)
    assert big[y, x] and 200 < y < 400 and 320 < x < 380


def test_render_overlay():
    h, w = 120, 160
    image = _random_image(h, w, seed=9) // 2 + 64
    big = _square(h, w, 10, 10, 80)
    small = _square(h, w, 30, 30, 20)
    far = _square(h, w, 90, 120, 25)
    masks = [big, small, far]

    overlay = sp.render_overlay(image, masks)
    assert isinstance(overlay, Image.Image)
    assert overlay.size == (w, h) and overlay.mode == "RGB"
    out = np.asarray(overlay)
    union = big | small | far
    assert (out != image).any(axis=2)[union].mean() > 0.9
    np.testing.assert_array_equal(out[~union], image[~union])  # labels sit inside masks here

    plain = np.asarray(sp.render_overlay(image, masks, labels=False))
    assert (plain != out).any()  # the numbers were drawn
    np.testing.assert_array_equal(plain[~union], image[~union])
    # Distinct colours: the interiors of different masks are tinted differently.
    assert not np.array_equal(plain[60, 70], plain[100, 135])

    with pytest.raises(ValueError, match="mask 1"):
        sp.render_overlay(image, [np.zeros((10, 10), bool)])


# ---------------------------------------------------------------------------
# loading and bad inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_load_rgb_converts_to_rgb(tmp_path, mode):
    rgb = _random_image(30, 40, seed=1)
    pil = Image.fromarray(rgb).convert(mode)
    path = tmp_path / f"x_{mode}.png"
    pil.save(path)
    loaded = sp.load_rgb(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (30, 40, 3)
    np.testing.assert_array_equal(loaded, np.asarray(Image.open(path).convert("RGB")))
    if mode == "RGBA":
        np.testing.assert_array_equal(loaded, rgb)  # alpha dropped, colours untouched
    if mode == "L":
        assert (loaded[..., 0] == loaded[..., 1]).all() and (loaded[..., 1] == loaded[..., 2]).all()


def test_load_rgb_accepts_arrays_and_pil():
    rgb = _random_image(8, 9)
    np.testing.assert_array_equal(sp.load_rgb(rgb), rgb)
    np.testing.assert_array_equal(sp.load_rgb(Image.fromarray(rgb)), rgb)
    gray = rgb[..., 0]
    assert sp.load_rgb(gray).shape == (8, 9, 3)
    rgba = np.concatenate([rgb, np.zeros((8, 9, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(sp.load_rgb(rgba), rgb)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries no pixel data (a few bytes)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _bad_input(kind, tmp_path):
    """Build one bad input lazily; returns (callable, message regex)."""
    size = (480, 640)
    if kind == "text file":
        path = tmp_path / "notes.png"
        path.write_text("this is not an image\n")
        return lambda: sp.load_rgb(path), r"not an image file: .*notes\.png"
    if kind == "truncated file":
        path = tmp_path / "cut.png"
        Image.fromarray(_random_image(64, 64)).save(path)
        path.write_bytes(path.read_bytes()[:400])
        return lambda: sp.load_rgb(path), r"cannot decode image file .*cut\.png"
    if kind == "1x1 file":
        path = tmp_path / "dot.png"
        Image.new("RGB", (1, 1)).save(path)
        return lambda: sp.load_rgb(path), r"1x1 px .*minimum is 2x2"
    if kind == "1x1 array":
        return lambda: sp.preprocess(np.zeros((1, 1, 3), np.uint8)), r"1x1 px .*minimum is 2x2"
    if kind == "huge array":
        # 2 rows only: a few tens of KB, but wider than the limit.
        arr = np.zeros((2, sp.MAX_IMAGE_SIDE + 1, 3), np.uint8)
        return lambda: sp.preprocess(arr), rf"{sp.MAX_IMAGE_SIDE + 1}x2 px .*limit is {sp.MAX_IMAGE_SIDE}"
    if kind == "huge file":
        # Header only, no pixel data: passes only if the size is refused before decoding.
        path = tmp_path / "tall.png"
        path.write_bytes(_png_header(3, sp.MAX_IMAGE_SIDE + 1))
        return lambda: sp.load_rgb(path), rf"3x{sp.MAX_IMAGE_SIDE + 1} px .*limit is {sp.MAX_IMAGE_SIDE}"
    if kind == "decompression bomb":
        path = tmp_path / "bomb.png"
        path.write_bytes(_png_header(20000, 20000))  # Pillow itself refuses this one
        return lambda: sp.load_rgb(path), rf"400000000 pixels.*limit is {sp.MAX_IMAGE_SIDE} px per side"
    if kind == "point outside":
        return (lambda: sp.transform_points([[10, 10], [641, 5]], size, (768, 1024)),
                r"point \(641, 5\) is outside the image, which is 640x480")
    if kind == "negative point":
        return lambda: sp.transform_points([[-1, 5]], size, (768, 1024)), r"point \(-1, 5\) is outside"
    if kind == "box x1<x0":
        return lambda: sp.transform_boxes([[100, 10, 50, 20]], size, (768, 1024)), r"x0 <= x1 and y0 <= y1"
    if kind == "box y1<y0":
        return lambda: sp.transform_boxes([[10, 30, 50, 20]], size, (768, 1024)), r"x0 <= x1 and y0 <= y1"
    if kind == "box outside":
        return (lambda: sp.transform_boxes([[10, 10, 50, 500]], size, (768, 1024)),
                r"box corner \(50, 500\) is outside the image, which is 640x480")
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["text file", "truncated file", "1x1 file", "1x1 array", "huge array", "huge file", "decompression bomb",
     "point outside", "negative point", "box x1<x0", "box y1<y0", "box outside"],
)
def test_bad_inputs_raise_value_error(tmp_path, kind):
    call, message = _bad_input(kind, tmp_path)
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_import_does_not_pull_in_torch():
    code = (
        "import sys, onnxforge.runtime.sam_processing\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_masks_to_boxes_matches_mask_to_box():
    rng = np.random.default_rng(0)
    masks = rng.random((12, 23, 31)) < 0.02  # sparse: boxes of every shape, some masks empty
    masks[3] = False
    masks[4, 22, 30] = True
    boxes = sp.masks_to_boxes(masks)
    assert boxes.shape == (12, 4) and tuple(boxes[3]) == (0, 0, 0, 0)
    assert [tuple(b) for b in boxes] == [sp.mask_to_box(m) for m in masks]
    assert sp.masks_to_boxes(np.zeros((0, 5, 5), bool)).shape == (0, 4)


def test_box_nms_is_mask_nms_on_the_masks_boxes():
    a, a_shifted, b = _square(60, 60, 10, 10, 20), _square(60, 60, 11, 11, 20), _square(60, 60, 40, 40, 15)
    boxes = sp.masks_to_boxes(np.stack([a, a_shifted, b]))
    for scores in ([0.9, 0.8, 0.7], [0.8, 0.9, 0.95], [0.5, 0.5, 0.5]):
        np.testing.assert_array_equal(sp.box_nms(boxes, scores), sp.mask_nms([a, a_shifted, b], scores))
    with pytest.raises(ValueError, match=r"3 boxes but 2 scores"):
        sp.box_nms(boxes, [0.1, 0.2])
