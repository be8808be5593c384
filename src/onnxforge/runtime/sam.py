"""Segment Anything on onnxruntime: encoder once per image, decoder once per prompt.

numpy + onnxruntime + Pillow only (never torch). Everything model-specific
(input size, pixel mean/std, mask threshold, point label codes, which decoder
outputs are the multimask ones, "segment everything" defaults) comes from the
artifact's manifest `runtime` block.

    predictor = SamPredictor("artifacts/sam-tiny/fp32")
    predictor.set_image("photo.png")                      # runs the encoder (cached per image)
    masks, scores = predictor.predict(points=[(120, 80)])  # runs only the decoder
    masks, scores = predictor.predict(box=(10, 20, 200, 180))
    candidates = predictor.segment_everything()           # numbered objects, largest first
    predictor.overlay(candidates).save("objects.png")

The decoder graph takes prompts the way the original SAM ONNX model does: one
list of (x, y) points per prompt with a label each: 1 positive, 0 negative,
2 and 3 the top-left and bottom-right box corners, -1 a padding point that
SAM appends when there is no box. One graph thus serves points, a box, and
both; it returns all four mask tokens (0: the single-mask output, 1-3: the
multimask outputs) with their predicted IoU, so either mode is a slice.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import artifact as art
from . import sam_processing as sp
from .sam_processing import Candidate

__all__ = ["SamPredictor", "Candidate", "mask_iou"]


@dataclass
class _ImageState:
    key: str
    rgb: np.ndarray  # uint8 HxWx3
    embeddings: np.ndarray  # (1, C, h, w) float32
    original_size: tuple[int, int]  # (h, w)
    reshaped_size: tuple[int, int]  # (h, w) inside the encoder's square input


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; two empty masks agree perfectly (1.0)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _image_key(rgb: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).data)
    return h.hexdigest()


class SamPredictor:
    """Point, box and "segment everything" prompts on one image at a time.

    The image embedding is cached by image content (sha256 of the pixels), the
    last `cache_size` images: setting the same image again, or prompting it
    many times, never re-runs the encoder. `encoder_runs` and `decoder_runs`
    count the session calls.
    """

    def __init__(self, artifact, threads: int | None = None, low_memory: bool = True, cache_size: int = 4):
        a = art.load(artifact, expect_kind="sam")
        # low_memory (default) runs the encoder without the ORT arena. Measured on the 2-core AVX2 EPYC,
        # ViT-B at 1024 px: arena off 8.7 s fp32 / 6.2 s int8 at 4.0 / 3.4 GiB peak RSS; arena on 11.8 s
        # for the first image, 7.8 s after, at 6.7 GiB. One image per run is the common case.
        encoder = a.session("encoder", threads=threads, low_memory=low_memory)
        decoder = a.session("decoder", threads=threads)
        self._init(encoder, decoder, a.runtime, cache_size)
        self.artifact = a

    @classmethod
    def from_sessions(cls, encoder, decoder, runtime: dict, cache_size: int = 4) -> "SamPredictor":
        """A predictor on sessions that are not (yet) a published artifact: used by validation."""
        self = cls.__new__(cls)
        self._init(encoder, decoder, runtime, cache_size)
        self.artifact = None
        return self

    def _init(self, encoder, decoder, runtime: dict, cache_size: int) -> None:
        self.encoder, self.decoder, self.runtime = encoder, decoder, runtime
        self.image_size = int(runtime["image_size"])
        self.labels = runtime["point_labels"]
        self.cache_size = max(1, int(cache_size))
        self._cache: OrderedDict[str, _ImageState] = OrderedDict()
        self._state: _ImageState | None = None
        self.encoder_runs = 0
        self.decoder_runs = 0

    # ---- image ------------------------------------------------------------------

    def set_image(self, image) -> None:
        """Make `image` (path, PIL image or uint8 array; gray/RGBA converted) the current one.

        Runs the encoder unless this image's embedding is cached.
        """
        rgb = sp.load_rgb(image)
        key = _image_key(rgb)
        state = self._cache.get(key)
        if state is None:
            pixel_values, original_size, reshaped_size = sp.preprocess(
                rgb, self.image_size, self.runtime["pixel_mean"], self.runtime["pixel_std"])
            names = self.runtime["encoder_io"]
            embeddings = self.encoder.run([names["output"]], {names["input"]: pixel_values})[0]
            self.encoder_runs += 1
            state = _ImageState(key, rgb, embeddings, original_size, reshaped_size)
            self._cache[key] = state
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        self._state = state

    @property
    def image(self) -> np.ndarray:
        return self._current().rgb

    @property
    def embeddings(self) -> np.ndarray:
        return self._current().embeddings

    def _current(self) -> _ImageState:
        if self._state is None:
            raise ValueError("no image set: call set_image(image) before prompting")
        return self._state

    # ---- prompts ----------------------------------------------------------------

    def prompt_tokens(self, points=None, labels=None, box=None) -> tuple[np.ndarray, np.ndarray]:
        """Original-pixel points/box -> the decoder's (coords (N, 2) float32, labels (N,) int64)."""
        st = self._current()
        coords, codes = [], []
        if points is not None and len(points):
            pts = np.asarray(points, dtype=np.float64)
            if pts.ndim != 2 or pts.shape[1] != 2:
                raise ValueError(f"points must be a list of (x, y), got shape {pts.shape}")
            lab = np.ones(len(pts), dtype=np.int64) if labels is None else np.asarray(labels).reshape(-1)
            if lab.shape[0] != pts.shape[0]:
                raise ValueError(f"{pts.shape[0]} points but {lab.shape[0]} labels")
            if not np.isin(lab, (0, 1)).all():
                raise ValueError(f"point labels must be 1 (object) or 0 (not the object), got {sorted(set(lab.tolist()))}")
            coords.append(sp.transform_points(pts, st.original_size, st.reshaped_size))
            codes.append(np.where(lab == 1, self.labels["positive"], self.labels["negative"]).astype(np.int64))
        elif labels is not None and len(labels):
            raise ValueError("labels given without points")
        if box is not None:
            b = np.asarray(box, dtype=np.float64).reshape(-1)
            if b.shape != (4,):
                raise ValueError(f"box must be (x0, y0, x1, y1), got {b.shape[0]} numbers")
            coords.append(sp.transform_boxes(b, st.original_size, st.reshaped_size).reshape(2, 2))
            codes.append(np.array([self.labels["box_top_left"], self.labels["box_bottom_right"]], dtype=np.int64))
        if not coords:
            raise ValueError("give at least one point or a box")
        if box is None:
            # SAM appends one padding point when there is no box (transformers: pad=True).
            coords.append(np.zeros((1, 2), np.float32))
            codes.append(np.array([self.labels["padding"]], dtype=np.int64))
        return np.concatenate(coords).astype(np.float32), np.concatenate(codes)

    def decode(self, point_coords: np.ndarray, point_labels: np.ndarray, embeddings: np.ndarray | None = None):
        """One decoder call: coords (P, N, 2), labels (P, N) in the encoder's frame.

        Returns (iou_scores (P, 4), low_res_logits (P, 4, h, w)), all four mask tokens.
        """
        names = self.runtime["decoder_io"]
        emb = self.embeddings if embeddings is None else embeddings
        feeds = {names["image_embeddings"]: emb,
                 names["point_coords"]: np.ascontiguousarray(point_coords[None], dtype=np.float32),
                 names["point_labels"]: np.ascontiguousarray(point_labels[None], dtype=np.int64)}
        iou, masks = self.decoder.run([names["iou_scores"], names["low_res_masks"]], feeds)
        self.decoder_runs += 1
        return iou[0], masks[0]

    def mask_outputs(self, multimask: bool) -> list[int]:
        """Which of the decoder's four mask tokens a mode returns (from the manifest)."""
        return list(self.runtime["multimask_outputs"]) if multimask else [int(self.runtime["single_mask_output"])]

    def _decode_prompt(self, points, labels, box, multimask: bool):
        coords, codes = self.prompt_tokens(points, labels, box)
        iou, low_res = self.decode(coords[None], codes[None])
        keep = self.mask_outputs(multimask)
        return iou[0, keep].astype(np.float32), low_res[:, keep]  # (C,), (1, C, h, w)

    def _full_size(self, low_res: np.ndarray, binarize: bool = True) -> np.ndarray:
        st = self._current()
        return sp.postprocess_masks(low_res, st.original_size, st.reshaped_size, pad_size=self.image_size,
                                    threshold=self.runtime["mask_threshold"], binarize=binarize)[0]

    def predict(self, points=None, labels=None, box=None, multimask: bool = True, return_logits: bool = False):
        """Masks for one prompt on the current image (decoder only).

        points: (x, y) pairs in original image pixels; labels: 1 object / 0 not
        the object (default all 1); box: (x0, y0, x1, y1). Returns (masks, scores):
        bool (C, H, W) at the image's size and the model's IoU estimate per mask,
        C = 3 with `multimask`, else 1. `return_logits` gives float32 logits instead.
        """
        scores, low_res = self._decode_prompt(points, labels, box, multimask)
        return self._full_size(low_res, binarize=not return_logits), scores

    def best_mask(self, points=None, labels=None, box=None, multimask: bool = True):
        """(mask, index, scores): the highest-scoring mask for a prompt, its index and every mask's score.

        Only that mask is resized to the picture (the resize costs more than the
        decoder on big pictures: ~50 ms per mask at 1024x768).
        """
        scores, low_res = self._decode_prompt(points, labels, box, multimask)
        best = int(np.argmax(scores))
        return self._full_size(low_res[:, best:best + 1])[0], best, scores

    # ---- segment everything -----------------------------------------------------------

    def segment_everything(self, points_per_side: int | None = None, points_per_batch: int | None = None,
                           pred_iou_threshold: float | None = None, stability_threshold: float | None = None,
                           nms_threshold: float | None = None) -> list[Candidate]:
        """Every object SAM finds from a grid of single-point prompts, largest first.

        A points_per_side^2 grid of positive points, points_per_batch per decoder
        call, 3 masks each; keep masks rated above pred_iou_threshold and stable
        above stability_threshold, drop near-duplicates (box IoU > nms_threshold),
        order largest first. Defaults come from the manifest. Candidate i of the
        returned list is the object a person calls "number i + 1".
        """
        ev = self.runtime["everything"]
        n = int(ev["points_per_side"] if points_per_side is None else points_per_side)
        batch = int(ev["points_per_batch"] if points_per_batch is None else points_per_batch)
        iou_t = float(ev["pred_iou_threshold"] if pred_iou_threshold is None else pred_iou_threshold)
        stab_t = float(ev["stability_threshold"] if stability_threshold is None else stability_threshold)
        nms_t = float(ev["nms_threshold"] if nms_threshold is None else nms_threshold)
        if n < 1 or batch < 1:
            raise ValueError(f"points per side and per batch must be >= 1 (got {n} and {batch})")
        st = self._current()
        h, w = st.original_size
        grid = sp.point_grid(n) * np.array([w, h], dtype=np.float64)
        coords = sp.transform_points(grid, st.original_size, st.reshaped_size)
        keep_tokens = self.mask_outputs(True)
        candidates: list[Candidate] = []
        for start in range(0, len(coords), batch):
            chunk = coords[start:start + batch]
            pad = np.zeros_like(chunk)
            pc = np.stack([chunk, pad], axis=1)  # (P, 2, 2): the point, then SAM's padding point
            pl = np.tile(np.array([self.labels["positive"], self.labels["padding"]], np.int64), (len(chunk), 1))
            iou, low_res = self.decode(pc, pl)
            iou, low_res = iou[:, keep_tokens], low_res[:, keep_tokens]
            flat_iou = iou.reshape(-1)
            # The IoU test is cheap: apply it before upscaling, so only survivors pay for
            # the full-size resize (same result, the filters are a plain AND).
            survivors = np.flatnonzero(flat_iou > iou_t) if iou_t > 0 else np.arange(flat_iou.size)
            flat_low = low_res.reshape(-1, *low_res.shape[-2:])
            for sub in range(0, len(survivors), 8):  # a few full-size float masks at a time
                idx = survivors[sub:sub + 8]
                logits = sp.postprocess_masks(flat_low[idx][None], st.original_size, st.reshaped_size,
                                              pad_size=self.image_size, binarize=False)[0]
                found = sp.filter_candidates(logits, flat_iou[idx], iou_threshold=iou_t, stability_threshold=stab_t,
                                             mask_threshold=self.runtime["mask_threshold"],
                                             stability_offset=ev["stability_offset"])
                for c in found:
                    c.index = start * len(keep_tokens) + int(idx[c.index])  # global: point * 3 + mask
                candidates.extend(found)
        kept = sp.mask_nms([c.mask for c in candidates], [c.score for c in candidates], nms_t)
        return sp.order_candidates([candidates[i] for i in kept])

    # ---- pictures ---------------------------------------------------------------------

    def overlay(self, masks_or_candidates: Sequence, labels: bool = True):
        """A PIL image of the current picture with each mask tinted (and numbered from 1)."""
        masks = [c.mask if isinstance(c, Candidate) else c for c in masks_or_candidates]
        return sp.render_overlay(self.image, masks, labels=labels)


def save_mask_png(mask: np.ndarray, path: str | Path) -> None:
    """A mask as an 8-bit grayscale PNG: 255 inside, 0 outside."""
    from PIL import Image

    Image.fromarray(np.where(np.asarray(mask, bool), 255, 0).astype(np.uint8)).save(path)


def save_label_png(candidates: Sequence[Candidate], shape: tuple[int, int], path: str | Path) -> None:
    """Pixel value = candidate number (1-based, later ones on top), 0 = no candidate."""
    from PIL import Image

    if len(candidates) > 255:
        raise ValueError(f"{len(candidates)} candidates do not fit an 8-bit label image (255 at most)")
    labels = np.zeros(shape, dtype=np.uint8)
    for n, c in enumerate(candidates, start=1):
        labels[c.mask] = n
    Image.fromarray(labels).save(path)
