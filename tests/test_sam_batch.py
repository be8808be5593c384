"""Batched prompts and "segment everything" filtering on the tiny SAM (and the torch-free helpers).

- predict_batch == predict one prompt at a time; segment_everything in batches == one prompt per call.
- The filters against transformers' mask-generation post-processing on the same masks.
- remove_small_regions (SAM's AMG clean-up) against a plain flood-fill reference.
- Bad input: one line each.
"""

from __future__ import annotations

import json
import re
from collections import deque

import numpy as np
import pytest
import torch

from onnxforge.runtime import artifact as art
from onnxforge.runtime import sam_processing as sp
from onnxforge.runtime.sam import SamPredictor, mask_iou

W, H = 173, 97
SCORE_ATOL = 1e-5  # the same graph, batched or not: float noise of a different batch shape only


def _picture(w=W, h=H, seed=1):
    from onnxforge.families.sam.build import validation_image

    return validation_image(w, h, seed)


@pytest.fixture(scope="module")
def predictor(sam_tiny):
    p = SamPredictor(art.load(sam_tiny.variant("fp32", "sam-tiny")))
    p.set_image(_picture())
    return p


PROMPTS = [
    {"points": [(50, 40)], "labels": [1]},
    {"box": (95, 20, 160, 70)},
    {"points": [(120, 45)], "labels": [1]},
    {"points": [(50, 40), (130, 45)], "labels": [1, 0]},
    {"box": (10, 10, 80, 90)},
    {"points": [(120, 45)], "labels": [1], "box": (90, 15, 165, 75)},
    {"points": [(20, 80)]},
]


@pytest.mark.parametrize("multimask", [True, False])
def test_predict_batch_equals_one_by_one(predictor, multimask):
    runs = predictor.decoder_runs
    batched = predictor.predict_batch(PROMPTS, multimask=multimask)
    # Token counts here: 2 (point + pad), 2 (box), 3 (two points + pad), 3 (point + box): two calls.
    assert predictor.decoder_runs - runs == 2
    for pr, (masks, scores) in zip(PROMPTS, batched):
        ref_masks, ref_scores = predictor.predict(**pr, multimask=multimask)
        assert masks.shape == ref_masks.shape == ((3 if multimask else 1), H, W)
        assert all(mask_iou(a, b) == 1.0 for a, b in zip(masks, ref_masks))
        np.testing.assert_allclose(scores, ref_scores, atol=SCORE_ATOL)


def test_segment_everything_batched_equals_one_prompt_per_call(predictor):
    kwargs = dict(points_per_side=5, pred_iou_threshold=0.0, stability_threshold=0.0, nms_threshold=0.99)
    runs = predictor.decoder_runs
    one = predictor.segment_everything(points_per_batch=1, **kwargs)
    assert predictor.decoder_runs - runs == 25
    batched = predictor.segment_everything(points_per_batch=64, **kwargs)
    assert predictor.decoder_runs - runs == 26  # the whole grid in one call
    assert len(one) == len(batched) >= 2
    for a, b in zip(one, batched):
        assert a.index == b.index and mask_iou(a.mask, b.mask) == 1.0 and abs(a.score - b.score) <= SCORE_ATOL


def test_min_region_area_cleans_candidates(predictor):
    """Each kept candidate is a plain candidate with SAM's hole filling then island removal applied."""
    kwargs = dict(points_per_side=4, pred_iou_threshold=0.0, stability_threshold=0.0, nms_threshold=0.99)
    plain = {c.index: c for c in predictor.segment_everything(**kwargs)}
    cleaned = predictor.segment_everything(min_region_area=200, **kwargs)
    assert cleaned
    for c in cleaned:
        expected, _ = sp.remove_small_regions(sp.remove_small_regions(plain[c.index].mask, 200, "holes")[0], 200,
                                              "islands")
        np.testing.assert_array_equal(c.mask, expected)
        assert c.area == int(c.mask.sum()) and c.bbox == sp.mask_to_box(c.mask)
        assert (sp.connected_components(~c.mask)[1][1:] >= 200).all()  # no small hole left


# ---- low-resolution filtering (the default) against the exact path -------------------------------------

# |low-res - picture-size stability|: measured max 0.35 on the tiny model, whose picture shows in 32 x 18
# low-res logits (at 1024 px input the logits are 256 x 256, so the gap should be far smaller: unmeasured).
STABILITY_TOL = 0.4


