"""SAM 2.1 (transformers' Sam2Model, Hiera image encoder): source, export, quantize and validate stages.

Two ONNX components per variant, at the variant's encoder input size S (a multiple of 32):
    encoder  pixel_values (1, 3, S, S) -> high_res_feats_0 (1, C/8, S/4, S/4), high_res_feats_1
             (1, C/4, S/8, S/8), image_embeddings (1, C, S/16, S/16); once per image. The
             high-resolution features are Sam2Model.get_image_embeddings' first two maps (already
             through the decoder's conv_s0/conv_s1), the embedding has the no-memory token added.
    decoder  the three maps + point_coords (1, P, N, 2) + point_labels (1, P, N)
             -> iou_scores (1, P, 4), low_res_masks (1, P, 4, S/4, S/4); P prompts in one call
Variants (recipe `variants:`): any name -> image_size, and int8 (dynamic int8 MatMuls of the
encoder; the decoder stays fp32). Sizes other than the model's own (1024) run the same weights:
Hiera interpolates its position embedding to the feature grid; validation records the mask IoU
against the model's own size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np

from ...config import Recipe, RecipeError
from ...runtime import sam_processing as sp
from ...runtime.artifact import make_session
from ...runtime.sam import Sam2Predictor, mask_iou
from ...sources import SourceError, weights_sha256
from ...store import StageContext, StageParams, StageSpec, link_or_copy
from ..common import (SourceParams, builder_digest, count_parameters, existing_model_dir, fail_on, model_dir_of,
                      name_dims, publish_spec, record_check, source_params, spec_factory)
from ..sam.build import runtime_defaults, validation_image, validation_prompts
from .recipe import SIZE_MULTIPLE, Sam2Recipe

HUB_FILES = ["config.json", "preprocessor_config.json", "*.safetensors"]
ENCODER, DECODER = "encoder.onnx", "decoder.onnx"
RUNTIME_KIND = "sam2"
BUILDER_DIGEST = builder_digest(__file__, "runtime/sam.py", "runtime/sam_processing.py")

# transformers' Sam2 prompt encoder: -1 "not a point" (the padding point), 0 negative, 1 positive,
# 2/3 box corners (its point_embed rows; _embed_boxes adds the same rows to the corners).
POINT_LABELS = {"negative": 0, "positive": 1, "padding": -1, "box_top_left": 2, "box_bottom_right": 3}
FEATURES = ["high_res_feats_0", "high_res_feats_1", "image_embeddings"]  # get_image_embeddings' order
ENCODER_IO = {"input": "pixel_values", "outputs": FEATURES}
DECODER_IO = {"features": {f: f for f in FEATURES}, "image_embeddings": "image_embeddings",
              "point_coords": "point_coords", "point_labels": "point_labels",
              "iou_scores": "iou_scores", "low_res_masks": "low_res_masks"}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # Sam2ImageProcessorFast's


# ---- the plan -----------------------------------------------------------------


class Sam2SourceParams(SourceParams):
    initializer_range: float | None = None


class ExportParams(StageParams):
    opset: int
    image_size: int


class QuantizeParams(StageParams):
    op_types: tuple[str, ...]
    per_channel: bool
    reduce_range: bool


class ValidateParams(StageParams):
    checks: tuple[Literal["parity", "vs_fp32"], ...]
    image_size: int
    embeddings_atol: float
    min_mask_iou: float
    image: tuple[int, int]
    min_iou_vs_native_size: float = 0.0
    min_int8_mask_iou: float | None = None
    min_embedding_cosine: float | None = None


def plan(recipe: Recipe, project_dir: Path) -> dict[str, StageSpec]:
    body: Sam2Recipe = recipe.body
    src = body.source
    extra = {"initializer_range": src.random.initializer_range} if src.kind == "random" else {}
    spec = spec_factory(recipe, BUILDER_DIGEST)
    source = spec("source", None, Sam2SourceParams(**source_params(recipe, project_dir), **extra), [],
                  doc=f"load {src.kind} SAM 2 weights")
    exports: dict[int, StageSpec] = {}
    v = body.validate_
    out = {}
    for name, cfg in body.variants.items():
        size = cfg.image_size
        if size not in exports:
            exports[size] = spec("export", f"fp32-{size}", ExportParams(opset=body.export.opset, image_size=size),
                                 [source], doc=f"export encoder and prompt decoder at {size} px")
        common = dict(image_size=size, embeddings_atol=v.embeddings_atol, min_mask_iou=v.min_mask_iou, image=v.image,
                      min_iou_vs_native_size=cfg.min_iou_vs_native_size)
        if cfg.int8 is None:
            check = spec("validate", name, ValidateParams(checks=("parity",), **common), [exports[size]],
                         "check vs PyTorch")
        else:
            q = cfg.int8
            quant = spec("quantize", name, QuantizeParams(op_types=q.op_types, per_channel=q.per_channel,
                                                          reduce_range=q.reduce_range),
                         [exports[size]], doc="dynamic int8 of the encoder's MatMul weights")
            check = spec("validate", name, ValidateParams(checks=("vs_fp32",), min_int8_mask_iou=q.min_mask_iou,
                                                          min_embedding_cosine=q.min_embedding_cosine, **common),
                         [quant], "compare with fp32")
        out[name] = publish_spec(spec, name, check, runtime_defaults(body.runtime.model_dump(mode="json")))
    return out


# ---- source ---------------------------------------------------------------------


def sized_config(config, size: int):
    """A copy of a Sam2Config whose encoder input, feature grids and prompt frame are size x size."""
    from transformers import Sam2Config

    cfg = Sam2Config.from_dict(config.to_dict())
    cfg.vision_config.backbone_config.image_size = [size, size]
    cfg.vision_config.backbone_feature_sizes = [[size // 4] * 2, [size // 8] * 2, [size // 16] * 2]
    cfg.prompt_encoder_config.image_size = size
    return cfg


def random_sam2(config: dict, seed: int, initializer_range: float):
    """Sam2Model with seeded weights, including the ones transformers zero-initializes (the Hiera position
    embeddings and the no-memory token): zeros there would hide the position interpolation at other sizes."""
    import torch
    from transformers import Sam2Config, Sam2Model

    cfg = Sam2Config(**json.loads(json.dumps(config)))
    cfg.initializer_range = initializer_range
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Sam2Model(cfg)
        backbone = model.vision_encoder.backbone
        with torch.no_grad():
            for p in (backbone.pos_embed, backbone.pos_embed_window, model.no_memory_embedding):
                p.normal_(0.0, initializer_range)
    return model.eval()


def check_architecture(config) -> None:
    """The sizes the export and the runtime rely on agree (a random config can get them wrong)."""
    size = config.prompt_encoder_config.image_size
    bb = config.vision_config.backbone_config
    if list(bb.image_size) != [size, size]:
        raise RecipeError(f"source.random.config: vision backbone image_size {bb.image_size} and prompt encoder "
                          f"image_size {size} disagree")
    if size % SIZE_MULTIPLE:
        raise RecipeError(f"source.random.config: image_size {size} is not a multiple of {SIZE_MULTIPLE}")
    hidden = config.mask_decoder_config.hidden_size
    if not config.vision_config.fpn_hidden_size == config.prompt_encoder_config.hidden_size == hidden:
        raise RecipeError("source.random.config: vision fpn_hidden_size, prompt encoder and mask decoder hidden_size "
                          "must be equal")


def source_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    p = spec.params
    if p.kind == "random":
        model = random_sam2(p.config, p.seed, p.initializer_range)
        check_architecture(model.config)
        model_dir = out / "model"
        model.save_pretrained(model_dir)
        source = {"kind": "random", "seed": p.seed, "initializer_range": p.initializer_range, "config": p.config}
        rel = "model"
    else:
        model_dir, source = existing_model_dir(p, ctx, HUB_FILES)
        if not any(model_dir.glob("*.safetensors")):
            raise SourceError(f"{model_dir}: no *.safetensors weights; pin a revision of the repo that has the "
                              f"transformers-format model.safetensors, or use a local `path:` source")
        rel = str(model_dir)
    source["weights_sha256"] = weights_sha256(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    bb = config.get("vision_config", {}).get("backbone_config", {})
    source["architecture"] = {"embed_dim_per_stage": bb.get("embed_dim_per_stage"),
                              "blocks_per_stage": bb.get("blocks_per_stage"), "image_size": bb.get("image_size"),
                              "decoder_hidden_size": config.get("mask_decoder_config", {}).get("hidden_size")}
    return {"model_dir": rel, "source": source, "recorded": {"parameters": count_parameters(model_dir)}}


def load_torch_model(model_dir: Path, size: int | None = None):
    """Sam2Model from a folder, at its own input size or at `size` (same weights)."""
    from transformers import Sam2Config, Sam2Model

    config = Sam2Config.from_pretrained(model_dir)
    check_architecture(config)
    if size is not None:
        config = sized_config(config, size)
    # eager attention: plain MatMul + Softmax in the graph (what int8 quantizes), and the parity reference
    return Sam2Model.from_pretrained(model_dir, config=config, attn_implementation="eager").eval()


def native_size(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["prompt_encoder_config"].get("image_size", 1024))


def pixel_settings(model_dir: Path) -> dict:
    """Pixel mean/std from the repo's preprocessor_config.json (ImageNet's, Sam2ImageProcessorFast's default)."""
    f = model_dir / "preprocessor_config.json"
    cfg = json.loads(f.read_text()) if f.is_file() else {}
    return {"pixel_mean": [float(x) for x in cfg.get("image_mean", IMAGENET_MEAN)],
            "pixel_std": [float(x) for x in cfg.get("image_std", IMAGENET_STD)]}


