"""Stable Diffusion validate stage. fp32: the export's parity checks; quantized: cosine/SNR per submodule
on held-out calibration inputs, PSNR/SSIM of whole pictures vs fp32, CLIP score if a CLIP model is local;
floors from the recipe. Which checks run is named in the stage's parameters."""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import numpy as np

from ...runtime.artifact import make_session
from ...store import StageContext, StageSpec, find_upstream, link_or_copy
from ..common import fail_on, link_component, record_check
from .calibrate import calibration_reader
from .submodules import (ALL_FILES, ALL_IO, CONFIGS_DIR, FILES, SCHEDULER_CONFIG, SUBMODULES, TOKENIZER_DIR,
                         TOKENIZER_JSON, variant_components)

RUNTIME_KIND = "sd"


def runtime_block(info: dict, scheduler_config: dict, fixed_size, vae: str = "sd") -> dict:
    """What the runtime needs from the model's configs (it never imports torch or diffusers); the recipe's
    defaults (scheduler, steps, guidance, sizes) are added when publishing (plan.runtime_defaults).
    TAESD's latents are the SD VAE's scaled ones: its scaling_factor (1.0 in AutoencoderTiny) is the one to use."""
    from ...runtime.schedulers import SCHEDULER_NAMES

    f = info["vae_scale_factor"]
    scaling = info["taesd_scaling_factor"] if vae == "taesd" else info["scaling_factor"]
    return {
        "kind": RUNTIME_KIND,
        "tokenizer": TOKENIZER_JSON,
        "max_length": info["max_length"], "bos_id": info["bos_id"], "eos_id": info["eos_id"], "pad_id": info["pad_id"],
        "scheduler_config": scheduler_config,
        "schedulers": list(SCHEDULER_NAMES),
        "size_multiple": f * 8 // math.gcd(f, 8), "fixed_size": fixed_size,
        "vae_scale_factor": f, "scaling_factor": scaling, "latent_channels": info["latent_channels"],
        "text_hidden_size": info["text_hidden_size"],
        # 1: one-pass guidance, the UNet takes batch 1 only (no negative prompt); 2: classifier-free guidance
        "unet_batch": int(info.get("unet_batch", 2)), "vae": vae,
        "io": {name: ALL_IO[sub] for name, sub in variant_components(vae).items()},
    }


def _link_common(src: Path, out: Path) -> None:
    for folder in (TOKENIZER_DIR, CONFIGS_DIR):
        for f in (src / folder).iterdir():
            link_or_copy(f, out / folder / f.name)
    link_or_copy(src / SCHEDULER_CONFIG, out / SCHEDULER_CONFIG)


def _num(x: float, digits: int = 5):
    """A JSON-safe rounded number (identical outputs give an infinite SNR/PSNR: recorded as 'inf')."""
    return round(x, digits) if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def submodule_quality(name: str, fp32_path: Path, quant_path: Path, calib_dir: Path, max_items: int) -> dict:
    """Cosine and SNR of the quantized submodule's outputs vs fp32 on held-out calibration inputs."""
    from ...quantize import cosine, snr_db

    reader = calibration_reader(calib_dir, name, "held_out", unet_batch=2)
    n = len(reader)
    picks = sorted({int(round(i)) for i in np.linspace(0, n - 1, min(max_items, n))})
    # One model at a time (the full-size fp32 and int8 UNets together would need both in memory).
    outputs = {}
    for which, path in (("fp32", fp32_path), ("quant", quant_path)):
        session = make_session(path, low_memory=True)
        outputs[which] = [np.concatenate([o.ravel() for o in session.run(None, reader.item(i))]) for i in picks]
        del session
        gc.collect()
    cos = [cosine(a, b) for a, b in zip(outputs["fp32"], outputs["quant"])]
    snr = [snr_db(a, b) for a, b in zip(outputs["fp32"], outputs["quant"])]
    timesteps = [float(reader.item(i)["timestep"][0]) for i in picks] if name == "unet" else []
    out = {"inputs": len(picks), "cosine_mean": _num(float(np.mean(cos)), 6), "cosine_min": _num(float(np.min(cos)), 6),
           "snr_db_mean": _num(float(np.mean(snr)), 3), "snr_db_min": _num(float(np.min(snr)), 3),
           "_cosine": float(np.mean(cos)), "_snr": float(np.mean(snr))}
    if timesteps:
        out["timesteps"] = timesteps
        out["cosine_by_timestep"] = [_num(c, 6) for c in cos]
    return out


def clip_scores(model_ref: str | None, images: list, prompts: list[str], project_dir: Path) -> tuple[list | None, str]:
    """CLIP score (100 x cosine of image and text embeddings, >= 0) with a local CLIP model, or (None, why not)."""
    if not model_ref:
        return None, "skipped: no quality.clip_model in the recipe"
    folder = Path(model_ref) if Path(model_ref).is_absolute() else project_dir / model_ref
    try:
        import torch
        from transformers import CLIPModel, CLIPProcessor

        where = str(folder) if folder.is_dir() else model_ref
        model = CLIPModel.from_pretrained(where, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError) as exc:
        return None, (f"skipped: CLIP model {model_ref!r} is not available locally ({type(exc).__name__}); put it in "
                      f"the Hugging Face cache (`huggingface-cli download {model_ref}`) or name a local folder "
                      f"in quality.clip_model")
    with torch.no_grad():
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        scores = (100 * (img * txt).sum(-1)).clamp(min=0)
    return [round(float(s), 3) for s in scores], f"computed with {model_ref}"


