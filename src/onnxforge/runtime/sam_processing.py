"""Torch-free pre- and post-processing for Segment Anything (SAM).

Mirrors transformers' ``SamImageProcessor`` / ``SamProcessor`` (4.57.x) with
numpy and Pillow only, so the onnxruntime side never needs torch:

* ``load_rgb`` / ``preprocess``: image -> normalized, padded ``1x3xSxS`` input.
* ``transform_points`` / ``transform_boxes``: prompt coordinates in original
  image pixels -> coordinates in the resized (``reshaped_size``) frame.
* ``postprocess_masks``: low-res decoder logits -> masks at the original size,
  with a numpy bilinear resize that follows torch's
  ``F.interpolate(mode="bilinear", align_corners=False)``.
* "Segment everything": ``point_grid``, ``stability_score``,
  ``filter_candidates``, ``mask_nms``, ``order_candidates``, ``render_overlay``.

Only numpy, Pillow and the standard library are imported here.
"""

from __future__ import annotations

import colorsys
import math
import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

# SAM's image processor defaults (transformers' IMAGENET_DEFAULT_MEAN/STD).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Below 2 px a side the bilinear resize and the mask maths degenerate;
# above 8192 px one RGB image and its full-size masks get needlessly huge
# (an 8192x8192 float32 mask alone is 256 MiB).
MIN_IMAGE_SIDE = 2
MAX_IMAGE_SIDE = 8192

# How far below the image's smaller side the overlay font is drawn.
_FONT_FRACTION = 40
_MIN_FONT_PX = 12


# ---------------------------------------------------------------------------
# Loading and preprocessing
# ---------------------------------------------------------------------------


def _check_image_size(width: int, height: int, what: str = "image") -> None:
    """Reject images SAM cannot sensibly process, naming the size and the limit."""
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        raise ValueError(
            f"{what} is {width}x{height} px (WxH); the minimum is "
            f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} px"
        )
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise ValueError(
            f"{what} is {width}x{height} px (WxH); the limit is "
            f"{MAX_IMAGE_SIDE} px per side (MAX_IMAGE_SIDE)"
        )


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """Accept HxW (gray), HxWx1, HxWx3 or HxWx4 uint8 arrays and return HxWx3."""
    if array.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    _check_image_size(array.shape[1], array.shape[0])
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        # Same as PIL's RGBA -> RGB: the alpha channel is dropped, not composited.
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


def load_rgb(path_or_image) -> np.ndarray:
    """Load an image as a uint8 HxWx3 RGB array.

    Accepts a file path, a ``PIL.Image.Image`` or a uint8 numpy array.
    Grayscale, RGBA (alpha dropped, as transformers' ``convert_to_rgb`` does),
    palette and other modes are converted with Pillow's ``convert("RGB")``.
    EXIF orientation is not applied, matching transformers.
    """
    if isinstance(path_or_image, np.ndarray):
        return _array_to_rgb(path_or_image)

    if isinstance(path_or_image, Image.Image):
        image = path_or_image
        _check_image_size(*image.size)
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8).copy()

    if not isinstance(path_or_image, (str, os.PathLike)):
        raise TypeError(f"expected a path, PIL image or numpy array, got {type(path_or_image).__name__}")

    path = os.fspath(path_or_image)
    try:
        # Pillow warns (and above 2x its limit refuses) on decompression bombs;
        # our own side limit below gives a clearer message, so silence the warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                # The header gives the size, so huge images are refused before decoding.
                _check_image_size(*image.size, what=f"image {path!r}")
                image.load()
                rgb = image if image.mode == "RGB" else image.convert("RGB")
                return np.asarray(rgb, dtype=np.uint8).copy()
    except Image.DecompressionBombError as err:
        # Pillow refuses before we see the size; its message gives the pixel count.
        raise ValueError(
            f"image {path!r} is too large: {str(err).split(',')[0]}; "
            f"the limit is {MAX_IMAGE_SIDE} px per side"
        ) from err
    except UnidentifiedImageError as err:
        raise ValueError(f"not an image file: {path!r}") from err
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except OSError as err:
        # Truncated or corrupt files open fine but fail to decode.
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"cannot decode image file {path!r}: {first_line}") from err