# ---- export ---------------------------------------------------------------------


def _encoder_wrapper(model):
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return tuple(self.model.get_image_embeddings(pixel_values))

    return Encoder()


def _decoder_wrapper(model):
    """Prompt encoder + mask decoder of one Sam2Model as one module with flat inputs, all four mask tokens out.

    Points and box corners arrive as labelled points (1/0 points, 2/3 corners, -1 the padding point):
    transformers' _embed_points adds point_embed[label] for labels >= 0, which for 2 and 3 is exactly what
    _embed_boxes adds to box corners, so one graph serves points, boxes and both (the runtime orders the
    tokens as Sam2Model does: points, corners, padding point). The mask decoder is composed from its
    submodules as Sam2MaskDecoder.forward does, but returns every mask token (forward drops token 0 or
    1-3), so single- and multi-mask modes are slices. Validation compares both with Sam2Model.forward.
    """
    import torch

    prompt, dec = model.prompt_encoder, model.mask_decoder

    class PromptDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.prompt, self.dec = prompt, dec
            self.register_buffer("image_pe", model.get_image_wide_positional_embeddings().detach().clone())

        def forward(self, high_res_feats_0, high_res_feats_1, image_embeddings, point_coords, point_labels):
            sparse = self.prompt._embed_points(point_coords, point_labels, pad=False)
            n_prompts = sparse.shape[1]
            _, channels, height, width = image_embeddings.shape
            output_tokens = torch.cat([self.dec.obj_score_token.weight, self.dec.iou_token.weight,
                                       self.dec.mask_tokens.weight], dim=0)
            tokens = torch.cat([output_tokens.repeat(1, n_prompts, 1, 1), sparse], dim=2)
            dense = self.prompt.no_mask_embed.weight.reshape(1, -1, 1, 1)
            image = (image_embeddings + dense).repeat_interleave(n_prompts, 0)
            image_pe = self.image_pe.repeat_interleave(n_prompts, 0)
            tokens, keys = self.dec.transformer(point_embeddings=tokens, image_embeddings=image,
                                                image_positional_embeddings=image_pe, attention_similarity=None,
                                                target_embedding=None)
            iou_token = tokens[:, :, 1, :]
            mask_tokens = tokens[:, :, 2:2 + self.dec.num_mask_tokens, :]
            image = keys.transpose(2, 3).reshape(n_prompts, channels, height, width)
            up = self.dec.upscale_conv1(image) + high_res_feats_1.repeat_interleave(n_prompts, 0)
            up = self.dec.activation(self.dec.upscale_layer_norm(up))
            up = self.dec.activation(self.dec.upscale_conv2(up) + high_res_feats_0.repeat_interleave(n_prompts, 0))
            hyper = torch.stack([mlp(mask_tokens[:, :, i, :]) for i, mlp in enumerate(self.dec.output_hypernetworks_mlps)],
                                dim=2)
            _, up_channels, up_h, up_w = up.shape
            masks = (hyper @ up.reshape(1, n_prompts, up_channels, up_h * up_w)).reshape(1, n_prompts, -1, up_h, up_w)
            return self.dec.iou_prediction_head(iou_token), masks

    return PromptDecoder()


