"""Stable Diffusion calibrate stage: full denoising trajectories of the calibration prompts through
diffusers' own pipeline (text-encoder ids, UNet inputs at every step, cond + uncond, final latents, decoded
images). Cached under artifacts/.calibration/sd-<digest> (digest: prompts, source, settings), so recipes
that share them share one copy. `calibration_reader` serves them to quantization and quality checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...config import RecipeError
from ...store import StageContext, StageSpec, atomic_dir, clean_stale_tmp, link_or_copy
from ..common import model_dir_of
from .submodules import SUBMODULES


def read_prompts(path: Path) -> list[str]:
    """Prompts, one a line; blank lines and # comments skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: calibration prompts file not found (recipe key calibration.prompts)")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise RecipeError(f"{path}: calibration prompts file has no prompts (one a line; # starts a comment)")
    return prompts


def diffusers_scheduler(name: str, config):
    """diffusers' scheduler for one of the runtime's names, from a scheduler config (as the runtime does)."""
    import diffusers

    if name == "pndm":
        return diffusers.PNDMScheduler.from_config(config)
    if name == "ddim":
        return diffusers.DDIMScheduler.from_config(config)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(config)
    if name == "dpm++2m":
        return diffusers.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "lcm":
        return diffusers.LCMScheduler.from_config(config)
    raise ValueError(f"unknown scheduler {name!r}")


def load_pipeline(model_dir: Path, scheduler: str | None = None):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" in the build log
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    if scheduler:
        pipe.scheduler = diffusers_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def collect_calibration(model_dir: Path, prompts: list[str], s: dict, out: Path) -> dict:
    """Run diffusers' pipeline on every prompt and keep what each submodule saw.

    Layout (memory-mappable .npy files, P prompts, S UNet calls per trajectory):
        text_encoder/input_ids.npy            (P, 2, 77) int64: [negative, prompt]
        unet/sample.npy                       (P, S, 2, C, h, w) float32: the scaled model input
                                              (batch 1, the prompt alone, when guidance_scale <= 1)
        unet/timestep.npy                     (P, S) float32
        unet/encoder_hidden_states.npy        (P, 2, 77, D) float32 (the same at every step)
        vae_decoder/latent_sample.npy         (P, 1, C, h, w): final latents / scaling_factor
        vae_encoder/sample.npy                (P, 1, 3, H, W): the decoded pictures in [-1, 1]
    """
    import torch

    pipe = load_pipeline(model_dir, s.scheduler)
    width, height = s.size
    calls: list = []
    text_calls: list = []

    def unet_hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        calls.append((sample.detach().float().numpy().copy(), float(t), ehs.detach().float().numpy().copy()))

    def text_hook(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        text_calls.append(ids.detach().numpy().copy())

    h1 = pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True)
    h2 = pipe.text_encoder.register_forward_pre_hook(text_hook, with_kwargs=True)
    rows: dict[str, list] = {k: [] for k in ("ids", "sample", "timestep", "ehs", "latent", "image")}
    try:
        for i, prompt in enumerate(prompts):
            calls.clear()
            text_calls.clear()
            generator = torch.Generator().manual_seed(s.seed + i)
            with torch.no_grad():
                latents = pipe(prompt, negative_prompt=s.negative_prompt, num_inference_steps=s.steps,
                               guidance_scale=s.guidance_scale, height=height, width=width, generator=generator,
                               output_type="latent").images
                z = latents / pipe.vae.config.scaling_factor
                image = pipe.vae.decode(z, return_dict=False)[0].clamp(-1, 1)
            batch = 2 if s.guidance_scale > 1.0 else 1  # guidance <= 1: the prompt alone (one-pass UNet)
            if len(text_calls) != batch or any(c[0].shape[0] != batch for c in calls):
                raise RuntimeError(f"unexpected pipeline calls: {len(text_calls)} text encoder calls, UNet batches "
                                   f"{sorted({c[0].shape[0] for c in calls})} (expected {batch})")
            # diffusers encodes the prompt first, then the negative one; the runtime batches [negative, prompt].
            rows["ids"].append(np.concatenate(text_calls[::-1]))
            rows["sample"].append(np.stack([c[0] for c in calls]))
            rows["timestep"].append(np.asarray([c[1] for c in calls], dtype=np.float32))
            rows["ehs"].append(calls[0][2])
            rows["latent"].append(z.numpy())
            rows["image"].append(image.numpy())
    finally:
        h1.remove()
        h2.remove()
    for comp, key, arr in (("text_encoder", "input_ids", np.stack(rows["ids"]).astype(np.int64)),
                           ("unet", "sample", np.stack(rows["sample"]).astype(np.float32)),
                           ("unet", "timestep", np.stack(rows["timestep"])),
                           ("unet", "encoder_hidden_states", np.stack(rows["ehs"]).astype(np.float32)),
                           ("vae_decoder", "latent_sample", np.stack(rows["latent"]).astype(np.float32)),
                           ("vae_encoder", "sample", np.stack(rows["image"]).astype(np.float32))):
        (out / comp).mkdir(exist_ok=True)
        np.save(out / comp / f"{key}.npy", arr)
    ts = np.stack(rows["timestep"])
    return {"unet_calls_per_prompt": int(ts.shape[1]), "timesteps": [float(t) for t in ts[0]],
            "latent_shape": list(rows["latent"][0].shape), "image_shape": list(rows["image"][0].shape)}