def validate_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    from ...quantize import psnr, ssim
    from ...runtime.sd import StableDiffusion

    p = spec.params
    export_dir = ctx.upstream_dir(spec, "export")
    export_rec = ctx.upstream_record(spec, "export")
    quantized = "vs_fp32" in p.checks
    producer = ctx.upstream_dir(spec, "quantize") if quantized else export_dir
    shipped = variant_components(p.vae)  # component name -> exported submodule (TAESD's come from the export)
    files = {name: ALL_FILES[sub] for name, sub in shipped.items()}
    for name, sub in shipped.items():
        link_component(producer if sub in SUBMODULES else export_dir, out, files[name])
    (out / TOKENIZER_DIR).mkdir()
    _link_common(export_dir, out)
    info = export_rec["info"]
    export_params = find_upstream(spec, "export").params
    fixed = None if export_params.dynamic_size else list(export_params.parity.sizes[0])
    runtime = runtime_block(info, json.loads((export_dir / SCHEDULER_CONFIG).read_text()), fixed, p.vae)
    checks: list[dict] = []
    results: dict = {"checks": checks}

    if not quantized:
        for name, r in export_rec["parity"].items():
            if name not in shipped.values():
                continue  # the other VAE: exported and checked, not shipped in this variant
            record_check(checks, f"{name} max abs diff vs PyTorch", r["max_abs_diff"], r["atol"], r["max_abs_diff"] <= r["atol"])
        results["parity"] = {n: r for n, r in export_rec["parity"].items() if n in shipped.values()}
        record_check(checks, "runtime tokenization == CLIPTokenizer", export_rec["recorded"]["tokenizer_texts_checked"],
                     "all texts", True)
        if p.world:
            results["world"] = world_scores(out, runtime, files, p.world, sheet=out / "world-sheet.png")
            world_checks(checks, results["world"], p.world)
        results["checks_run"] = list(p.checks)
        fail_on(checks, results)
        return {"components": files, "validation": results, "runtime": runtime}

    calib_dir = ctx.upstream_dir(spec, "calibrate")
    q = p.quality
    floors = p.floors
    quant_rec = ctx.upstream_record(spec, "quantize")["submodules"]
    results["submodules"] = {}
    for name, fl in floors["submodules"].items():
        r = submodule_quality(name, export_dir / FILES[name], out / FILES[name], calib_dir, q.submodule_items)
        cos, snr = r.pop("_cosine"), r.pop("_snr")
        results["submodules"][name] = {"mode": quant_rec[name]["mode"], **r}
        if fl["min_cosine"] is not None:
            record_check(checks, f"{name} output cosine vs fp32 (mean, held-out inputs)", _num(cos, 6), fl["min_cosine"],
                         cos >= fl["min_cosine"])
        if fl["min_snr_db"] is not None:
            record_check(checks, f"{name} output SNR dB vs fp32 (mean, held-out inputs)", _num(snr, 3), fl["min_snr_db"],
                         snr >= fl["min_snr_db"])

    # Whole pictures: the fp32 pipeline and this variant, same held-out prompts, seeds and settings.
    meta = json.loads((calib_dir / "calibration.json").read_text())
    prompts = [meta["prompts"][i] for i in meta["held_out"]][:q.images]
    width, height = fixed or q.size
    label = {"recipe": spec.recipe, "variant": spec.variant}
    # The quality settings, not the recipe's runtime defaults (those are added when publishing).
    quality_rt = {**runtime, "scheduler": q.scheduler, "steps": q.steps, "max_steps": q.steps,
                  "guidance_scale": q.guidance_scale, "width": width, "height": height,
                  "min_size": min(width, height), "max_size": max(width, height)}
    fp32 = StableDiffusion.from_folder(export_dir, quality_rt, files, low_memory=True, label={**label, "variant": "fp32"})
    ours = StableDiffusion.from_folder(out, quality_rt, files, low_memory=True, label=label)
    settings = dict(steps=q.steps, guidance_scale=q.guidance_scale, scheduler=q.scheduler, width=width, height=height)
    (out / "quality").mkdir()
    images, per_image = {"fp32": [], "variant": []}, []
    for i, prompt in enumerate(prompts):
        a = fp32.generate(prompt, seed=q.seed + i, **settings)
        b = ours.generate(prompt, seed=q.seed + i, **settings)
        images["fp32"].append(a.image)
        images["variant"].append(b.image)
        ra, rb = np.asarray(a.image), np.asarray(b.image)
        per_image.append({"prompt": prompt, "seed": q.seed + i, "psnr_db": psnr(ra, rb), "ssim": ssim(ra, rb)})
        b.save(out / "quality" / f"{i}-{spec.variant}.png")
        a.save(out / "quality" / f"{i}-fp32.png")
    mean_psnr = float(np.mean([r["psnr_db"] for r in per_image]))
    mean_ssim = float(np.mean([r["ssim"] for r in per_image]))
    results["images"] = {"settings": {**settings, "seed": q.seed}, "psnr_db_mean": _num(mean_psnr, 3),
                         "ssim_mean": _num(mean_ssim, 5),
                         "per_image": [{**r, "psnr_db": _num(r["psnr_db"], 3), "ssim": _num(r["ssim"], 5)} for r in per_image],
                         "files": sorted(str(f.relative_to(out)) for f in (out / "quality").iterdir())}
    if floors["min_psnr_db"] is not None:
        record_check(checks, "image PSNR dB vs fp32 pipeline (mean)", _num(mean_psnr, 3), floors["min_psnr_db"],
                     mean_psnr >= floors["min_psnr_db"])
    if floors["min_ssim"] is not None:
        record_check(checks, "image SSIM vs fp32 pipeline (mean)", _num(mean_ssim, 5), floors["min_ssim"],
                     mean_ssim >= floors["min_ssim"])

    scores_fp32, note = clip_scores(q.clip_model, images["fp32"], prompts, ctx.project_dir)
    clip = {"note": note}
    if scores_fp32 is not None:
        scores, _ = clip_scores(q.clip_model, images["variant"], prompts, ctx.project_dir)
        clip.update(fp32=scores_fp32, variant=scores, variant_mean=round(float(np.mean(scores)), 3),
                    fp32_mean=round(float(np.mean(scores_fp32)), 3))
        if floors["min_clip_score"] is not None:
            record_check(checks, "CLIP score (mean)", clip["variant_mean"], floors["min_clip_score"],
                         clip["variant_mean"] >= floors["min_clip_score"])
    elif floors["min_clip_score"] is not None:
        clip["floor"] = f"min_clip_score {floors['min_clip_score']} not checked: no CLIP model"
    results["clip_score"] = clip
    if p.world:
        del fp32, ours
        gc.collect()
        results["world"] = world_scores(out, runtime, files, p.world, sheet=out / "world-sheet.png")
        results["world"]["fp32"] = world_scores(export_dir, runtime, files, p.world)
        world_checks(checks, results["world"], p.world)
    results["checks_run"] = list(p.checks)
    fail_on(checks, results)
    return {"components": files, "validation": results, "runtime": runtime}


