"""Pocket SAM (issue 16): a small SamModel trained here on the shapes world, and its mask oracle.

    train_pocket(out, seed=0, steps=3000)   # -> out/ (SamModel + preprocessor config + training.json)
    world_mask_iou(segment, world, seed, count)  # the oracle: mean IoU of a point on each shape

The model learns point prompts: a point inside one shape of a world picture -> that shape's mask. Pictures
go through the runtime's own numpy preprocessing (sam_processing.preprocess, the same call SamPredictor
makes), so the model is trained on exactly the pixels it is later run on; the pocket SD's pictures are
slightly blurred and noisy renders, so training pictures are too (mildly, at random). The loss is SAM's:
for the three multimask outputs the lowest (BCE + dice) counts, the single-mask output learns the mask
outright, and the IoU head learns each output's true IoU, so picking by predicted IoU works at run time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ...config import RecipeError
from ...runtime import sam_processing as sp
from ...world import WorldConfig, dataset

# 128 px input, 8 px patches: a 16 x 16 embedding and 64 x 64 low-resolution masks, the world's picture
# size, so the masks are learnt at full resolution. ~0.6 M parameters.
POCKET_CONFIG = {
    "vision_config": {"hidden_size": 64, "output_channels": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                      "image_size": 128, "patch_size": 8, "window_size": 8, "global_attn_indexes": [1, 3],
                      "num_pos_feats": 32, "mlp_dim": 128},
    "prompt_encoder_config": {"hidden_size": 64, "image_size": 128, "patch_size": 8, "mask_input_channels": 4},
    "mask_decoder_config": {"hidden_size": 64, "mlp_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "iou_head_hidden_dim": 64},
}
POCKET_WORLD = {"max_shapes": 2, "size": 64}
# The oracle's pictures: a seed no training run uses (training draws from `seed`, a small number).
HELD_OUT_SEED = 1_000_003
HELD_OUT_COUNT = 48


class TrainError(RecipeError):
    """A training request that cannot give a model (one line; the build reports it as a recipe error)."""


def world_config(world: dict | None = None) -> WorldConfig:
    given = {k: v for k, v in {**POCKET_WORLD, **(world or {})}.items() if v is not None}
    return WorldConfig(**given)


def pixel_values(picture: np.ndarray, image_size: int) -> tuple[np.ndarray, tuple, tuple]:
    """The encoder input for a picture: the runtime's preprocessing with SAM's default mean/std (which the
    saved preprocessor config repeats)."""
    return sp.preprocess(picture, image_size, sp.IMAGENET_MEAN, sp.IMAGENET_STD)


def degrade(picture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild blur, colour shift and noise, at random: pictures like the pocket SD's (a rendered picture half
    the time, as the oracle's are)."""
    from PIL import Image, ImageFilter

    if rng.random() < 0.5:
        return picture
    image = Image.fromarray(picture)
    if rng.random() < 0.7:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
    out = np.asarray(image, dtype=np.float32)
    out = out + rng.uniform(-12, 12, size=3) + rng.normal(0, rng.uniform(0, 8), size=out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def point_in(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A random (x, y) inside the mask, in picture pixels."""
    ys, xs = np.nonzero(mask)
    k = int(rng.integers(len(ys)))
    return float(xs[k] + rng.random()), float(ys[k] + rng.random())


def held_out(world: WorldConfig, seed: int = HELD_OUT_SEED, count: int = HELD_OUT_COUNT):
    """The oracle's (picture, masks, points) triples: each shape's point is the runtime's label point, well
    inside the shape."""
    for _, image, masks in dataset(world, seed, count):
        yield np.asarray(image), masks, [sp.label_point(m) for m in masks]


def world_mask_iou(segment: Callable[[np.ndarray, tuple], np.ndarray], world: WorldConfig,
                   seed: int = HELD_OUT_SEED, count: int = HELD_OUT_COUNT) -> dict:
    """The SAM oracle: `segment(picture, (x, y)) -> bool mask` on a point on each shape of `count` pictures;
    mean, min and count of the IoU with the rendered masks."""
    from ...world import mask_iou

    ious = [mask_iou(segment(picture, point), truth)
            for picture, masks, points in held_out(world, seed, count) for truth, point in zip(masks, points)]
    return {"mean": round(float(np.mean(ious)), 5), "min": round(float(np.min(ious)), 5), "masks": len(ious),
            "pictures": count, "seed": seed}


def torch_segmenter(model):
    """`segment(picture, point)` with the PyTorch model, as the runtime does it: multimask, the output the
    IoU head rates best, post-processed to the picture's size."""
    import torch

    size = model.config.vision_config.image_size

    def segment(picture, point):
        pixels, original, reshaped = pixel_values(picture, size)
        coords = sp.transform_points(np.asarray([point], np.float64), original, reshaped)
        with torch.no_grad():
            out = model(pixel_values=torch.from_numpy(pixels), input_points=torch.from_numpy(coords)[None, None],
                        input_labels=torch.ones(1, 1, 1, dtype=torch.long), multimask_output=True)
        best = int(out.iou_scores[0, 0].argmax())
        low = out.pred_masks[0, 0, best][None, None].numpy()
        return sp.postprocess_masks(low, original, reshaped, pad_size=size)[0, 0]

    return segment


def _batch(examples, rng, size: int, batch: int):
    """pixel values (B, 3, S, S), points (B, 1, 1, 2) in the encoder frame, masks (B, 64, 64) float."""
    pixels, points, masks = [], [], []
    for i in rng.integers(len(examples), size=batch):
        picture, shape_masks = examples[i]
        mask = shape_masks[int(rng.integers(len(shape_masks)))]
        pv, original, reshaped = pixel_values(degrade(picture, rng), size)
        pixels.append(pv[0])
        points.append(sp.transform_points(np.asarray([point_in(mask, rng)]), original, reshaped))
        masks.append(mask)
    return np.stack(pixels), np.stack(points)[:, None], np.stack(masks).astype(np.float32)


def _mask_losses(logits, target):
    """Per-example, per-output BCE + dice: logits (B, K, h, w), target (B, h, w) -> (B, K)."""
    import torch
    import torch.nn.functional as F

    target = target[:, None].expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((-1, -2))
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * target).sum((-1, -2)) + 1) / (prob.sum((-1, -2)) + target.sum((-1, -2)) + 1)
    return bce + dice