def _grid_logits(predictor, n=6):
    """Every multimask output of an n x n grid: scores, low-res logits, picture-size logits."""
    st = predictor._current()
    coords = sp.transform_points(sp.point_grid(n) * (W, H), st.original_size, st.reshaped_size)
    (_, scores, low), = predictor._grid_proposals(coords, 64, 0.0)
    return scores, low, predictor._upscale(low[None], binarize=False)[0]


def test_low_res_filtering_equals_exact_without_stability_and_nms(predictor):
    """With only the IoU test (on scores, before any resize), both paths resize the same masks."""
    scores, _, _ = _grid_logits(predictor)
    kwargs = dict(points_per_side=6, pred_iou_threshold=float(np.median(scores)), stability_threshold=0.0,
                  nms_threshold=1.0)
    fast, exact = (predictor.segment_everything(exact=e, **kwargs) for e in (False, True))
    assert len(fast) == len(exact) >= 2
    for a, b in zip(fast, exact):
        assert (a.index, a.score, a.area, a.bbox) == (b.index, b.score, b.area, b.bbox)
        np.testing.assert_array_equal(a.mask, b.mask)


def test_low_res_stability_within_the_stated_tolerance(predictor):
    """Stability on the low-res logits is within STABILITY_TOL of the picture-size one, so the two paths keep
    the same masks except those whose stability lies within STABILITY_TOL of the threshold."""
    scores, low, full = _grid_logits(predictor)
    s_low = sp.stability_score(predictor._low_res_view(low))
    s_full = sp.stability_score(full)
    assert np.abs(s_low - s_full).max() <= STABILITY_TOL
    threshold = float(np.median(s_full))
    kwargs = dict(points_per_side=6, pred_iou_threshold=0.0, stability_threshold=threshold, nms_threshold=1.0)
    fast, exact = ({c.index: c for c in predictor.segment_everything(exact=e, **kwargs)} for e in (False, True))
    near = set(np.flatnonzero(np.abs(s_full - threshold) <= STABILITY_TOL).tolist())
    assert set(fast) ^ set(exact) <= near and len(set(fast) & set(exact)) >= 2
    for i in set(fast) & set(exact):
        np.testing.assert_array_equal(fast[i].mask, exact[i].mask)


def test_low_res_boxes_near_the_picture_size_boxes(predictor):
    """The NMS boxes of the low-res path contain the picture-size masks' boxes up to one low-res pixel, and most
    agree with them within one low-res pixel (a weakly positive low-res pixel can vanish in the resize)."""
    _, low, full = _grid_logits(predictor)
    assert_low_res_boxes_near(predictor, low, full > 0.0)


def assert_low_res_boxes_near(predictor, low, masks, min_agreeing=0.9):
    """Shared with test_sam2.py. Measured on the tiny models: containment slack within one low-res pixel,
    91-100 % of the boxes within one low-res pixel in every coordinate."""
    _, _, fy, fx = predictor._low_res_geometry(low.shape[-1])
    present = masks.any(axis=(1, 2))
    assert present.sum() >= 2
    low_box, box = predictor._low_res_boxes(low)[present], sp.masks_to_boxes(masks[present])
    slack = np.concatenate([box[:, :2] - low_box[:, :2], low_box[:, 2:] - box[:, 2:]], axis=1)  # >= 0: contained
    assert (slack[:, [0, 2]] >= -np.ceil(fx)).all() and (slack[:, [1, 3]] >= -np.ceil(fy)).all()
    diff = np.abs(low_box - box)
    agreeing = ((diff[:, [0, 2]] <= np.ceil(fx)) & (diff[:, [1, 3]] <= np.ceil(fy))).all(axis=1)
    assert agreeing.mean() >= min_agreeing


# ---- the filters against transformers ---------------------------------------------------------------