def world_scores(folder: Path, runtime: dict, files: dict, world_cfg: dict, sheet: Path | None = None) -> dict:
    """The pocket world's picture oracle on this folder's components: held-out captions drawn with the recipe's
    runtime defaults, each read back for its colour, shape and background (onnxforge.world). `sheet`: where to
    save the pictures as a grid with each one's caption and reading (docs/pocket/ shows one)."""
    from ... import world
    from ...runtime.sd import StableDiffusion

    width, height = world_cfg["size"]
    rt = {**runtime, "scheduler": world_cfg["scheduler"], "steps": world_cfg["steps"], "max_steps": world_cfg["steps"],
          "guidance_scale": world_cfg["guidance_scale"], "width": width, "height": height,
          "min_size": min(width, height), "max_size": max(width, height)}
    sd = StableDiffusion.from_folder(folder, rt, files, label={"recipe": "world-oracle"})
    captions = [scene.caption for scene, _, _ in world.dataset(world.WorldConfig(size=width), world_cfg["seed"],
                                                                world_cfg["pictures"])]
    hits = {"colour": 0, "shape": 0, "background": 0, "both": 0}
    pictures = []
    for i, caption in enumerate(captions):
        want = world.parse_caption(caption)
        pictures.append(sd.generate(caption, seed=world_cfg["seed"] + i, steps=world_cfg["steps"],
                                    guidance_scale=world_cfg["guidance_scale"], scheduler=world_cfg["scheduler"],
                                    width=width, height=height).image)
        got = world.read_picture(pictures[-1])
        colour, shape = got.colour == want.shapes[0].colour, got.shape == want.shapes[0].shape
        hits["colour"] += colour
        hits["shape"] += shape
        hits["both"] += colour and shape
        hits["background"] += got.background == want.background
    n = len(captions)
    scores = {"pictures": n, "seed": world_cfg["seed"], **{k: round(v / n, 4) for k, v in hits.items()}}
    if sheet is not None:
        world.contact_sheet(pictures, captions).save(sheet)
        scores["sheet"] = sheet.name
    return scores


def world_checks(checks: list, scores: dict, world_cfg: dict) -> None:
    for key in ("colour", "shape"):
        floor = world_cfg.get(f"min_{key}")
        if floor is not None:
            record_check(checks, f"world oracle: {key} right (fraction of {scores['pictures']} pictures)",
                         scores[key], floor, scores[key] >= floor)
        if "fp32" in scores and world_cfg.get("max_drop") is not None:
            drop = round(scores["fp32"][key] - scores[key], 4)
            record_check(checks, f"world oracle: {key} drop vs fp32", drop, world_cfg["max_drop"],
                         drop <= world_cfg["max_drop"])
