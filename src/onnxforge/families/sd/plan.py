"""Stable Diffusion's plan: recipe -> source, export, calibrate, quantize, validate and publish stages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from ...config import Recipe, RecipeError
from ...store import StageParams, StageSpec
from ..common import SourceParams, builder_digest, publish_spec, sha256_or_missing, source_params, spec_factory
from .quantize import quant_params
from .recipe import SdCalibrationConfig, SdExportConfig, SdQualityConfig, SdRecipe, SdValidateConfig
from .submodules import SUBMODULES

BUILDER_DIGEST = builder_digest(__file__, "runtime/sd.py", "runtime/schedulers.py")


class SdSourceParams(SourceParams):
    tokenizer: dict | None = None  # random: the CLIP BPE trained offline, and its corpus digest
    lora: dict | None = None  # fused into the UNet: kind, where from (a path's file digest), scale
    taesd: dict | None = None  # TAESD beside the SD VAE: kind and where from


class ExportParams(SdExportConfig):
    parity: SdValidateConfig  # the recipe's `validate:` section: the export's parity checks (sizes, tolerances)
    # 1: the UNet is exported for batch 1 only (runtime.guidance_scale <= 1: no negative-prompt pass)
    unet_batch: Literal[1, 2] = 2


class CalibrateParams(SdCalibrationConfig):
    prompts_sha256: str


class QuantizeParams(StageParams):
    submodules: dict[str, dict]  # per submodule: SdQuant's storage settings (floors left to validate)


class ValidateParams(StageParams):
    vae: Literal["sd", "taesd"] = "sd"  # which exported VAE the variant ships as vae_decoder/vae_encoder
    checks: tuple[Literal["parity", "vs_fp32"], ...]
    quality: SdQualityConfig | None = None  # vs_fp32: the whole-picture comparison settings
    floors: dict | None = None  # vs_fp32: per-submodule cosine/SNR floors and whole-picture floors
    world: dict | None = None  # pocket-world pipelines: the picture oracle's settings and floors (validate.world_scores)


def plan(recipe: Recipe, project_dir: Path) -> dict[str, StageSpec]:
    """The publishing stage of each variant; each links to its upstream stages."""
    body: SdRecipe = recipe.body
    src = body.source
    extra = {}
    if src.kind == "random":
        extra["tokenizer"] = {**src.random.tokenizer.model_dump(),
                              "corpus_sha256": sha256_or_missing(project_dir / src.random.tokenizer.train_on)}
    if src.lora is not None:
        extra["lora"] = lora_params(src.lora, project_dir)
    if src.taesd is not None:
        extra["taesd"] = taesd_params(src.taesd, project_dir)
    if not body.export.dynamic_size and len(body.validate_.sizes) > 1:
        raise RecipeError(f"{recipe.path}: validate.sizes: export.dynamic_size is false, so give exactly one size")
    spec = spec_factory(recipe, BUILDER_DIGEST)
    source = spec("source", None, SdSourceParams(**source_params(recipe, project_dir), **extra), [],
                  doc=f"load {src.kind} Stable Diffusion weights and tokenizer")
    unet_batch = 1 if body.runtime.guidance_scale <= 1.0 else 2
    export = spec("export", "fp32", ExportParams(**body.export.model_dump(), parity=body.validate_, unet_batch=unet_batch),
                  [source], doc="export text encoder, UNet, VAE decoder and encoder; parity vs PyTorch")
    calibrate = None
    if any(v.quantized() for v in body.variants.values()):
        cal = body.calibration
        calibrate = spec("calibrate", None, CalibrateParams(**cal.model_dump(),
                                                            prompts_sha256=sha256_or_missing(project_dir / cal.prompts)),
                         [source], doc="UNet/text/VAE inputs along full denoising trajectories of the calibration prompts")
    validates: dict[str, StageSpec] = {}
    quants: dict[str, StageSpec] = {}  # variants that differ only in the VAE they ship share one quantize stage
    world = None
    if body.world is not None:
        r = body.runtime
        world = {**body.world.model_dump(), "scheduler": r.scheduler, "steps": r.steps, "guidance_scale": r.guidance_scale,
                 "size": list(r.size)}
    for name, v in body.variants.items():
        quantized = v.quantized()
        if not quantized:
            validates[name] = spec("validate", name, ValidateParams(checks=("parity",), vae=v.vae, world=world),
                                   [export], "record parity")
            continue
        subs = {k: quant_params(getattr(v, k)) for k in SUBMODULES}
        key = json.dumps(subs, sort_keys=True)
        if key not in quants:
            quants[key] = spec("quantize", name, QuantizeParams(submodules=subs), [export, calibrate],
                               doc=", ".join(f"{k} {q.mode}" for k, q in quantized.items()))
        quant = quants[key]
        floors = {"submodules": {k: {"min_cosine": q.min_cosine, "min_snr_db": q.min_snr_db} for k, q in quantized.items()},
                  "min_psnr_db": v.min_psnr_db, "min_ssim": v.min_ssim, "min_clip_score": v.min_clip_score}
        validates[name] = spec("validate", name, ValidateParams(checks=("vs_fp32",), quality=body.quality, floors=floors,
                                                               vae=v.vae, world=world),
                               [quant], "measure quality vs fp32")
    return {name: publish_spec(spec, name, v, runtime_defaults(body)) for name, v in validates.items()}


def lora_params(lora, project_dir: Path) -> dict:
    """A LoRA's identity for the digest (a local file by its content)."""
    out = {"kind": lora.kind, "scale": lora.scale}
    if lora.kind == "hub":
        out.update(repo=lora.hub.repo, revision=lora.hub.revision, weight_name=lora.hub.weight_name)
    elif lora.kind == "path":
        path = Path(lora.path) if Path(lora.path).is_absolute() else project_dir / lora.path
        out.update(path=str(path), sha256=sha256_or_missing(path))
    else:
        out.update(lora.random.model_dump(mode="json"))
        out["alpha"] = lora.random.alpha or lora.random.rank
    return out


def taesd_params(taesd, project_dir: Path) -> dict:
    from ...sources import folder_fingerprint

    if taesd.kind == "hub":
        return {"kind": "hub", "repo": taesd.hub.repo, "revision": taesd.hub.revision}
    if taesd.kind == "path":
        folder = Path(taesd.path) if Path(taesd.path).is_absolute() else project_dir / taesd.path
        return {"kind": "path", "path": str(folder), "files": folder_fingerprint(folder)}
    return {"kind": "random", "config": taesd.random.config, "seed": taesd.random.seed}


def runtime_defaults(body: SdRecipe) -> dict:
    """The recipe's runtime section in the manifest's runtime-block shape (added when publishing)."""
    r = body.runtime
    return {"scheduler": r.scheduler, "steps": r.steps, "max_steps": r.max_steps, "guidance_scale": r.guidance_scale,
            "width": r.size[0], "height": r.size[1], "min_size": r.min_size, "max_size": r.max_size}