def _torch_batched_nms(boxes, scores, idxs, iou_threshold):
    """Greedy NMS with torchvision.ops.batched_nms' contract (one class here). torchvision's wheels on this
    package index are CUDA-linked and do not load with the CPU torch, so transformers' mask-generation
    post-processing gets this stand-in; everything else in that pipeline is transformers' own code."""
    order = torch.argsort(scores, descending=True, stable=True)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep, dead = [], torch.zeros(len(order), dtype=torch.bool)
    for rank, i in enumerate(order.tolist()):
        if dead[rank]:
            continue
        keep.append(i)
        rest = order[rank + 1:]
        lt = torch.maximum(boxes[i, :2], boxes[rest, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        dead[rank + 1:] |= inter / (area[i] + area[rest] - inter) > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def test_filter_and_nms_match_transformers_mask_generation(predictor, monkeypatch):
    """Our filter_candidates + mask_nms vs SamImageProcessor.filter_masks + post_process_for_mask_generation
    on the same full-size logits from the tiny model's grid."""
    from transformers import SamImageProcessor
    from transformers.models.sam import image_processing_sam as ips

    monkeypatch.setattr(ips, "batched_nms", _torch_batched_nms, raising=False)
    grid = sp.point_grid(6) * (W, H)
    coords = sp.transform_points(grid, (H, W), sp.resized_shape((H, W), predictor.image_size))
    pc = np.stack([coords, np.zeros_like(coords)], axis=1)
    pl = np.tile([1, -1], (len(coords), 1))
    iou, low = predictor.decode(pc, pl)
    iou, low = iou[:, 1:], low[:, 1:]
    logits = predictor._upscale(low, binarize=False)  # (36, 3, H, W)
    scores = iou.reshape(-1)
    # Thresholds that bite on random weights (their masks are near image-wide, so only a loose NMS keeps several).
    iou_t, stab_t, nms_t = float(np.median(scores)), 0.01, 0.98
    proc = SamImageProcessor()
    ref_masks, ref_scores, ref_boxes = proc.filter_masks(torch.from_numpy(logits), torch.from_numpy(iou),
                                                          (H, W), [0, 0, W, H], pred_iou_thresh=iou_t,
                                                          stability_score_thresh=stab_t)
    # filter_masks hands back run-length-encoded masks, the input of the mask-generation post-processing.
    ref_out, ref_kept_scores, _, ref_kept_boxes = proc.post_process_for_mask_generation(
        ref_masks, ref_scores, ref_boxes, nms_t)
    cands = sp.filter_candidates(logits, scores, iou_threshold=iou_t, stability_threshold=stab_t)
    keep = sp.mask_nms([c.mask for c in cands], [c.score for c in cands], nms_t)
    ours = [cands[i] for i in keep]
    assert 1 < len(ours) < len(cands) < scores.size  # every filter removed something
    assert len(ours) == len(ref_out)
    np.testing.assert_allclose([c.score for c in ours], ref_kept_scores.numpy(), atol=1e-7)
    np.testing.assert_array_equal([c.bbox for c in ours], ref_kept_boxes.numpy())
    for c, m in zip(ours, ref_out):
        np.testing.assert_array_equal(c.mask, m)


# ---- small-region clean-up ----------------------------------------------------------------------------


def _flood_components(mask):
    """Reference 8-connected labelling by breadth-first flood fill: the component sizes, sorted."""
    seen = np.zeros_like(mask, dtype=bool)
    sizes = []
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x], q, n = True, deque([(y, x)]), 0
        while q:
            cy, cx = q.popleft()
            n += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        q.append((ny, nx))
        sizes.append(n)
    return sorted(sizes)


@pytest.mark.parametrize("seed", range(4))
def test_connected_components_match_flood_fill(seed):
    mask = np.random.default_rng(seed).random((37, 53)) < 0.45
    labels, areas = sp.connected_components(mask)
    assert sorted(areas[1:].tolist()) == _flood_components(mask)
    assert areas[0] == (~mask).sum() and ((labels > 0) == mask).all()


def test_remove_small_regions_holes_and_islands():
    m = np.zeros((40, 40), bool)
    m[5:30, 5:30] = True
    m[10:12, 10:12] = False  # a 4 px hole
    m[20:26, 20:26] = False  # a 36 px hole
    m[35, 35] = True  # a 1 px island
    m[34:37, 2:5] = True  # a 9 px island
    filled, changed = sp.remove_small_regions(m, 10, "holes")
    assert changed and filled[10:12, 10:12].all() and not filled[20:26, 20:26].any()
    cleaned, changed = sp.remove_small_regions(filled, 10, "islands")
    assert changed and not cleaned[35, 35] and not cleaned[34:37, 2:5].any() and cleaned[5:10, 5:30].all()
    assert sp.remove_small_regions(cleaned, 10, "islands")[1] is False  # nothing left to change
    # Every island small: the largest is kept (SAM's rule), not an empty mask.
    tiny = np.zeros((10, 10), bool)
    tiny[1, 1] = True
    tiny[5:7, 5:7] = True
    kept, _ = sp.remove_small_regions(tiny, 100, "islands")
    assert kept.sum() == 4 and kept[5:7, 5:7].all()
    with pytest.raises(ValueError, match="mode must be 'holes' or 'islands'"):
        sp.remove_small_regions(tiny, 5, "blobs")


# ---- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompts, match", [
    ([], r"the prompt batch is empty"),
    ([{"points": [(10, 10)], "labels": [1, 0]}], r"prompt 1: 1 points but 2 labels"),
    ([{"points": [(10, 10)]}, {"points": [(10, 10)], "labels": [2]}],
     r"prompt 2: point labels must be 1 \(object\) or 0 \(not the object\), got \[2\]"),
    ([{"points": [(10, 10)], "labels": [3]}], r"got \[3\]"),  # box-corner codes are not user labels
    ([{"point": (10, 10)}], r"prompt 1: expected a dict with points, labels and/or box"),
    ([{}], r"prompt 1: give at least one point or a box"),
])
def test_bad_prompt_batches(predictor, prompts, match):
    with pytest.raises(ValueError, match=match) as info:
        predictor.predict_batch(prompts)
    assert "\n" not in str(info.value)


