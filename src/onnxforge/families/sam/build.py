"""Segment Anything (SAM): source, export, quantize and validate stages, and the recipe's plan.

Two ONNX components per artifact:
    encoder  pixel_values (1, 3, S, S) -> image_embeddings (1, C, S/16, S/16); once per image
             (attention as onnxruntime's MultiHeadAttention unless export.fused_attention is false)
    decoder  image_embeddings + point_coords (1, P, N, 2) + point_labels (1, P, N)
             -> iou_scores (1, P, 4), low_res_masks (1, P, 4, S/4, S/4); once per prompt
Variants:
    fp32  both components as exported
    int8  the encoder with onnxruntime dynamic int8 MatMuls; the decoder stays fp32
          (it is ~30 ms per prompt at full size and carries the mask quality)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

import numpy as np

from ...config import Recipe, RecipeError
from ...runtime import sam_processing as sp
from ...runtime.artifact import make_session
from ...runtime.sam import SamPredictor, mask_iou
from ...sources import SourceError, weights_sha256
from ...store import StageContext, StageParams, StageSpec, link_or_copy
from ..common import (ORT_CUSTOM_OPSETS, SourceParams, builder_digest, count_parameters, existing_model_dir, fail_on,
                      model_dir_of, name_dims, ort_multihead_attention, publish_spec, record_check, source_params,
                      spec_factory)
from . import pocket
from .recipe import SamExportConfig, SamRecipe

HUB_FILES = ["config.json", "preprocessor_config.json", "*.safetensors"]
PREPROCESSOR = "preprocessor_config.json"
ENCODER, DECODER = "encoder.onnx", "decoder.onnx"

# The decoder's point label codes, as in the original SAM ONNX model. transformers'
# prompt encoder knows only -10/-1/0/1 for points and embeds boxes separately; our
# decoder wrapper adds the box-corner codes 2/3 so that one graph serves points,
# a box, and both (see PromptDecoder).
POINT_LABELS = {"negative": 0, "positive": 1, "padding": -1, "box_top_left": 2, "box_bottom_right": 3}
ENCODER_IO = {"input": "pixel_values", "output": "image_embeddings"}
DECODER_IO = {"image_embeddings": "image_embeddings", "point_coords": "point_coords", "point_labels": "point_labels",
              "iou_scores": "iou_scores", "low_res_masks": "low_res_masks"}


RUNTIME_KIND = "sam"
BUILDER_DIGEST = builder_digest(__file__, "runtime/sam.py", "runtime/sam_processing.py")


# ---- the plan: recipe -> stage specs ---------------------------------------


class SamSourceParams(SourceParams):
    initializer_range: float | None = None  # random: the spread of the seeded weights
    train: dict | None = None  # train: steps, examples, batch, learning_rate and the world (pocket.train_pocket)


class QuantizeParams(StageParams):
    op_types: tuple[str, ...]
    per_channel: bool
    reduce_range: bool
    weight_type: str = "QInt8"


class ValidateParams(StageParams):
    checks: tuple[Literal["parity", "vs_fp32"], ...]
    embeddings_atol: float  # parity
    min_mask_iou: float  # parity: ONNX vs PyTorch, every prompt and mask
    image: tuple[int, int]  # the synthetic validation picture (width, height)
    min_int8_mask_iou: float | None = None  # vs_fp32
    min_embedding_cosine: float | None = None  # vs_fp32
    # World-trained sources: the world oracle's pictures (pocket.world_mask_iou) and its floors.
    world: dict | None = None  # the world the model learnt (None: no world oracle)
    world_seed: int = pocket.HELD_OUT_SEED
    world_pictures: int = pocket.HELD_OUT_COUNT
    min_world_mask_iou: float | None = None
    max_world_mask_iou_drop: float | None = None  # vs_fp32: int8's IoU at most this far below fp32's


def plan(recipe: Recipe, project_dir: Path) -> dict[str, StageSpec]:
    """The publishing stage of each variant; each links to its upstream stages."""
    body: SamRecipe = recipe.body
    src = body.source
    extra = {"initializer_range": src.random.initializer_range} if src.kind == "random" else {}
    if src.kind == "train":
        extra = {"train": src.train.model_dump(exclude={"config", "seed"})}
    params = SamSourceParams(**source_params(recipe, project_dir), **extra)
    spec = spec_factory(recipe, BUILDER_DIGEST)
    source = spec("source", None, params, [], doc=f"{'train' if src.kind == 'train' else 'load ' + src.kind} SAM weights")
    export = spec("export", "fp32", body.export, [source], doc="export image encoder and prompt decoder")
    validate_common = {**body.validate_.model_dump(), "world": trained_world(params, project_dir)}
    if validate_common["world"] is None and body.validate_.min_world_mask_iou is not None:
        raise RecipeError(f"{recipe.name}: validate.min_world_mask_iou needs a model of the pocket world (a train "
                          "source, or a path folder with its training.json); remove it for this source")
    validates: dict[str, StageSpec] = {}
    for name, cfg in body.variants.enabled().items():
        if name == "fp32":
            validates[name] = spec("validate", name, ValidateParams(**validate_common, checks=("parity",)), [export],
                                   "check vs PyTorch")
        elif name == "int8":
            quant = spec("quantize", name, QuantizeParams(op_types=cfg.op_types, per_channel=cfg.per_channel,
                                                          reduce_range=cfg.reduce_range),
                         [export], doc="dynamic int8 of the encoder's MatMul weights")
            validates[name] = spec("validate", name, ValidateParams(**validate_common, checks=("vs_fp32",),
                                                                    min_int8_mask_iou=cfg.min_mask_iou,
                                                                    min_embedding_cosine=cfg.min_embedding_cosine,
                                                                    max_world_mask_iou_drop=cfg.max_world_mask_iou_drop),
                                   [quant], "compare with fp32")
    return {name: publish_spec(spec, name, v, runtime_defaults(body.runtime.model_dump(mode="json")))
            for name, v in validates.items()}


def trained_world(params: SamSourceParams, project_dir: Path) -> dict | None:
    """The pocket world a source's model learnt: a train source's, or the one a path folder's training.json
    names (a pocket model trained elsewhere and read back); None for any other model (no world oracle)."""
    if params.kind == "train":
        return params.train["world"]
    if params.kind == "path":
        record = pocket.training_record(Path(params.path))
        if record and record.get("trained_on") == "world":
            return record["world"]
    return None


def runtime_defaults(r: dict) -> dict:
    """The recipe's runtime section in the manifest's runtime-block shape (added when publishing)."""
    return {"mask_threshold": r["mask_threshold"],
            "everything": {k: r[k] for k in ("points_per_side", "points_per_batch", "pred_iou_threshold",
                                             "stability_threshold", "stability_offset", "nms_threshold",
                                             "min_region_area")}}


# ---- source -------------------------------------------------------------------


def random_sam(config: dict, seed: int, initializer_range: float):
    """SamModel with seeded weights drawn with `initializer_range` in every sub-model."""
    import torch
    from transformers import SamConfig, SamModel

    cfg = json.loads(json.dumps(config))  # deep copy: the recipe's dict stays as written
    cfg["initializer_range"] = initializer_range
    cfg.setdefault("vision_config", {})["initializer_range"] = initializer_range
    with torch.random.fork_rng():  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = SamModel(SamConfig(**cfg))
    return model.eval()


def check_architecture(config) -> None:
    """The sizes the export and runtime rely on agree (a random config can get them wrong)."""
    v, p, d = config.vision_config, config.prompt_encoder_config, config.mask_decoder_config
    if v.image_size != p.image_size or v.patch_size != p.patch_size:
        raise RecipeError(f"source.random.config: vision and prompt encoder disagree on image_size/patch_size "
                          f"({v.image_size}/{v.patch_size} vs {p.image_size}/{p.patch_size})")
    if not v.output_channels == p.hidden_size == d.hidden_size:
        raise RecipeError(f"source.random.config: vision_config.output_channels ({v.output_channels}), prompt encoder "
                          f"hidden_size ({p.hidden_size}) and mask decoder hidden_size ({d.hidden_size}) must be equal")
    if v.image_size % v.patch_size:
        raise RecipeError(f"source.random.config: image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")


def source_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    p = spec.params
    if p.kind == "random":
        from transformers import SamImageProcessor

        model = random_sam(p.config, p.seed, p.initializer_range)
        check_architecture(model.config)
        model_dir = out / "model"
        model.save_pretrained(model_dir)
        # The processor config carries the input size and pixel mean/std, as on the Hub.
        size = model.config.vision_config.image_size
        SamImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size}).save_pretrained(model_dir)
        source = {"kind": "random", "seed": p.seed, "initializer_range": p.initializer_range, "config": p.config}
        rel = "model"
    elif p.kind == "train":
        model_dir = out / "model"
        t = p.train
        record = pocket.train_pocket(model_dir, seed=p.seed, steps=t["steps"], examples=t["examples"], batch=t["batch"],
                                     learning_rate=t["learning_rate"], config=p.config, world=t["world"],
                                     # stderr: a build stage keeps stdout's chatter for failures only
                                     log=lambda line: print(line, file=sys.stderr, flush=True))
        check_architecture(load_torch_model(model_dir).config)
        source = {"kind": "train", "seed": p.seed, "config": p.config, **t,
                  "seconds": record["seconds"], "torch_world_mask_iou": record["torch_world_mask_iou"]["mean"]}
        rel = "model"
    else:
        model_dir, source = existing_model_dir(p, ctx, HUB_FILES)
        if not any(model_dir.glob("*.safetensors")):  # only safetensors are fetched (not also the .bin copy)
            raise SourceError(f"{model_dir}: no *.safetensors weights; pin a revision that has model.safetensors "
                              f"or use a local `path:` source")
        rel = str(model_dir)
    source["weights_sha256"] = weights_sha256(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    v, d = config.get("vision_config", {}), config.get("mask_decoder_config", {})
    source["architecture"] = {"vision_hidden_size": v.get("hidden_size"), "vision_layers": v.get("num_hidden_layers"),
                              "vision_heads": v.get("num_attention_heads"), "image_size": v.get("image_size"),
                              "patch_size": v.get("patch_size"), "output_channels": v.get("output_channels"),
                              "decoder_hidden_size": d.get("hidden_size")}
    return {"model_dir": rel, "source": source, "recorded": {"parameters": count_parameters(model_dir)}}


def load_torch_model(model_dir: Path):
    from transformers import SamModel

    # eager attention: plain MatMul + Softmax in the graph (what int8 quantizes), and the parity reference
    model = SamModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    check_architecture(model.config)
    return model


def image_processor_settings(model_dir: Path, image_size: int) -> dict:
    """Pixel mean/std from the repo's preprocessor_config.json (SAM's ImageNet values if absent)."""
    from transformers import SamImageProcessor

    default = SamImageProcessor()
    cfg = json.loads((model_dir / PREPROCESSOR).read_text()) if (model_dir / PREPROCESSOR).is_file() else {}
    mean = [float(x) for x in cfg.get("image_mean", default.image_mean)]
    std = [float(x) for x in cfg.get("image_std", default.image_std)]
    return {"pixel_mean": mean, "pixel_std": std, "image_size": image_size}


def reference_processor(model_dir: Path, image_size: int):
    """transformers' SamProcessor at this model's input size: the PyTorch-side reference."""
    from transformers import SamImageProcessor, SamProcessor

    s = image_processor_settings(model_dir, image_size)
    ip = SamImageProcessor(size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size},
                           image_mean=s["pixel_mean"], image_std=s["pixel_std"])
    return SamProcessor(image_processor=ip)


# ---- export -------------------------------------------------------------------


def _encoder_wrapper(model):
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_encoder = model.vision_encoder

        def forward(self, pixel_values):
            return self.vision_encoder(pixel_values).last_hidden_state

    return Encoder()


def _decoder_wrapper(model):
    """Prompt encoder + mask decoder of one SamModel as one module with flat inputs.

    Why not call SamModel.forward: (1) transformers embeds a box apart from the
    points, so points, a box and both would need three graphs; SAM's own ONNX
    model instead feeds box corners as points labelled 2 and 3, which this
    wrapper does with the model's own point_embed[2]/[3] (the vectors
    transformers adds to box corners), giving the same sparse tokens in the
    same order. (2) SamMaskDecoder.forward drops either the single-mask token
    or the three multimask ones; the runtime wants both modes from one graph,
    so this composes the decoder's submodules and returns all four tokens.
    Both points are checked against SamModel.forward in validation.
    """
    import torch

    prompt, dec = model.prompt_encoder, model.mask_decoder
    size = prompt.input_image_size

    class PromptDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.prompt, self.dec = prompt, dec
            # Constant for a given model: computed once here, stored in the graph.
            self.register_buffer("image_pe", model.get_image_wide_positional_embeddings().detach().clone())

        def forward(self, image_embeddings, point_coords, point_labels):
            # Sparse prompt tokens, as SamPromptEncoder._embed_points/_embed_boxes build them.
            tokens = self.prompt.shared_embedding(point_coords + 0.5, (size, size))  # +0.5: pixel centres
            labels = point_labels[..., None]
            tokens = torch.where(labels == POINT_LABELS["padding"], self.prompt.not_a_point_embed.weight, tokens)
            for code in range(len(self.prompt.point_embed)):  # 0 neg, 1 pos, 2/3 box corners
                tokens = torch.where(labels == code, tokens + self.prompt.point_embed[code].weight, tokens)
            n_prompts = tokens.shape[1]
            _, channels, height, width = image_embeddings.shape

            # Mask decoder (SamMaskDecoder.forward, keeping all mask tokens).
            output_tokens = torch.cat([self.dec.iou_token.weight, self.dec.mask_tokens.weight], dim=0)
            queries = torch.cat([output_tokens.repeat(1, n_prompts, 1, 1), tokens], dim=2)
            dense = self.prompt.no_mask_embed.weight.reshape(1, -1, 1, 1)  # no mask prompt
            image = (image_embeddings + dense).repeat_interleave(n_prompts, 0)
            image_pe = self.image_pe.repeat_interleave(n_prompts, 0)
            queries, keys = self.dec.transformer(point_embeddings=queries, image_embeddings=image,
                                                 image_positional_embeddings=image_pe, attention_similarity=None)
            iou_token = queries[:, :, 0, :]
            mask_tokens = queries[:, :, 1:1 + self.dec.num_mask_tokens, :]
            image = keys.transpose(2, 3).reshape(n_prompts, channels, height, width)
            up = self.dec.activation(self.dec.upscale_layer_norm(self.dec.upscale_conv1(image)))
            up = self.dec.activation(self.dec.upscale_conv2(up))
            hyper = torch.stack([mlp(mask_tokens[:, :, i, :]) for i, mlp in enumerate(self.dec.output_hypernetworks_mlps)],
                                dim=2)
            _, up_channels, up_h, up_w = up.shape
            masks = (hyper @ up.reshape(1, n_prompts, up_channels, up_h * up_w)).reshape(1, n_prompts, -1, up_h, up_w)
            return self.dec.iou_prediction_head(iou_token), masks

    return PromptDecoder()


def fuse_vision_attention(model) -> None:
    """Make each encoder attention export as onnxruntime's MultiHeadAttention (export.fused_attention).

    transformers' SamVisionAttention computes scores, adds the decomposed relative-position bias
    (rel_h[..., None] + rel_w[..., None, :]) and applies softmax as separate ops, each writing a full
    heads x 4096 x 4096 tensor in the global-attention layers. Here the same bias is built once and
    handed to MultiHeadAttention as its attention_bias. PyTorch computes the same attention (sdpa
    with that bias as an additive mask), so the export's parity check still holds it to the model.
    """
    import types

    MultiHeadAttention = ort_multihead_attention()

    def forward(self, hidden_states, output_attentions=None):  # SamVisionAttention.forward, fused
        batch, height, width, dim = hidden_states.shape
        heads = self.num_attention_heads
        q, k, v = self.qkv(hidden_states).reshape(batch, height * width, 3, dim).unbind(2)
        per_head_q = q.reshape(batch, height * width, heads, -1).transpose(1, 2).reshape(batch * heads, height * width, -1)
        bias = self.get_decomposed_rel_pos(per_head_q, self.rel_pos_h, self.rel_pos_w, (height, width), (height, width))
        out = MultiHeadAttention.apply(q, k, v, bias.reshape(batch, heads, height * width, height * width), heads,
                                       float(self.scale))
        return self.proj(out.reshape(batch, height, width, dim)), None

    for layer in model.vision_encoder.layers:
        if not layer.attn.use_rel_pos:
            raise NotImplementedError("fused_attention expects SAM's relative-position attention; "
                                      "set export.fused_attention: false for this model")
        layer.attn.forward = types.MethodType(forward, layer.attn)


def export_sam(model, out: Path, opset: int, fused_attention: bool = False) -> None:
    """torch.onnx.export (TorchScript) of the encoder and the prompt decoder.

    Why TorchScript rather than dynamo: both give the same numbers here (embeddings
    and masks to ~1e-5 of PyTorch), but dynamo took ~25 s for the tiny model and
    TorchScript ~3 s; the graphs have no data-dependent control flow, and their
    dynamic dims (prompts, points per prompt) are plain dynamic_axes.
    fused_attention: the encoder's attention as MultiHeadAttention (fuse_vision_attention).
    """
    import torch

    vc = model.config.vision_config
    pixels = torch.zeros(1, vc.num_channels, vc.image_size, vc.image_size)
    with torch.no_grad():
        encoder = _encoder_wrapper(model)
        if fused_attention:
            fuse_vision_attention(model)
        torch.onnx.export(encoder, (pixels,), str(out / ENCODER), input_names=[ENCODER_IO["input"]],
                          output_names=[ENCODER_IO["output"]], opset_version=opset, dynamo=False,
                          custom_opsets=ORT_CUSTOM_OPSETS if fused_attention else None)
        embeddings = model.get_image_embeddings(pixels)
        # Example: 2 prompts x 3 tokens (a point, a negative point, SAM's padding point).
        coords = torch.tensor([[[[10.0, 20.0], [30.0, 5.0], [0.0, 0.0]]] * 2])
        labels = torch.tensor([[[1, 0, -1]] * 2])
        dyn = {DECODER_IO["point_coords"]: {1: "prompts", 2: "points"}, DECODER_IO["point_labels"]: {1: "prompts", 2: "points"},
               DECODER_IO["iou_scores"]: {1: "prompts"}, DECODER_IO["low_res_masks"]: {1: "prompts"}}
        torch.onnx.export(_decoder_wrapper(model), (embeddings, coords, labels), str(out / DECODER),
                          input_names=[DECODER_IO[k] for k in ("image_embeddings", "point_coords", "point_labels")],
                          output_names=[DECODER_IO["iou_scores"], DECODER_IO["low_res_masks"]],
                          dynamic_axes=dyn, opset_version=opset, dynamo=False)
    # The exporter names output dims after the ops that made them; give them readable ones.
    tokens, grid = model.mask_decoder.num_mask_tokens, vc.image_size // vc.patch_size
    name_dims(out / ENCODER, {ENCODER_IO["output"]: [1, vc.output_channels, grid, grid]})
    name_dims(out / DECODER, {DECODER_IO["iou_scores"]: [1, "prompts", tokens],
                                     DECODER_IO["low_res_masks"]: [1, "prompts", tokens, 4 * grid, 4 * grid]})


def export_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    model_dir = model_dir_of(ctx, spec, "source")
    model = load_torch_model(model_dir)
    export_sam(model, out, spec.params.opset, spec.params.fused_attention)
    return {"encoder": ENCODER, "decoder": DECODER, "model_dir": str(model_dir)}


# ---- quantize -----------------------------------------------------------------


def quantize_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    """Dynamic int8 of the encoder's weight MatMuls (activation x activation MatMuls stay float).

    Why dynamic, not static: on this CPU static QDQ of the weight MatMuls measured
    about the same speed as dynamic (see STACK-NOTES), and it needs calibration
    images; dynamic made the SAM ViT-B encoder 1.8x faster.
    """
    from ...quantize import dynamic_int8

    src = ctx.upstream_dir(spec, "export")
    p = spec.params
    dynamic_int8(src / ENCODER, out / ENCODER, op_types=list(p.op_types), per_channel=p.per_channel,
                 reduce_range=p.reduce_range)
    link_or_copy(src / DECODER, out / DECODER)
    return {"encoder": ENCODER, "decoder": DECODER,
            "recorded": {"encoder_fp32_bytes": (src / ENCODER).stat().st_size,
                         "encoder_int8_bytes": (out / ENCODER).stat().st_size}}


# ---- validate + publish ---------------------------------------------------------


def validation_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic synthetic picture: a gradient with a few filled shapes (uint8 HxWx3)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    base = np.stack([60 + 80 * xx / max(1, width - 1), 90 + 60 * yy / max(1, height - 1),
                     np.full(xx.shape, 140.0)], axis=-1)
    image = Image.fromarray((base + rng.normal(0, 4, base.shape)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    w, h = width, height
    draw.ellipse([0.15 * w, 0.25 * h, 0.45 * w, 0.6 * h], fill=(220, 60, 50))
    draw.rectangle([0.55 * w, 0.2 * h, 0.9 * w, 0.7 * h], fill=(40, 160, 70))
    draw.polygon([(0.2 * w, 0.95 * h), (0.4 * w, 0.7 * h), (0.6 * w, 0.95 * h)], fill=(240, 220, 60))
    return np.asarray(image)


def validation_prompts(width: int, height: int) -> dict[str, dict]:
    """Named prompts in original pixels: point, points with a negative one, box, box with a point."""
    w, h = width, height
    return {
        "point": {"points": [(0.3 * w, 0.42 * h)], "labels": [1]},
        "point single-mask": {"points": [(0.3 * w, 0.42 * h)], "labels": [1], "multimask": False},
        "points +/-": {"points": [(0.3 * w, 0.42 * h), (0.72 * w, 0.45 * h)], "labels": [1, 0]},
        "box": {"box": (0.55 * w, 0.2 * h, 0.9 * w, 0.7 * h)},
        "box + point": {"points": [(0.7 * w, 0.45 * h)], "labels": [1], "box": (0.5 * w, 0.15 * h, 0.95 * w, 0.75 * h)},
    }


def torch_reference_masks(model, processor, embeddings, image_sizes, prompt: dict):
    """SamModel.forward on torch embeddings, prompts normalized and masks post-processed by SamProcessor."""
    import torch

    original_size, reshaped_size = image_sizes
    target = processor.image_processor.size["longest_edge"]
    kwargs = {}
    if prompt.get("points"):
        pts = processor._normalize_coordinates(target, np.asarray(prompt["points"], dtype=np.float64), original_size)
        kwargs["input_points"] = torch.tensor(pts, dtype=torch.float32)[None, None]
        kwargs["input_labels"] = torch.tensor(prompt["labels"], dtype=torch.long)[None, None]
    if prompt.get("box") is not None:
        box = processor._normalize_coordinates(target, np.asarray([prompt["box"]], dtype=np.float64), original_size,
                                               is_bounding_box=True)
        kwargs["input_boxes"] = torch.tensor(box, dtype=torch.float32)[None]
    with torch.no_grad():
        out = model(image_embeddings=embeddings, multimask_output=prompt.get("multimask", True), **kwargs)
    masks = processor.image_processor.post_process_masks(out.pred_masks, [original_size], [reshaped_size])[0][0]
    return masks.numpy(), out.iou_scores[0, 0].numpy(), out.pred_masks[0, 0].numpy()


def runtime_block(config, model_dir: Path) -> dict:
    """What the runtime needs from the model's SamConfig (it never imports transformers); the recipe's
    defaults (mask threshold, everything-mode settings) are added when publishing."""
    vc = config.vision_config
    size = vc.image_size
    grid = size // vc.patch_size
    return {
        "kind": RUNTIME_KIND,
        **image_processor_settings(model_dir, size),  # image_size, pixel_mean, pixel_std
        "embedding_shape": [1, vc.output_channels, grid, grid],
        "low_res_mask_size": 4 * grid,
        "encoder_io": ENCODER_IO,
        "decoder_io": DECODER_IO,
        "point_labels": POINT_LABELS,
        "multimask_outputs": [1, 2, 3],  # decoder mask tokens 1-3: SAM's multimask output
        "single_mask_output": 0,  # token 0: SAM's multimask_output=False
    }


def onnx_segmenter(predictor: SamPredictor):
    """The world oracle's `segment(picture, point)` through the runtime: the mask it rates best for a point."""

    def segment(picture, point):
        predictor.set_image(picture)
        return predictor.best_mask(points=[point])[0]

    return segment


