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
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import artifact as art
from . import sam_processing as sp
from .sam_processing import Candidate

__all__ = ["SamPredictor", "Sam2Predictor", "open_predictor", "Candidate", "mask_iou"]

# Prompting needs a picture of at least this many pixels a side (the model sees it at 256-1024 px);
# above max_pixels the picture and its full-size float masks (4 bytes a pixel each) get huge.
MIN_SIDE = 8
MAX_PIXELS = 40_000_000
MAX_POINTS_PER_SIDE = 64  # a 64x64 grid is 4096 prompts, 12288 masks: beyond that nothing new is found


@dataclass
class _ImageState:
    key: str
    rgb: np.ndarray  # uint8 HxWx3
    features: dict  # encoder output name -> array; the last is the image embedding (1, C, h, w)
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

    KIND = "sam"  # the manifest runtime.kind this class reads (Sam2Predictor: "sam2")

    def __init__(self, artifact, threads: int | None = None, low_memory: bool = True, cache_size: int = 4,
                 max_pixels: int = MAX_PIXELS):
        a = art.load(artifact, expect_kind=self.KIND)
        # low_memory (default) runs the encoder without the ORT arena. Measured on the 2-core AVX2 EPYC,
        # ViT-B at 1024 px: arena off 8.7 s fp32 / 6.2 s int8 at 4.0 / 3.4 GiB peak RSS; arena on 11.8 s
        # for the first image, 7.8 s after, at 6.7 GiB. One image per run is the common case.
        encoder = a.session("encoder", threads=threads, low_memory=low_memory)
        decoder = a.session("decoder", threads=threads)
        self._init(encoder, decoder, a.runtime, cache_size, max_pixels)
        self.artifact = a

    @classmethod
    def from_sessions(cls, encoder, decoder, runtime: dict, cache_size: int = 4) -> "SamPredictor":
        """A predictor on sessions that are not (yet) a published artifact: used by validation."""
        self = cls.__new__(cls)
        self._init(encoder, decoder, runtime, cache_size, MAX_PIXELS)
        self.artifact = None
        return self

    def _init(self, encoder, decoder, runtime: dict, cache_size: int, max_pixels: int) -> None:
        self.encoder, self.decoder, self.runtime = encoder, decoder, runtime
        self.image_size = int(runtime["image_size"])
        self.labels = runtime["point_labels"]
        self.max_pixels = int(max_pixels)
        # SAM pads the picture into the square input; SAM 2 stretches it to the square ("resize").
        self.square = runtime.get("resize", "longest_side") == "square"
        # SAM 2 appends the padding point after a box too; SAM only when there is no box.
        self.pad_always = runtime.get("padding_point", "without_box") == "always"
        enc_io, dec_io = runtime["encoder_io"], runtime["decoder_io"]
        # Encoder outputs and the decoder inputs they feed (SAM: the embedding only; SAM 2: + two
        # high-resolution feature maps).
        self.feature_names = list(enc_io.get("outputs") or [enc_io["output"]])
        self.feature_inputs = dict(dec_io.get("features") or {enc_io["output"]: dec_io["image_embeddings"]})
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
        h, w = rgb.shape[:2]
        if min(h, w) < MIN_SIDE:
            raise ValueError(f"the picture is {w}x{h} px; prompting needs at least {MIN_SIDE} px a side")
        if h * w > self.max_pixels:
            raise ValueError(f"the picture is {w}x{h} px = {h * w} pixels; the limit is {self.max_pixels} pixels "
                             f"(max_pixels): shrink it first")
        key = _image_key(rgb)
        state = self._cache.get(key)
        if state is None:
            prep = sp.preprocess_square if self.square else sp.preprocess
            pixel_values, original_size, reshaped_size = prep(
                rgb, self.image_size, self.runtime["pixel_mean"], self.runtime["pixel_std"])
            outputs = self.encoder.run(self.feature_names, {self.runtime["encoder_io"]["input"]: pixel_values})
            self.encoder_runs += 1
            state = _ImageState(key, rgb, dict(zip(self.feature_names, outputs)), original_size, reshaped_size)
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
        """The image embedding (the encoder's last output)."""
        return self._current().features[self.feature_names[-1]]

    @property
    def features(self) -> dict:
        """Every encoder output by name (SAM 2: the embedding and the high-resolution features)."""
        return self._current().features

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
        if box is None or self.pad_always:
            # SAM appends one padding point when there is no box (transformers: pad=True).
            coords.append(np.zeros((1, 2), np.float32))
            codes.append(np.array([self.labels["padding"]], dtype=np.int64))
        return np.concatenate(coords).astype(np.float32), np.concatenate(codes)

    def decode(self, point_coords: np.ndarray, point_labels: np.ndarray, embeddings=None):
        """One decoder call: coords (P, N, 2), labels (P, N) in the encoder's frame.

        Returns (iou_scores (P, 4), low_res_logits (P, 4, h, w)), all four mask tokens.
        embeddings: another image's features (a dict by encoder output name, or the embedding alone).
        """
        names = self.runtime["decoder_io"]
        if embeddings is None:
            features = self.features
        elif isinstance(embeddings, dict):
            features = embeddings
        else:
            features = {self.feature_names[-1]: embeddings}
        if point_coords.ndim != 3 or point_coords.shape[0] == 0:
            raise ValueError(f"the prompt batch is empty or malformed: coords of shape {point_coords.shape}, "
                             f"expected (prompts >= 1, points, 2)")
        feeds = {self.feature_inputs[k]: np.ascontiguousarray(v, dtype=np.float32) for k, v in features.items()}
        feeds.update({names["point_coords"]: np.ascontiguousarray(point_coords[None], dtype=np.float32),
                      names["point_labels"]: np.ascontiguousarray(point_labels[None], dtype=np.int64)})
        iou, masks = self.decoder.run([names["iou_scores"], names["low_res_masks"]], feeds)
        self.decoder_runs += 1
        return iou[0], masks[0]

    def mask_outputs(self, multimask: bool) -> list[int]:
        """Which of the decoder's four mask tokens a mode returns (from the manifest)."""
        return list(self.runtime["multimask_outputs"]) if multimask else [int(self.runtime["single_mask_output"])]

    def _select(self, iou: np.ndarray, low_res: np.ndarray, multimask: bool):
        """The returned masks of each prompt: (P, C) scores and (P, C, h, w) logits.

        SAM 2's single-mask mode keeps token 0 only where it is stable, else the multimask output the
        model rates best (transformers' Sam2MaskDecoder._dynamic_multimask_via_stability).
        """
        dyn = self.runtime.get("dynamic_multimask")
        if multimask or not dyn:
            keep = self.mask_outputs(multimask)
            return iou[:, keep].astype(np.float32), low_res[:, keep]
        single, multi = self.mask_outputs(False)[0], self.mask_outputs(True)
        flat = low_res[:, single].reshape(len(low_res), -1)
        inter = (flat > dyn["delta"]).sum(-1)
        union = (flat > -dyn["delta"]).sum(-1)
        stable = np.where(union > 0, inter / np.maximum(union, 1), 1.0) >= dyn["threshold"]
        best = np.asarray(multi)[np.argmax(iou[:, multi], axis=1)]
        pick = np.where(stable, single, best)
        rows = np.arange(len(low_res))
        return iou[rows, pick][:, None].astype(np.float32), low_res[rows, pick][:, None]

    def _decode_prompt(self, points, labels, box, multimask: bool):
        coords, codes = self.prompt_tokens(points, labels, box)
        iou, low_res = self.decode(coords[None], codes[None])
        scores, low = self._select(iou, low_res, multimask)
        return scores[0], low[:1]  # (C,), (1, C, h, w)

    def _upscale(self, low_res: np.ndarray, binarize: bool, threshold: float | None = None) -> np.ndarray:
        """(N, C, h, w) decoder logits -> (N, C, H, W) at the picture's size."""
        st = self._current()
        t = self.runtime["mask_threshold"] if threshold is None else threshold
        if self.square:  # SAM 2: one bilinear resize to the picture (Sam2ImageProcessorFast.post_process_masks)
            full = sp.resize_bilinear(low_res, *st.original_size)
            return full > t if binarize else full
        return sp.postprocess_masks(low_res, st.original_size, st.reshaped_size, pad_size=self.image_size,
                                    threshold=t, binarize=binarize)

    def _full_size(self, low_res: np.ndarray, binarize: bool = True) -> np.ndarray:
        return self._upscale(low_res, binarize)[0]

    def predict(self, points=None, labels=None, box=None, multimask: bool = True, return_logits: bool = False):
        """Masks for one prompt on the current image (decoder only).

        points: (x, y) pairs in original image pixels; labels: 1 object / 0 not
        the object (default all 1); box: (x0, y0, x1, y1). Returns (masks, scores):
        bool (C, H, W) at the image's size and the model's IoU estimate per mask,
        C = 3 with `multimask`, else 1. `return_logits` gives float32 logits instead.
        """
        scores, low_res = self._decode_prompt(points, labels, box, multimask)
        return self._full_size(low_res, binarize=not return_logits), scores

    def predict_batch(self, prompts: Sequence[dict], multimask: bool = True, return_logits: bool = False):
        """Masks for several prompts: [(masks, scores)] in the order given, as `predict` returns them.

        Each prompt is a dict with points / labels / box. Prompts with the same number of tokens go
        through the decoder in one call (a different count would need padding tokens, which change
        SAM's output), so a batch of clicks or of boxes is one decoder run.
        """
        if not len(prompts):
            raise ValueError("the prompt batch is empty: give at least one prompt (points and/or a box)")
        tokens = []
        for i, pr in enumerate(prompts):
            if not isinstance(pr, dict) or not set(pr) <= {"points", "labels", "box"}:
                raise ValueError(f"prompt {i + 1}: expected a dict with points, labels and/or box, got {pr!r}")
            try:
                tokens.append(self.prompt_tokens(pr.get("points"), pr.get("labels"), pr.get("box")))
            except ValueError as err:
                raise ValueError(f"prompt {i + 1}: {err}") from None
        results: list = [None] * len(prompts)
        for n in sorted({len(c) for c, _ in tokens}):
            idx = [i for i, (c, _) in enumerate(tokens) if len(c) == n]
            iou, low_res = self.decode(np.stack([tokens[i][0] for i in idx]), np.stack([tokens[i][1] for i in idx]))
            scores, low = self._select(iou, low_res, multimask)
            for k, i in enumerate(idx):
                results[i] = (self._full_size(low[k:k + 1], binarize=not return_logits), scores[k])
        return results

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
                           nms_threshold: float | None = None, min_region_area: int | None = None,
                           exact: bool = False) -> list[Candidate]:
        """Every object SAM finds from a grid of single-point prompts, largest first.

        A points_per_side^2 grid of positive points, points_per_batch per decoder
        call, 3 masks each; keep masks rated above pred_iou_threshold and stable
        above stability_threshold, drop near-duplicates (box IoU > nms_threshold),
        order largest first. min_region_area > 0 then fills holes and drops islands
        smaller than that many pixels and repeats the NMS preferring unchanged masks
        (SAM's AutomaticMaskGenerator.postprocess_small_regions). Defaults come from
        the manifest. Candidate i of the returned list is the object a person calls "number i + 1".

        By default the stability score and the NMS boxes come from the decoder's low-resolution logits
        (256 x 256 over the encoder's input), and only the masks that survive NMS are resized to the
        picture: resizing is most of the cost once many masks pass the IoU test. `exact=True` does
        what transformers' mask-generation pipeline does instead (every IoU survivor resized, stability
        and boxes at the picture's size); the two agree on a mask except near the stability threshold
        and where the NMS boxes differ by the resolution (tests/test_sam_batch.py states how much).
        """
        ev = self.runtime["everything"]
        n = int(ev["points_per_side"] if points_per_side is None else points_per_side)
        batch = int(ev["points_per_batch"] if points_per_batch is None else points_per_batch)
        iou_t = float(ev["pred_iou_threshold"] if pred_iou_threshold is None else pred_iou_threshold)
        stab_t = float(ev["stability_threshold"] if stability_threshold is None else stability_threshold)
        nms_t = float(ev["nms_threshold"] if nms_threshold is None else nms_threshold)
        min_area = int(ev.get("min_region_area", 0) if min_region_area is None else min_region_area)
        if not 1 <= n <= MAX_POINTS_PER_SIDE:
            raise ValueError(f"points per side must be 1 to {MAX_POINTS_PER_SIDE} (got {n}): the grid has n x n points")
        if batch < 1:
            raise ValueError(f"points per batch must be >= 1 (got {batch})")
        if min_area < 0:
            raise ValueError(f"min_region_area must be >= 0 pixels (got {min_area})")
        # 1. the grid, in the encoder's frame
        st = self._current()
        h, w = st.original_size
        grid = sp.point_grid(n) * np.array([w, h], dtype=np.float64)
        coords = sp.transform_points(grid, st.original_size, st.reshaped_size)
        # 2. the decoder in batches (a generator: the filters below take one batch at a time)
        proposals = self._grid_proposals(coords, batch, iou_t)
        # 3. stability, NMS, then the survivors at the picture's size
        filt = self._filter_exact if exact else self._filter_low_res
        candidates = filt(proposals, iou_t, stab_t, nms_t, ev["stability_offset"])
        # 4. SAM's small-region clean-up
        if min_area > 0:
            candidates = _clean_small_regions(candidates, min_area, nms_t)
        return sp.order_candidates(candidates)

    def _grid_proposals(self, coords: np.ndarray, batch: int, iou_t: float):
        """Per decoder call: (global indices, scores, low-res logits) of the multimask outputs rated above
        iou_t. The IoU test is on the scores, before anything is resized (the filters are a plain AND)."""
        keep_tokens = self.mask_outputs(True)
        for start in range(0, len(coords), batch):
            chunk = coords[start:start + batch]
            pc = np.stack([chunk, np.zeros_like(chunk)], axis=1)  # (P, 2, 2): the point, then SAM's padding point
            pl = np.tile(np.array([self.labels["positive"], self.labels["padding"]], np.int64), (len(chunk), 1))
            iou, low_res = self.decode(pc, pl)
            flat_iou = iou[:, keep_tokens].reshape(-1)
            survivors = np.flatnonzero(flat_iou > iou_t) if iou_t > 0 else np.arange(flat_iou.size)
            flat_low = low_res[:, keep_tokens].reshape(-1, *low_res.shape[-2:])
            # global index: point * 3 + mask
            yield start * len(keep_tokens) + survivors, flat_iou[survivors], flat_low[survivors]

    def _filter_exact(self, proposals, iou_t, stab_t, nms_t, offset) -> list[Candidate]:
        """transformers' order: each IoU survivor resized to the picture, stability and boxes there, NMS."""
        candidates: list[Candidate] = []
        for index, scores, low in proposals:
            for sub in range(0, len(index), 8):  # a few full-size float masks at a time
                logits = self._upscale(low[sub:sub + 8][None], binarize=False)[0]
                found = sp.filter_candidates(logits, scores[sub:sub + 8], iou_threshold=iou_t,
                                             stability_threshold=stab_t, mask_threshold=self.runtime["mask_threshold"],
                                             stability_offset=offset)
                for c in found:
                    c.index = int(index[sub + c.index])
                candidates.extend(found)
        kept = sp.mask_nms([c.mask for c in candidates], [c.score for c in candidates], nms_t)
        return [candidates[i] for i in kept]

    def _filter_low_res(self, proposals, iou_t, stab_t, nms_t, offset) -> list[Candidate]:
        """Stability and NMS boxes on the low-resolution logits (the part that shows the picture); only the
        NMS survivors are resized. Their area and box are then measured on the picture-size mask; their
        `stability` stays the low-resolution one."""
        t = float(self.runtime["mask_threshold"])
        kept_parts = []
        for index, scores, low in proposals:
            view = self._low_res_view(low)
            stability = sp.stability_score(view, t, offset)
            keep = stability > stab_t if stab_t > 0.0 else np.ones(len(index), dtype=bool)
            kept_parts.append((index[keep], scores[keep], stability[keep], low[keep]))
        index, scores, stability, low = (np.concatenate([p[k] for p in kept_parts]) for k in range(4))
        kept = sp.box_nms(self._low_res_boxes(low), scores, nms_t)  # best first, as the exact path's list
        candidates = []
        for sub in range(0, len(kept), 8):  # a few full-size masks at a time
            idx = kept[sub:sub + 8]
            for k, mask in zip(idx, self._upscale(low[idx][None], binarize=True)[0]):
                area = int(mask.sum())
                if area:  # empty after the resize: dropped, as the exact path does
                    candidates.append(Candidate(int(index[k]), mask, float(scores[k]), float(stability[k]), area,
                                                sp.mask_to_box(mask)))
        return candidates

    def _low_res_geometry(self, side: int):
        """Of the decoder's side x side logits over the encoder's square input: the vh x vw corner that
        shows the picture (SAM pads the rest; SAM 2 stretches the picture over all of it), and how many
        picture pixels (fy, fx) one low-res pixel spans."""
        st = self._current()
        (orig_h, orig_w), (new_h, new_w) = st.original_size, st.reshaped_size
        frac = side / self.image_size
        return math.ceil(new_h * frac), math.ceil(new_w * frac), orig_h / (new_h * frac), orig_w / (new_w * frac)

    def _low_res_view(self, low: np.ndarray) -> np.ndarray:
        vh, vw, _, _ = self._low_res_geometry(low.shape[-1])
        return low[..., :vh, :vw]

    def _low_res_boxes(self, low: np.ndarray) -> np.ndarray:
        """(N, 4) xyxy picture-pixel boxes of the low-res masks: low-res pixels x0..x1 cover picture pixels
        floor(x0 * fx) .. ceil((x1 + 1) * fx) - 1 (so within one low-res pixel of the picture-size mask's box)."""
        _, _, fy, fx = self._low_res_geometry(low.shape[-1])
        h, w = self._current().original_size
        binary = self._low_res_view(low) > self.runtime["mask_threshold"]
        box = sp.masks_to_boxes(binary).astype(np.float64)
        boxes = np.stack([np.floor(box[:, 0] * fx), np.floor(box[:, 1] * fy),
                          np.minimum(np.ceil((box[:, 2] + 1) * fx) - 1, w - 1),
                          np.minimum(np.ceil((box[:, 3] + 1) * fy) - 1, h - 1)], axis=1)
        boxes[~binary.any(axis=(-1, -2))] = 0  # an empty mask: a zero-area box, which NMS never matches
        return boxes

    # ---- pictures ---------------------------------------------------------------------

    def overlay(self, masks_or_candidates: Sequence, labels: bool = True):
        """A PIL image of the current picture with each mask tinted (and numbered from 1)."""
        masks = [c.mask if isinstance(c, Candidate) else c for c in masks_or_candidates]
        return sp.render_overlay(self.image, masks, labels=labels)