def calibrate_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    """Collect the calibration set once per digest (prompts + source + settings), shared across recipes."""
    import time

    from ...store import write_json_atomic

    s = spec.params
    prompts_path = ctx.project_dir / s.prompts
    prompts = read_prompts(prompts_path)
    if s.max_prompts:
        prompts = prompts[:s.max_prompts]
    if len(prompts) <= s.held_out:
        raise RecipeError(f"{prompts_path}: {len(prompts)} prompt(s), but calibration.held_out is {s.held_out}: "
                          f"need at least {s.held_out + 1}")
    shared = ctx.root / ".calibration" / f"{spec.family}-{spec.digest}"
    reused = (shared / "calibration.json").is_file()
    started = time.perf_counter()
    if not reused:
        clean_stale_tmp(shared.parent)
        model_dir = model_dir_of(ctx, spec, "source")
        with atomic_dir(shared) as tmp:
            summary = collect_calibration(model_dir, prompts, s, tmp)
            n = len(prompts)
            meta = {"digest": spec.digest, "prompts": prompts, "calibrate": list(range(n - s.held_out)),
                    "held_out": list(range(n - s.held_out, n)), "settings": s.model_dump(mode="json"), **summary}
            write_json_atomic(tmp / "calibration.json", meta)  # last: its presence means complete
    for f in sorted(shared.rglob("*")):
        if f.is_file():
            link_or_copy(f, out / f.relative_to(shared))
    meta = json.loads((out / "calibration.json").read_text())
    return {"shared_cache": str(shared), "reused": reused,
            "recorded": {"calibration_digest": spec.digest, "reused_cache": reused, "prompts": len(meta["prompts"]),
                         "held_out": len(meta["held_out"]), "unet_calls_per_prompt": meta["unet_calls_per_prompt"],
                         "seconds": round(time.perf_counter() - started, 1)}}


def calibration_reader(calib_dir: Path, name: str, split: str = "calibrate", unet_batch: int = 2):
    """An onnxruntime CalibrationDataReader over one submodule's calibration inputs.

    split: "calibrate" (the prompts used for ranges) or "held_out" (for quality). For the UNet each
    item is one denoising step of one prompt, every step of every trajectory in order (early, middle
    and late timesteps all appear), as [negative, prompt] (unet_batch 2) or each half alone (1).
    """
    from ...quantize import ArrayReader

    meta = json.loads((calib_dir / "calibration.json").read_text())
    if split not in ("calibrate", "held_out"):
        raise ValueError(f"split must be 'calibrate' or 'held_out', got {split!r}")
    prompts = meta[split]
    arrays = {f.stem: np.load(f, mmap_mode="r") for f in sorted((calib_dir / name).glob("*.npy"))}
    if name == "unet":
        steps = int(meta["unet_calls_per_prompt"])
        halves = 2 if unet_batch == 1 and arrays["sample"].shape[2] == 2 else 1  # one-pass sets hold batch 1

        def item(i):
            p, rest = divmod(i, steps * halves)
            s, half = divmod(rest, halves)
            row = prompts[p]
            sl = slice(None) if halves == 1 else slice(half, half + 1)
            sample = np.ascontiguousarray(arrays["sample"][row, s][sl])
            return {"sample": sample,
                    "timestep": np.full(sample.shape[0], arrays["timestep"][row, s], dtype=np.float32),
                    "encoder_hidden_states": np.ascontiguousarray(arrays["encoder_hidden_states"][row][sl])}

        return ArrayReader(len(prompts) * steps * halves, item, SUBMODULES[name].inputs)
    key = SUBMODULES[name].inputs[0]

    def item(i):
        return {key: np.ascontiguousarray(arrays[key][prompts[i]])}

    return ArrayReader(len(prompts), item, (key,))