def test_empty_decoder_batch(predictor):
    with pytest.raises(ValueError, match=r"the prompt batch is empty or malformed"):
        predictor.decode(np.zeros((0, 2, 2), np.float32), np.zeros((0, 2), np.int64))


@pytest.mark.parametrize("n, match", [(0, r"points per side must be 1 to 64 \(got 0\)"),
                                      (65, r"points per side must be 1 to 64 \(got 65\)")])
def test_bad_grid(predictor, n, match):
    with pytest.raises(ValueError, match=match):
        predictor.segment_everything(points_per_side=n)


def test_bad_batch_size_and_region_area(predictor):
    with pytest.raises(ValueError, match=r"points per batch must be >= 1 \(got 0\)"):
        predictor.segment_everything(points_per_batch=0)
    with pytest.raises(ValueError, match=r"min_region_area must be >= 0"):
        predictor.segment_everything(min_region_area=-1)


def test_picture_too_small_or_over_the_pixel_limit(sam_tiny):
    p = SamPredictor(art.load(sam_tiny.variant("fp32", "sam-tiny")), max_pixels=100 * 100)
    with pytest.raises(ValueError, match=r"the picture is 7x20 px; prompting needs at least 8 px a side"):
        p.set_image(np.zeros((20, 7, 3), np.uint8))
    with pytest.raises(ValueError, match=r"the picture is 101x100 px = 10100 pixels; the limit is 10000 pixels"):
        p.set_image(np.zeros((100, 101, 3), np.uint8))
    p.set_image(np.zeros((100, 100, 3), np.uint8))  # at the limit: fine


@pytest.mark.parametrize("args, match", [
    (["--points-per-side", "0"], r"points per side must be 1 to 64 \(got 0\)"),
    (["--points-per-side", "65"], r"points per side must be 1 to 64 \(got 65\)"),
    (["--points-per-batch", "0"], r"points per batch must be >= 1 \(got 0\)"),
])
def test_cli_bad_grid_is_one_line(sam_tiny, tmp_path, args, match):
    from PIL import Image

    from conftest import run_cli

    picture = tmp_path / "p.png"
    Image.fromarray(_picture()).save(picture)
    proc = run_cli("segment", str(picture), "--artifact", str(sam_tiny.variant("fp32", "sam-tiny")), "--everything",
                   *args, "--out", str(tmp_path / "m.png"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and re.search(match, lines[0]), proc.stderr


def test_cli_points_per_batch_gives_the_same_candidates(sam_tiny, tmp_path):
    from PIL import Image

    from conftest import run_cli

    picture = tmp_path / "p.png"
    Image.fromarray(_picture()).save(picture)
    out = []
    for batch in ("1", "64"):
        proc = run_cli("segment", str(picture), "--artifact", str(sam_tiny.variant("fp32", "sam-tiny")), "--everything",
                       "--points-per-side", "3", "--points-per-batch", batch, "--json", "--out", str(tmp_path / f"{batch}.png"))
        assert proc.returncode == 0, proc.stderr
        out.append(json.loads(proc.stdout)["candidates"])
    assert out[0] == out[1] and out[0]