def export_sam2(model, out: Path, opset: int) -> None:
    """torch.onnx.export (TorchScript, as the SAM family: same numbers as dynamo here, seconds instead of
    minutes) of the encoder and the prompt decoder; the decoder's prompts and points axes are dynamic."""
    import torch

    size = model.config.prompt_encoder_config.image_size
    pixels = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        torch.onnx.export(_encoder_wrapper(model), (pixels,), str(out / ENCODER), input_names=[ENCODER_IO["input"]],
                          output_names=FEATURES, opset_version=opset, dynamo=False)
        feats = model.get_image_embeddings(pixels)
        coords = torch.tensor([[[[10.0, 20.0], [30.0, 5.0], [0.0, 0.0]]] * 2])  # 2 prompts x 3 tokens
        labels = torch.tensor([[[1, 0, -1]] * 2])
        dyn = {"point_coords": {1: "prompts", 2: "points"}, "point_labels": {1: "prompts", 2: "points"},
               "iou_scores": {1: "prompts"}, "low_res_masks": {1: "prompts"}}
        torch.onnx.export(_decoder_wrapper(model), (*feats, coords, labels), str(out / DECODER),
                          input_names=[*FEATURES, "point_coords", "point_labels"],
                          output_names=["iou_scores", "low_res_masks"], dynamic_axes=dyn, opset_version=opset,
                          dynamo=False)
    tokens, grid = model.mask_decoder.num_mask_tokens, size // 16
    shapes = {FEATURES[i]: list(f.shape) for i, f in enumerate(feats)}
    name_dims(out / ENCODER, shapes)
    name_dims(out / DECODER, {"iou_scores": [1, "prompts", tokens],
                              "low_res_masks": [1, "prompts", tokens, 4 * grid, 4 * grid]})