def resized_shape(original_size: tuple[int, int], longest_edge: int = 1024) -> tuple[int, int]:
    """(h, w) after scaling the longest side to ``longest_edge``.

    Same arithmetic as ``SamImageProcessor._get_preprocess_shape``: float scale,
    then round half up with ``int(x + 0.5)``.
    """
    old_h, old_w = original_size
    scale = longest_edge * 1.0 / max(old_h, old_w)
    return int(old_h * scale + 0.5), int(old_w * scale + 0.5)


def preprocess(
    image_rgb,
    target_size: int = 1024,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Turn an RGB image into SAM's ``pixel_values``.

    Returns ``(pixel_values float32 1x3xSxS, original_size (h, w), reshaped_size (h, w))``
    where S is ``target_size``. ``image_rgb`` is a uint8 HxWx3 array (or anything
    ``load_rgb`` accepts).
    """
    image = load_rgb(image_rgb)
    original_size = (int(image.shape[0]), int(image.shape[1]))
    new_h, new_w = resized_shape(original_size, target_size)

    # transformers resizes through PIL with BILINEAR and no reducing_gap; doing the
    # same call on the same uint8 data gives the same pixels.
    resized = Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    resized = np.asarray(resized)

    # Rescale in float64 then downcast, and normalize in float32, as transformers'
    # rescale()/normalize() do, so results agree to the last bit.
    pixels = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)
    std32 = np.asarray(std, dtype=np.float32)
    if mean32.shape != (3,) or std32.shape != (3,):
        raise ValueError(f"mean and std need 3 values each, got {len(mean32)} and {len(std32)}")
    pixels = (pixels - mean32) / std32

    # Zero-pad bottom/right (after normalization, so the padding is exactly 0).
    padded = np.zeros((target_size, target_size, 3), dtype=np.float32)
    padded[:new_h, :new_w] = pixels
    pixel_values = np.ascontiguousarray(padded.transpose(2, 0, 1)[None])
    return pixel_values, original_size, (new_h, new_w)


def preprocess_square(
    image_rgb,
    target_size: int = 1024,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """SAM 2's ``pixel_values``: the whole picture stretched to S x S (no padding), normalized.

    As transformers' ``Sam2ImageProcessorFast`` (size {height: S, width: S}, bilinear), with Pillow's
    bilinear resize instead of torchvision's antialiased one (a ~1/255 difference on some pixels).
    Returns ``(pixel_values 1x3xSxS, original_size (h, w), reshaped_size (S, S))``; prompt
    coordinates then scale by S/w and S/h, as ``Sam2Processor._normalize_coordinates`` does.
    """
    image = load_rgb(image_rgb)
    original_size = (int(image.shape[0]), int(image.shape[1]))
    resized = np.asarray(Image.fromarray(image).resize((target_size, target_size), resample=Image.Resampling.BILINEAR))
    pixels = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    if mean32.shape != (3,) or std32.shape != (3,):
        raise ValueError(f"mean and std need 3 values each, got {len(mean32)} and {len(std32)}")
    pixel_values = np.ascontiguousarray(((pixels - mean32) / std32).transpose(2, 0, 1)[None])
    return pixel_values, original_size, (target_size, target_size)


# ---------------------------------------------------------------------------
# Prompt coordinates
# ---------------------------------------------------------------------------


def _scale_xy(coords: np.ndarray, original_size, reshaped_size) -> np.ndarray:
    """Scale x by new_w/old_w and y by new_h/old_h (SamProcessor._normalize_coordinates)."""
    old_h, old_w = original_size
    new_h, new_w = reshaped_size
    out = coords.astype(np.float64).copy()
    out[..., 0] = out[..., 0] * (new_w / old_w)
    out[..., 1] = out[..., 1] * (new_h / old_h)
    return out


def _check_inside(xy: np.ndarray, original_size, what: str) -> None:
    """Raise if any x is outside [0, w] or any y outside [0, h] (or is not finite)."""
    h, w = original_size
    for x, y in xy.reshape(-1, 2):
        if not (np.isfinite(x) and np.isfinite(y) and 0 <= x <= w and 0 <= y <= h):
            raise ValueError(
                f"{what} ({x:g}, {y:g}) is outside the image, which is {w}x{h} px (WxH); "
                f"x must be in [0, {w}] and y in [0, {h}]"
            )


def transform_points(points_xy, original_size, reshaped_size) -> np.ndarray:
    """Map (..., 2) points in original pixels (x, y) to the resized frame.

    Returns float32, ready for the prompt encoder.
    """
    points = np.asarray(points_xy, dtype=np.float64)
    if points.ndim == 0 or points.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 2), got {points.shape}")
    _check_inside(points, original_size, "point")
    return _scale_xy(points, original_size, reshaped_size).astype(np.float32)


def transform_boxes(boxes_xyxy, original_size, reshaped_size) -> np.ndarray:
    """Map (..., 4) boxes (x0, y0, x1, y1) in original pixels to the resized frame.

    Returns float32, ready for the prompt encoder.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64)
    if boxes.ndim == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (..., 4), got {boxes.shape}")
    for x0, y0, x1, y1 in boxes.reshape(-1, 4):
        if x1 < x0 or y1 < y0:
            raise ValueError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) needs x0 <= x1 and y0 <= y1")
    corners = boxes.reshape(*boxes.shape[:-1], 2, 2)
    _check_inside(corners, original_size, "box corner")
    return _scale_xy(corners, original_size, reshaped_size).reshape(boxes.shape).astype(np.float32)