class Sam2Predictor(SamPredictor):
    """SAM 2.1 artifacts (runtime.kind "sam2"): the same interface; the manifest says what differs
    (square resize, high-resolution features into the decoder, padding point after boxes)."""

    KIND = "sam2"


PREDICTORS = {cls.KIND: cls for cls in (SamPredictor, Sam2Predictor)}


def open_predictor(artifact, **kwargs) -> SamPredictor:
    """The predictor for a SAM or SAM 2 artifact, picked by its manifest's runtime.kind."""
    a = art.load(artifact)
    kind = a.runtime.get("kind")
    if kind not in PREDICTORS:
        art.check_kind(a.dir, a.manifest, SamPredictor.KIND)  # the one-line "is a ..., use ..." error
    return PREDICTORS[kind](a, **kwargs)


def _clean_small_regions(candidates: list[Candidate], min_area: int, nms_threshold: float) -> list[Candidate]:
    """Fill small holes, drop small islands, then NMS again preferring masks the clean-up left unchanged
    (score 1 vs 0, as segment_anything's AutomaticMaskGenerator.postprocess_small_regions)."""
    cleaned, prefer = [], []
    for c in candidates:
        mask, holes = sp.remove_small_regions(c.mask, min_area, "holes")
        mask, islands = sp.remove_small_regions(mask, min_area, "islands")
        area = int(mask.sum())
        if area == 0:
            continue
        cleaned.append(Candidate(c.index, mask, c.score, c.stability, area, sp.mask_to_box(mask)))
        prefer.append(0.0 if (holes or islands) else 1.0)
    kept = sp.mask_nms([c.mask for c in cleaned], prefer, nms_threshold)
    return [cleaned[i] for i in kept]


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