def export_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    model_dir = model_dir_of(ctx, spec, "source")
    model = load_torch_model(model_dir, spec.params.image_size)
    export_sam2(model, out, spec.params.opset)
    return {"encoder": ENCODER, "decoder": DECODER, "model_dir": str(model_dir), "image_size": spec.params.image_size}


# ---- quantize --------------------------------------------------------------------


def quantize_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    """Dynamic int8 of the encoder's weight MatMuls (as the SAM family: no calibration pictures needed)."""
    from ...quantize import dynamic_int8

    src = ctx.upstream_dir(spec, "export")
    p = spec.params
    dynamic_int8(src / ENCODER, out / ENCODER, op_types=list(p.op_types), per_channel=p.per_channel,
                 reduce_range=p.reduce_range)
    link_or_copy(src / DECODER, out / DECODER)
    return {"encoder": ENCODER, "decoder": DECODER,
            "recorded": {"encoder_fp32_bytes": (src / ENCODER).stat().st_size,
                         "encoder_int8_bytes": (out / ENCODER).stat().st_size}}


# ---- validate ------------------------------------------------------------------------


def runtime_block(model, model_dir: Path) -> dict:
    """What the runtime needs (it never imports transformers); the recipe's defaults are added when publishing."""
    size = model.config.prompt_encoder_config.image_size
    d = model.config.mask_decoder_config
    block = {
        "kind": RUNTIME_KIND,
        "image_size": size,
        **pixel_settings(model_dir),
        "resize": "square",  # Sam2ImageProcessorFast stretches the picture to S x S, no padding
        "padding_point": "always",  # Sam2PromptEncoder pads after boxes too
        "embedding_shape": [1, d.hidden_size, size // 16, size // 16],
        "low_res_mask_size": size // 4,
        "encoder_io": ENCODER_IO,
        "decoder_io": DECODER_IO,
        "point_labels": POINT_LABELS,
        "multimask_outputs": [1, 2, 3],
        "single_mask_output": 0,
    }
    if d.dynamic_multimask_via_stability:
        block["dynamic_multimask"] = {"delta": float(d.dynamic_multimask_stability_delta),
                                      "threshold": float(d.dynamic_multimask_stability_thresh)}
    return block


def torch_prompt(pr: dict, original_size, size: int) -> dict:
    """A prompt in original pixels -> Sam2Model.forward inputs (Sam2Processor's coordinate scaling: x S/w, y S/h)."""
    import torch

    h, w = original_size
    scale = np.array([size / w, size / h])
    kwargs = {}
    if pr.get("points"):
        kwargs["input_points"] = torch.tensor(np.asarray(pr["points"]) * scale, dtype=torch.float32)[None, None]
        kwargs["input_labels"] = torch.tensor(pr["labels"], dtype=torch.long)[None, None]
    if pr.get("box") is not None:
        kwargs["input_boxes"] = torch.tensor(np.asarray(pr["box"]).reshape(2, 2) * scale,
                                             dtype=torch.float32).reshape(1, 1, 4)
    return kwargs


def torch_masks(model, pixel_values: np.ndarray, pr: dict, original_size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sam2Model.forward on pixel values: (masks at the picture's size, iou scores, low-res logits)."""
    import torch
    import torch.nn.functional as F

    size = model.config.prompt_encoder_config.image_size
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixel_values), multimask_output=pr.get("multimask", True),
                    **torch_prompt(pr, original_size, size))
        full = F.interpolate(out.pred_masks[0], tuple(original_size), mode="bilinear", align_corners=False)
    return (full[0] > 0).numpy(), out.iou_scores[0, 0].numpy(), out.pred_masks[0, 0].numpy()


def validate_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    import torch

    p = spec.params
    int8 = "vs_fp32" in p.checks
    producer = ctx.upstream_dir(spec, "quantize" if int8 else "export")
    for name in (ENCODER, DECODER):
        link_or_copy(producer / name, out / name)
    export_dir = ctx.upstream_dir(spec, "export")
    model_dir = Path(ctx.upstream_record(spec, "export")["model_dir"])
    model = load_torch_model(model_dir, p.image_size)
    runtime = runtime_block(model, model_dir)
    defaults = runtime_defaults(Sam2Recipe.model_fields["runtime"].default.model_dump(mode="json"))
    predictor = Sam2Predictor.from_sessions(make_session(out / ENCODER, low_memory=True), make_session(out / DECODER),
                                            {**runtime, **defaults})
    width, height = p.image
    image = validation_image(width, height)
    prompts = validation_prompts(width, height)
    predictor.set_image(image)
    checks: list[dict] = []
    results: dict = {"checks": checks, "image": [width, height], "image_size": p.image_size, "prompts": {}}
    pixels, original_size, _ = sp.preprocess_square(image, p.image_size, runtime["pixel_mean"], runtime["pixel_std"])

    if int8:
        fp32 = Sam2Predictor.from_sessions(make_session(export_dir / ENCODER, low_memory=True),
                                           make_session(export_dir / DECODER), {**runtime, **defaults})
        fp32.set_image(image)
        a, b = predictor.embeddings.reshape(-1).astype(np.float64), fp32.embeddings.reshape(-1).astype(np.float64)
        cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        ious = []
        for name, pr in prompts.items():
            args = (pr.get("points"), pr.get("labels"), pr.get("box"), pr.get("multimask", True))
            per = [mask_iou(x, y) for x, y in zip(predictor.predict(*args)[0], fp32.predict(*args)[0])]
            ious += per
            results["prompts"][name] = {"mask_iou_vs_fp32": [round(v, 5) for v in per]}
        mean_iou = float(np.mean(ious))
        results["mask_iou_vs_fp32"] = {"mean": round(mean_iou, 5), "min": round(float(np.min(ious)), 5)}
        record_check(checks, "embedding cosine vs fp32 ONNX", round(cosine, 6), p.min_embedding_cosine,
                     cosine >= p.min_embedding_cosine)
        record_check(checks, "mean mask IoU vs fp32 ONNX (all prompts, all masks)", round(mean_iou, 5),
                     p.min_int8_mask_iou, mean_iou >= p.min_int8_mask_iou)
    else:
        with torch.no_grad():
            ref_feats = model.get_image_embeddings(torch.from_numpy(pixels))
        diffs = {name: float(np.abs(predictor.features[name] - ref.numpy()).max())
                 for name, ref in zip(FEATURES, ref_feats)}
        results["features_max_abs_diff"] = diffs
        worst_emb = max(diffs.values())
        record_check(checks, "encoder outputs (embedding + high-res features) max abs diff vs PyTorch", worst_emb,
                     p.embeddings_atol, worst_emb <= p.embeddings_atol)
        worst_iou, worst_logits = 1.0, 0.0
        for name, pr in prompts.items():
            mm = pr.get("multimask", True)
            ref_masks, ref_scores, ref_low = torch_masks(model, pixels, pr, original_size)
            masks, scores = predictor.predict(pr.get("points"), pr.get("labels"), pr.get("box"), mm)
            # The decoder alone on PyTorch's features: isolates the decoder graph from the encoder.
            coords, codes = predictor.prompt_tokens(pr.get("points"), pr.get("labels"), pr.get("box"))
            iou, low = predictor.decode(coords[None], codes[None], embeddings={k: v.numpy() for k, v in
                                                                               zip(FEATURES, ref_feats)})
            _, low = predictor._select(iou, low, mm)
            per = [mask_iou(x, y) for x, y in zip(masks, ref_masks)]
            logits_diff = float(np.abs(low[0] - ref_low).max())
            worst_iou, worst_logits = min(worst_iou, *per), max(worst_logits, logits_diff)
            results["prompts"][name] = {"mask_iou": [round(v, 5) for v in per],
                                        "iou_scores_max_abs_diff": float(np.abs(scores - ref_scores).max()),
                                        "decoder_logits_max_abs_diff": logits_diff}
        results["decoder_logits_max_abs_diff"] = worst_logits
        record_check(checks, "min mask IoU vs PyTorch (point, points +/-, box, box + point; every mask)",
                     round(worst_iou, 5), p.min_mask_iou, worst_iou >= p.min_mask_iou)
    native = native_size(model_dir)
    if p.image_size != native:
        # The same weights at the model's own input size, through PyTorch: what the smaller input costs.
        ref_model = load_torch_model(model_dir)
        ref_pixels = sp.preprocess_square(image, native, runtime["pixel_mean"], runtime["pixel_std"])[0]
        ious = []
        for name, pr in prompts.items():
            ref_masks = torch_masks(ref_model, ref_pixels, pr, original_size)[0]
            masks = predictor.predict(pr.get("points"), pr.get("labels"), pr.get("box"), pr.get("multimask", True))[0]
            ious += [mask_iou(x, y) for x, y in zip(masks, ref_masks)]
        mean = float(np.mean(ious))
        results[f"mask_iou_vs_{native}px"] = {"mean": round(mean, 5), "min": round(float(np.min(ious)), 5)}
        record_check(checks, f"mean mask IoU vs the model's own {native} px input (PyTorch, same weights)",
                     round(mean, 5), p.min_iou_vs_native_size, mean >= p.min_iou_vs_native_size)
    results["encoder_runs"] = predictor.encoder_runs
    results["checks_run"] = list(p.checks)
    fail_on(checks, results)
    return {"components": {"encoder": ENCODER, "decoder": DECODER}, "validation": results, "runtime": runtime}