# ---------------------------------------------------------------------------
# Mask postprocessing
# ---------------------------------------------------------------------------


def _linear_taps(in_size: int, out_size: int):
    """Source indices and weights of torch's bilinear, align_corners=False, for one axis.

    As torch's CPU kernel: scale = in/out in float32, src = scale * (dst + 0.5) - 0.5
    clamped at 0, i0 = floor(src), lambda1 = src - i0. torch evaluates src with a
    fused multiply-add (one rounding); the float64 product rounded once to float32
    reproduces that, which matters: a plain float32 src is off by an ulp (3e-5 near
    512) often enough to move outputs by ~1e-4.
    """
    if in_size == out_size:
        # torch copies in this case; weights (1, 0) reproduce that exactly.
        idx = np.arange(out_size)
        return idx, idx, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    lam0 = (np.float32(1.0) - lam1).astype(np.float32)
    return i0, i1, lam0, lam1


def _lerp(a: np.ndarray, wa: np.ndarray, b: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """a*wa + b*wb rounded like torch's fused multiply-add: fma(a, wa, b*wb).

    float32*float32 is exact in float64, so one final rounding reproduces the FMA.
    """
    return (a.astype(np.float64) * wa + (b * wb).astype(np.float64)).astype(np.float32)


def resize_bilinear(x: np.ndarray, out_h: int, out_w: int, keep_h: int | None = None,
                    keep_w: int | None = None) -> np.ndarray:
    """Bilinear resize of the last two axes, matching F.interpolate(align_corners=False).

    ``keep_h``/``keep_w`` return only the top-left part of the output (what the
    crop after SAM's upscale keeps) without computing the rest; each output
    pixel depends only on its own taps, so the values are unchanged.
    """
    x = np.asarray(x, dtype=np.float32)
    in_h, in_w = x.shape[-2:]
    r0, r1, rw0, rw1 = (a[:keep_h] for a in _linear_taps(in_h, out_h))
    c0, c1, cw0, cw1 = (a[:keep_w] for a in _linear_taps(in_w, out_w))
    lead = x.shape[:-2]
    flat = x.reshape(-1, in_h, in_w)
    out = np.empty((flat.shape[0], len(r0), len(c0)), dtype=np.float32)
    # One plane at a time keeps the float64 temporaries to a few planes' worth.
    for k, plane in enumerate(flat):
        # Along width first, then height: torch's order, h0 * row0 + h1 * row1 with
        # row = w0 * x[c0] + w1 * x[c1].
        rows = _lerp(plane[:, c0], cw0, plane[:, c1], cw1)
        out[k] = _lerp(rows[r0], rw0[:, None], rows[r1], rw1[:, None])
    return out.reshape(*lead, len(r0), len(c0))


def postprocess_masks(
    low_res_masks,
    original_size,
    reshaped_size,
    pad_size: int = 1024,
    threshold: float = 0.0,
    binarize: bool = True,
) -> np.ndarray:
    """Decoder logits (N, C, h, w) -> masks (N, C, H, W) at the original image size.

    Same steps as ``SamImageProcessor.post_process_masks`` for one image:
    upscale to pad_size x pad_size, crop the padding away (keep reshaped_size),
    resize to original_size, then ``> threshold`` if ``binarize``.
    Returns bool masks, or float32 logits when ``binarize`` is False.
    """
    masks = np.asarray(low_res_masks, dtype=np.float32)
    if masks.ndim != 4:
        raise ValueError(f"low_res_masks must be (N, C, h, w), got shape {masks.shape}")
    new_h, new_w = (int(v) for v in reshaped_size)
    orig_h, orig_w = (int(v) for v in original_size)
    if not (0 < new_h <= pad_size and 0 < new_w <= pad_size):
        raise ValueError(f"reshaped_size {reshaped_size} must fit inside pad_size {pad_size}")

    cropped = resize_bilinear(masks, pad_size, pad_size, keep_h=new_h, keep_w=new_w)
    full = resize_bilinear(cropped, orig_h, orig_w)
    return full > threshold if binarize else full


# ---------------------------------------------------------------------------
# Segment everything
# ---------------------------------------------------------------------------


@dataclass
class Candidate:
    """One mask proposal. ``index`` is its position in the model's flattened outputs
    (plus any ``index_offset``); ``bbox`` is (x0, y0, x1, y1) in inclusive pixels."""

    index: int
    mask: np.ndarray
    score: float
    stability: float
    area: int
    bbox: tuple[int, int, int, int]


def point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) points (x, y) in [0, 1] at the centres of an n x n grid of cells.

    Same as SAM's build_point_grid: x varies fastest. Multiply by (w, h) to
    get original-image pixels.
    """
    if int(n_per_side) < 1:
        raise ValueError(f"n_per_side must be >= 1, got {n_per_side}")
    n = int(n_per_side)
    offset = 1 / (2 * n)
    side = np.linspace(offset, 1 - offset, n)
    xs = np.tile(side[None, :], (n, 1))
    ys = np.tile(side[:, None], (1, n))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def stability_score(mask_logits, threshold: float = 0.0, offset: float = 1.0) -> np.ndarray:
    """IoU between the mask thresholded at threshold+offset and at threshold-offset.

    A stable mask barely changes when the cut-off moves, so the score is near 1.
    Works on (..., H, W) and returns float32 of shape (...). Where even the lower
    cut-off gives an empty mask the score is 0 (SAM would give NaN, 0/0).
    """
    logits = np.asarray(mask_logits)
    inter = (logits > (threshold + offset)).sum(axis=(-1, -2), dtype=np.int64)
    union = (logits > (threshold - offset)).sum(axis=(-1, -2), dtype=np.int64)
    score = np.divide(inter, union, out=np.zeros(inter.shape, dtype=np.float64), where=union > 0)
    return score.astype(np.float32)


def mask_to_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight (x0, y0, x1, y1) box in inclusive pixel indices; (0, 0, 0, 0) when empty.

    Same convention as transformers' ``_batched_mask_to_box``.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    return (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))


def filter_candidates(
    masks_logits,
    iou_scores,
    iou_threshold: float = 0.88,
    stability_threshold: float = 0.95,
    mask_threshold: float = 0.0,
    stability_offset: float = 1.0,
    index_offset: int = 0,
) -> list[Candidate]:
    """Keep proposals the model is confident in and whose masks are stable.

    ``masks_logits`` is (..., H, W) at the resolution the masks should have
    (normally ``postprocess_masks(..., binarize=False)``), ``iou_scores`` has
    the matching leading shape. Like SAM's AMG / transformers' ``filter_masks``
    (without crops): keep iou > iou_threshold and stability > stability_threshold
    (a threshold <= 0 disables that test), then binarize at mask_threshold.
    Empty masks are dropped. Candidates come back in input order.
    """
    logits = np.asarray(masks_logits, dtype=np.float32)
    scores = np.asarray(iou_scores, dtype=np.float32).reshape(-1)
    if logits.ndim < 2:
        raise ValueError(f"masks_logits must be (..., H, W), got shape {logits.shape}")
    logits = logits.reshape(-1, *logits.shape[-2:])
    if logits.shape[0] != scores.shape[0]:
        raise ValueError(f"{logits.shape[0]} masks but {scores.shape[0]} iou scores")

    stability = stability_score(logits, mask_threshold, stability_offset)
    keep = np.ones(scores.shape[0], dtype=bool)
    if iou_threshold > 0.0:
        keep &= scores > iou_threshold
    if stability_threshold > 0.0:
        keep &= stability > stability_threshold

    candidates = []
    for i in np.flatnonzero(keep):
        mask = logits[i] > mask_threshold
        area = int(mask.sum())
        if area == 0:
            continue
        candidates.append(
            Candidate(
                index=int(i) + index_offset,
                mask=mask,
                score=float(scores[i]),
                stability=float(stability[i]),
                area=area,
                bbox=mask_to_box(mask),
            )
        )
    return candidates


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box against many, with torchvision's area = (x1-x0)*(y1-y0)."""
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def masks_to_boxes(masks_bool) -> np.ndarray:
    """(N, H, W) bool masks -> (N, 4) int64 tight xyxy boxes in inclusive pixels, (0, 0, 0, 0) when empty.

    ``mask_to_box`` for a whole batch at once.
    """
    masks = np.asarray(masks_bool, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    h, w = masks.shape[1:]
    boxes = np.stack([cols.argmax(axis=1), rows.argmax(axis=1),
                      w - 1 - cols[:, ::-1].argmax(axis=1), h - 1 - rows[:, ::-1].argmax(axis=1)], axis=1)
    boxes[~rows.any(axis=1)] = 0
    return boxes.astype(np.int64)


def box_nms(boxes, scores, iou_threshold: float = 0.7) -> np.ndarray:
    """Greedy non-maximum suppression of xyxy boxes; returns kept indices, best score first.

    torchvision's ``nms`` contract: area (x1-x0)*(y1-y0), suppress when IoU > iou_threshold,
    ties in score keep input order.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if boxes.shape[0] != scores.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {scores.shape[0]} scores")
    order = np.argsort(-scores, kind="stable")  # ties keep input order
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for rank, i in enumerate(order):
        if suppressed[rank]:
            continue
        keep.append(int(i))
        rest = order[rank + 1:]
        suppressed[rank + 1:] |= _box_iou(boxes[i], boxes[rest]) > iou_threshold
    return np.asarray(keep, dtype=np.int64)


def mask_nms(masks_bool, scores, iou_threshold: float = 0.7) -> np.ndarray:
    """Greedy non-maximum suppression of masks by the IoU of their bounding boxes; kept indices, best first.

    As SAM's automatic mask generator (and transformers' ``post_process_for_mask_generation``) do with
    torchvision's ``batched_nms``: cheap, and it matches the reference. Boxes use inclusive pixel indices
    with area (x1-x0)*(y1-y0), as there; a box of zero area therefore never suppresses or is suppressed.
    """
    boxes = np.array([mask_to_box(np.asarray(m, dtype=bool)) for m in masks_bool], dtype=np.float64)
    return box_nms(boxes.reshape(-1, 4), scores, iou_threshold)


def _runs(mask: np.ndarray):
    """Horizontal runs of True pixels: (row, start, end) arrays, end exclusive, row-major order."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    return rows, starts, ends


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of a bool mask (as cv2.connectedComponentsWithStats(mask, 8)).

    Returns (labels HxW int32, 0 = background and 1..K the components, areas (K+1,) with the
    background's first). Run-length labelling: one union per pair of touching runs in adjacent
    rows, so the Python loop is over runs, not pixels.
    """
    mask = np.asarray(mask, dtype=bool)
    rows, starts, ends = _runs(mask)
    n = len(rows)
    parent = np.arange(n)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    for r in range(1, mask.shape[0]):
        a0, a1, b0, b1 = row_first[r - 1], row_first[r], row_first[r], row_first[r + 1]
        i, j = a0, b0
        while i < a1 and j < b1:
            # 8-connectivity: runs touch if they overlap once widened by one pixel.
            if starts[i] <= ends[j] and starts[j] <= ends[i]:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    _, component = np.unique(roots, return_inverse=True)  # numbered by first run: row-major, as cv2
    labels = np.zeros(mask.shape, dtype=np.int32)
    for k in range(n):
        labels[rows[k], starts[k]:ends[k]] = component[k] + 1
    areas = np.bincount(labels.reshape(-1), minlength=(component.max() + 2) if n else 1)
    return labels, areas


def remove_small_regions(mask: np.ndarray, area_threshold: float, mode: str) -> tuple[np.ndarray, bool]:
    """SAM's automatic mask generator clean-up: fill holes ("holes") or drop islands ("islands")
    smaller than area_threshold pixels. Returns (mask, changed).

    As segment_anything.utils.amg.remove_small_regions: holes are components of the inverted mask;
    when every island is small, the largest one is kept.
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    mask = np.asarray(mask, dtype=bool)
    correct_holes = mode == "holes"
    working = mask ^ correct_holes
    labels, areas = connected_components(working)
    sizes = areas[1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_threshold]
    if not small:
        return mask, False
    fill = [0] + small
    if not correct_holes:
        fill = [i for i in range(len(areas)) if i not in fill]
        if not fill:  # every island is small: keep the largest
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(labels, fill), True


def order_candidates(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Largest area first (ties: higher score first).

    Drawn in this order, small masks land on top of the big ones they sit in,
    and the 1-based position becomes the number a person refers to.
    """
    return sorted(candidates, key=lambda c: (-c.area, -c.score, c.index))


def _colour(i: int) -> tuple[int, int, int]:
    """Distinct colours: golden-ratio steps around the hue wheel, alternating brightness."""
    hue = (0.12 + i * 0.618033988749895) % 1.0
    value = 1.0 if i % 2 == 0 else 0.8
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
    return int(r * 255), int(g * 255), int(b * 255)


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion; the image border counts as background."""
    out = mask.copy()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0, :] = out[-1, :] = False
    out[:, 0] = out[:, -1] = False
    return out


def _nearest_pixel(mask: np.ndarray, y: float, x: float) -> tuple[int, int]:
    """The mask pixel closest to (y, x)."""
    ys, xs = np.nonzero(mask)
    k = int(np.argmin((ys - y) ** 2 + (xs - x) ** 2))
    return int(ys[k]), int(xs[k])


def label_point(mask: np.ndarray) -> tuple[int, int]:
    """An (x, y) well inside the mask for its label.

    The centroid can fall outside (rings, C-shapes), so erode the mask until
    only its thickest part is left and take the pixel of that part nearest its
    centroid. Works on a <=128 px copy so it stays cheap for big images.
    """
    mask = np.asarray(mask, dtype=bool)
    step = max(1, math.ceil(max(mask.shape) / 128))
    core = mask[step // 2::step, step // 2::step]
    if not core.any():
        # Too thin to survive subsampling: fall back to the full-res centroid.
        ys, xs = np.nonzero(mask)
        y, x = _nearest_pixel(mask, ys.mean(), xs.mean())
        return x, y
    while True:
        eroded = _erode(core)
        if not eroded.any():
            break
        core = eroded
    ys, xs = np.nonzero(core)
    cy, cx = _nearest_pixel(core, ys.mean(), xs.mean())
    y, x = cy * step + step // 2, cx * step + step // 2
    if not mask[y, x]:
        y, x = _nearest_pixel(mask, y, x)
    return x, y


def _label_font(width: int, height: int):
    """Pillow's default font, scaled to the image when FreeType is available."""
    size = max(_MIN_FONT_PX, min(width, height) // _FONT_FRACTION)
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError, ValueError):
        return ImageFont.load_default()  # bitmap font, fixed size


def render_overlay(image_rgb, masks_bool, labels: bool = True, alpha: float = 0.5) -> Image.Image:
    """Tint each mask with its own colour and number it (1-based) for people to refer to.

    Masks are drawn in the given order (use ``order_candidates`` so small masks
    end on top); each gets a ~50% tint and a solid outline in its colour, and its
    number on a dark box at an interior point.
    """
    image = load_rgb(image_rgb)
    h, w = image.shape[:2]
    out = image.astype(np.float32)
    masks = [np.asarray(m, dtype=bool) for m in masks_bool]
    for n, mask in enumerate(masks, start=1):
        if mask.shape != (h, w):
            raise ValueError(f"mask {n} is {mask.shape[1]}x{mask.shape[0]} (WxH), image is {w}x{h}")

    for i, mask in enumerate(masks):
        colour = np.asarray(_colour(i), dtype=np.float32)
        out[mask] = out[mask] * (1.0 - alpha) + colour * alpha
        out[mask & ~_erode(mask)] = colour  # outline separates neighbours of similar colour
    result = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))

    if labels:
        draw = ImageDraw.Draw(result)
        font = _label_font(w, h)
        for n, mask in enumerate(masks, start=1):
            if not mask.any():
                continue
            x, y = label_point(mask)
            text = str(n)
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            tw, th = right - left, bottom - top
            pad = max(1, th // 4)
            # Centre the text on the point, but keep the whole box inside the image.
            bx = min(max(x - tw // 2 - pad, 0), max(w - tw - 2 * pad, 0))
            by = min(max(y - th // 2 - pad, 0), max(h - th - 2 * pad, 0))
            draw.rectangle([bx, by, bx + tw + 2 * pad - 1, by + th + 2 * pad - 1], fill=(0, 0, 0))
            draw.text((bx + pad - left, by + pad - top), text, fill=(255, 255, 255), font=font)
    return result