def validate_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    import torch
    from transformers import SamConfig

    p = spec.params
    int8 = "vs_fp32" in p.checks
    producer = ctx.upstream_dir(spec, "quantize" if int8 else "export")
    for name in (ENCODER, DECODER):
        link_or_copy(producer / name, out / name)
    export_dir = ctx.upstream_dir(spec, "export")
    model_dir = Path(ctx.upstream_record(spec, "export")["model_dir"])
    runtime = runtime_block(SamConfig.from_pretrained(model_dir), model_dir)
    # Validation segments with the default settings; the published block carries the recipe's.
    runtime_check = {**runtime, **runtime_defaults(SamRecipe.model_fields["runtime"].default.model_dump(mode="json"))}
    predictor = SamPredictor.from_sessions(make_session(out / ENCODER, low_memory=True), make_session(out / DECODER), runtime_check)
    width, height = p.image
    image = validation_image(width, height)
    prompts = validation_prompts(width, height)
    predictor.set_image(image)
    checks: list[dict] = []
    results: dict = {"checks": checks, "image": [width, height], "prompts": {}}

    if int8:
        fp32 = SamPredictor.from_sessions(make_session(export_dir / ENCODER, low_memory=True),
                                          make_session(export_dir / DECODER), runtime_check)
        fp32.set_image(image)
        a, b = predictor.embeddings.reshape(-1).astype(np.float64), fp32.embeddings.reshape(-1).astype(np.float64)
        cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        results["embeddings_max_abs_diff_vs_fp32"] = float(np.abs(a - b).max())
        ious = []
        for name, pr in prompts.items():
            ours, _ = predictor.predict(pr.get("points"), pr.get("labels"), pr.get("box"), pr.get("multimask", True))
            ref, _ = fp32.predict(pr.get("points"), pr.get("labels"), pr.get("box"), pr.get("multimask", True))
            per_mask = [mask_iou(x, y) for x, y in zip(ours, ref)]
            ious += per_mask
            results["prompts"][name] = {"mask_iou_vs_fp32": [round(v, 5) for v in per_mask]}
        mean_iou = float(np.mean(ious))
        results["mask_iou_vs_fp32"] = {"mean": round(mean_iou, 5), "min": round(float(np.min(ious)), 5)}
        record_check(checks, "embedding cosine vs fp32 ONNX", round(cosine, 6), p.min_embedding_cosine,
               cosine >= p.min_embedding_cosine)
        record_check(checks, "mean mask IoU vs fp32 ONNX (all prompts, all masks)", round(mean_iou, 5), p.min_int8_mask_iou,
               mean_iou >= p.min_int8_mask_iou)
    else:
        model = load_torch_model(model_dir)
        processor = reference_processor(model_dir, runtime["image_size"])
        ref_inputs = processor(images=image, return_tensors="pt")
        sizes = (tuple(int(v) for v in ref_inputs["original_sizes"][0]), tuple(int(v) for v in ref_inputs["reshaped_input_sizes"][0]))
        with torch.no_grad():
            ref_emb = model.get_image_embeddings(ref_inputs["pixel_values"])
        pixels, _, _ = sp.preprocess(image, runtime["image_size"], runtime["pixel_mean"], runtime["pixel_std"])
        results["pixel_values_max_abs_diff"] = float(np.abs(pixels - ref_inputs["pixel_values"].numpy()).max())
        emb_diff = float(np.abs(predictor.embeddings - ref_emb.numpy()).max())
        record_check(checks, "image embeddings max abs diff vs PyTorch", emb_diff, p.embeddings_atol, emb_diff <= p.embeddings_atol)
        worst_iou, worst_logits = 1.0, 0.0
        for name, pr in prompts.items():
            mm = pr.get("multimask", True)
            ref_masks, ref_scores, ref_low = torch_reference_masks(model, processor, ref_emb, sizes, pr)
            masks, scores = predictor.predict(pr.get("points"), pr.get("labels"), pr.get("box"), mm)
            # The decoder alone, on PyTorch's embeddings: isolates the decoder graph from the encoder.
            coords, codes = predictor.prompt_tokens(pr.get("points"), pr.get("labels"), pr.get("box"))
            _, low = predictor.decode(coords[None], codes[None], embeddings=ref_emb.numpy())
            low = low[0, predictor.mask_outputs(mm)]
            per_mask = [mask_iou(x, y) for x, y in zip(masks, ref_masks)]
            logits_diff = float(np.abs(low - ref_low).max())
            worst_iou, worst_logits = min(worst_iou, *per_mask), max(worst_logits, logits_diff)
            results["prompts"][name] = {"mask_iou": [round(v, 5) for v in per_mask],
                                        "iou_scores_max_abs_diff": float(np.abs(scores - ref_scores).max()),
                                        "decoder_logits_max_abs_diff": logits_diff}
        results["decoder_logits_max_abs_diff"] = worst_logits
        record_check(checks, "min mask IoU vs PyTorch (point, points +/-, box, box + point; every mask)", round(worst_iou, 5),
               p.min_mask_iou, worst_iou >= p.min_mask_iou)
    results["encoder_runs"] = predictor.encoder_runs  # one: every prompt reused the cached embedding

    if p.world is not None:  # a model of the pocket world: its masks against the rendered ones
        world = pocket.world_config(p.world)
        score = pocket.world_mask_iou(onnx_segmenter(predictor), world, p.world_seed, p.world_pictures)
        results["world_mask_iou"] = score
        if p.min_world_mask_iou is not None:
            record_check(checks, "world mask IoU (held-out world pictures, a point on each shape)", score["mean"],
                         p.min_world_mask_iou, score["mean"] >= p.min_world_mask_iou)
        if int8:
            reference = pocket.world_mask_iou(onnx_segmenter(fp32), world, p.world_seed, p.world_pictures)
            results["world_mask_iou_fp32"] = reference
            drop = round(reference["mean"] - score["mean"], 5)
            results["world_mask_iou_drop_vs_fp32"] = drop
            if p.max_world_mask_iou_drop is not None:
                record_check(checks, "world mask IoU drop vs fp32", drop, p.max_world_mask_iou_drop,
                             drop <= p.max_world_mask_iou_drop)

    results["checks_run"] = list(p.checks)
    fail_on(checks, results)
    return {"components": {"encoder": ENCODER, "decoder": DECODER}, "validation": results, "runtime": runtime}