def _hard_iou(logits, target):
    pred = logits > 0
    truth = target[:, None].expand_as(pred) > 0.5
    inter = (pred & truth).sum((-1, -2)).float()
    union = (pred | truth).sum((-1, -2)).float()
    return inter / union.clamp(min=1)


def new_model(config: dict, seed: int):
    import torch
    from transformers import SamConfig, SamModel

    cfg = json.loads(json.dumps(config))
    cfg["initializer_range"] = 0.02
    cfg.setdefault("vision_config", {})["initializer_range"] = 0.02
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return SamModel(SamConfig(**cfg))


def train_pocket(out: Path, *, seed: int = 0, steps: int = 3000, examples: int = 4000, batch: int = 16,
                 learning_rate: float = 2e-3, config: dict | None = None, world: dict | None = None,
                 threads: int = 1, log: Callable[[str], None] = print) -> dict:
    """Train a pocket SAM and save it to `out` (SamModel + preprocessor config + training.json).

    One thread by default: the same floats on any machine, and on a shared 2-core machine a second thread
    mostly spins waiting for the first (measured: ~4x the CPU time per step under load).
    Returns the training record (also in training.json): seed, steps, seconds, the last loss and the
    PyTorch model's oracle IoU on the held-out pictures.
    """
    import torch
    import torch.nn.functional as F
    from transformers import SamImageProcessor

    if steps < 1:
        raise TrainError(f"steps must be at least 1 (got {steps}): a train source with no steps would publish "
                         "an untrained model")
    config = config or POCKET_CONFIG
    wc = world_config(world)
    start = time.time()
    model = new_model(config, seed)
    size = model.config.vision_config.image_size
    data = [(np.asarray(image), masks) for _, image, masks in dataset(wc, seed, examples)]
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=learning_rate, total_steps=steps, pct_start=0.05)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    model.train()
    running = None
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for step in range(steps):
                pixels, points, masks = (torch.from_numpy(a) for a in _batch(data, rng, size, batch))
                labels = torch.ones(points.shape[:3], dtype=torch.long)
                embeddings = model.get_image_embeddings(pixels)
                multi = model(image_embeddings=embeddings, input_points=points, input_labels=labels,
                              multimask_output=True)
                single = model(image_embeddings=embeddings, input_points=points, input_labels=labels,
                               multimask_output=False)
                low = multi.pred_masks[:, 0]  # (B, 3, h, w)
                target = masks if masks.shape[-1] == low.shape[-1] else \
                    F.interpolate(masks[:, None], size=low.shape[-2:], mode="area")[:, 0]
                per_output = _mask_losses(low, target)
                mask_loss = per_output.min(dim=1).values.mean() + _mask_losses(single.pred_masks[:, 0], target).mean()
                with torch.no_grad():
                    true_iou = torch.cat([_hard_iou(low, target), _hard_iou(single.pred_masks[:, 0], target)], dim=1)
                predicted = torch.cat([multi.iou_scores[:, 0], single.iou_scores[:, 0]], dim=1)
                loss = mask_loss + F.mse_loss(predicted, true_iou)
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
                running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
                if (step + 1) % max(1, steps // 20) == 0 or step + 1 == steps:
                    log(f"pocket sam: step {step + 1}/{steps}  loss {running:.4f}  {time.time() - start:.0f} s")
    finally:
        torch.set_num_threads(previous_threads)
    model.eval()
    seconds = time.time() - start
    oracle = world_mask_iou(torch_segmenter(model), wc)
    log(f"pocket sam: held-out mean IoU {oracle['mean']} (min {oracle['min']}) on {oracle['masks']} masks")
    out = Path(out)
    model.save_pretrained(out)
    SamImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size}).save_pretrained(out)
    record = {"trained_on": "world", "world": {**POCKET_WORLD, **(world or {})}, "seed": seed, "steps": steps,
              "examples": examples, "batch": batch, "learning_rate": learning_rate, "config": config,
              "seconds": round(seconds, 1), "final_loss": round(float(running), 4), "threads": threads,
              "torch_world_mask_iou": oracle}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def training_record(folder: Path) -> dict | None:
    """A model folder's training.json (None when it has none: not a pocket model)."""
    path = Path(folder) / "training.json"
    return json.loads(path.read_text()) if path.is_file() else None
