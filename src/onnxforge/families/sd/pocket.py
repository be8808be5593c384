"""The pocket Stable Diffusion (issue 16): an SD-layout pipeline trained here on the pocket world.

Three models in diffusers' and transformers' own classes, so the result is a Hub-layout folder that the
family's export, quantize, validate and runtime code reads like any other:

1. a small AutoencoderKL learns to reconstruct world pictures (64 px -> 16x16x4 latents), then its latent
   scaling factor is set from the data as SD's was (1 / std of the latents);
2. a small CLIPTextModel (with a CLIP BPE trained on the world's captions) and a small UNet2DConditionModel
   learn together to predict the noise of those latents (epsilon, SD's scaled-linear betas), with 10 % of
   captions dropped so classifier-free guidance works;
3. the world's picture oracle (onnxforge.world.read_picture) scores samples along the way and at the end.

Training is seeded; on one machine class it gives the same weights. The weights are small enough to commit
(pocket/sd), with the command that reproduces them (`onnxforge pocket-train sd`).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from ... import world

# The architecture (sizes measured on a 2-core AMD EPYC, AVX-512): a 3-level VAE, 64 px pictures -> 16x16x4
# latents (0.5 M parameters, ~0.4 s per step at batch 16). The first runs used 4 levels (8x8 latents): even the
# reconstructions of rendered pictures lost the shapes (docs/pocket-sd.md). The UNet works on 16x16 latents
# with self- and cross-attention at 8x8 and 4x4 only (1.7 M parameters, ~0.2 s per step at batch 32).
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
        "max_position_embeddings": 16, "hidden_act": "quick_gelu", "projection_dim": 64}
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [24, 48, 48],
       "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64,
       "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3}
UNET = {"sample_size": 16, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 64,
        "attention_head_dim": 8, "norm_num_groups": 16}
SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "clip_sample": False}
CAPTION_DROP = 0.1
OFFSET_NOISE = 0.25
VAE_LR = 3e-3
FOREGROUND_WEIGHT = 8.0  # extra loss weight on the shapes' pixels (see _foreground_weights)


def _cosine_lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _pictures(config: world.WorldConfig, seed: int, count: int, with_masks: bool = False):
    import torch

    captions, pixels, masks = [], [], []
    for scene, image, shape_masks in world.dataset(config, seed, count):
        captions.append(scene.caption)
        pixels.append(np.asarray(image))
        masks.append(shape_masks.any(axis=0))
    pixels = torch.tensor(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if with_masks:
        return captions, pixels, torch.tensor(np.stack(masks)).unsqueeze(1).float()
    return captions, pixels


def _foreground_weights(masks, weight: float, grow: int = 2):
    """Per-pixel loss weights: 1 on the background, 1 + weight on the shapes and `grow` pixels around them (a
    small shape is 3-6 % of a picture: an unweighted loss learns the background first and the shapes last)."""
    import torch

    grown = torch.nn.functional.max_pool2d(masks, kernel_size=2 * grow + 1, stride=1, padding=grow)
    return 1.0 + weight * grown


def train_vae(pixels, steps: int, seed: int, lr: float = 2e-3, batch: int = 16, masks=None,
              foreground_weight: float = 0.0, log=print):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        idx = torch.randint(0, len(pixels), (batch,), generator=gen)
        posterior = vae.encode(pixels[idx]).latent_dist
        # The posterior's mean, not a sample: with a KL weight this small the encoder's variance only shrinks
        # slowly, and decoding noisy samples taught the first runs to draw blurred blobs instead of shapes.
        recon = vae.decode(posterior.mean).sample
        # L1 beside MSE: sharper edges (MSE alone left blurred blobs where the shapes were)
        err = recon - pixels[idx]
        w = 1.0 if masks is None else _foreground_weights(masks[idx], foreground_weight)
        loss = (w * (err.abs() + err ** 2)).mean() + 1e-5 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    return vae.eval()


def encode_latents(vae, pixels, batch: int = 64):
    import torch

    with torch.no_grad():
        return torch.cat([vae.encode(pixels[i:i + batch]).latent_dist.mean for i in range(0, len(pixels), batch)])


def train_denoiser(latents, token_ids, empty_ids, text_encoder, unet, steps: int, seed: int, lr: float = 1e-3,
                   batch: int = 32, ema_decay: float = 0.999, weights=None, evaluate=None, eval_every: int = 0,
                   log=print):
    """Joint text encoder + UNet training on (scaled latents, caption token ids); returns the EMA copies."""
    import torch
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    noise_sched = DDPMScheduler.from_config({k: v for k, v in SCHEDULER.items() if not k.startswith("_")})
    alphas = noise_sched.alphas_cumprod
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema_te, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    ema_params = list(ema_te.parameters()) + list(ema_unet.parameters())
    gen = torch.Generator().manual_seed(seed)
    text_encoder.train()
    unet.train()
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        ids = token_ids[idx].clone()
        drop = torch.rand(batch, generator=gen) < CAPTION_DROP
        ids[drop] = empty_ids
        x0 = latents[idx]
        # Offset noise: a random per-channel constant on top. SD's schedule keeps ~7 % of the signal at t=999, and
        # a flat background is the latents' mean, which noise of 16x16 latents hides only to ~6 %: without the
        # offset the UNet learnt to read the background from the starting noise instead of the caption
        # (the 8000-step run drew the caption's background 25 % of the time; docs/pocket-sd.md).
        noise = torch.randn(x0.shape, generator=gen) + OFFSET_NOISE * torch.randn((batch, x0.shape[1], 1, 1), generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context = text_encoder(ids).last_hidden_state
        err = (unet(xt, t, context).sample - noise) ** 2
        # per-latent weights (more on the shape) shift capacity to the shapes; each position's optimum is unchanged
        loss = (err if weights is None else weights[idx] * err).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_params, params):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        if step % 200 == 0 or step == steps - 1:
            log(f"denoiser step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
        if evaluate and eval_every and (step + 1) % eval_every == 0:
            log(f"denoiser step {step + 1}: oracle {evaluate(ema_te, ema_unet)}")
    return ema_te, ema_unet


def sample_pictures(text_encoder, unet, vae, tokenizer, captions: list[str], seed: int, steps: int = 20,
                    guidance: float = 4.0):
    """Pictures for captions with diffusers' DDIM in torch (the training-time check; the runtime is numpy+ORT)."""
    import torch
    from diffusers import DDIMScheduler
    from PIL import Image

    sched = DDIMScheduler.from_config({k: v for k, v in SCHEDULER.items() if not k.startswith("_")})
    sched.set_timesteps(steps)
    enc = lambda texts: text_encoder(tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                               truncation=True, return_tensors="pt").input_ids).last_hidden_state
    with torch.no_grad():
        cond, uncond = enc(captions), enc([""] * len(captions))
        gen = torch.Generator().manual_seed(seed)
        side = VAE["sample_size"] // 2 ** (len(VAE["block_out_channels"]) - 1)
        x = torch.randn((len(captions), VAE["latent_channels"], side, side), generator=gen)
        for t in sched.timesteps:
            eps = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample
            e_u, e_c = eps.chunk(2)
            x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
        images = vae.decode(x / vae.config.scaling_factor).sample
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def oracle_scores(pictures, captions) -> dict:
    colour = shape = background = 0
    for picture, caption in zip(pictures, captions):
        want = world.parse_caption(caption)
        got = world.read_picture(picture)
        colour += got.colour == want.shapes[0].colour
        shape += got.shape == want.shapes[0].shape
        background += got.background == want.background
    n = len(captions)
    return {"colour": round(colour / n, 3), "shape": round(shape / n, 3), "background": round(background / n, 3),
            "pictures": n}


def reconstruction_scores(vae, config: world.WorldConfig, seed: int, count: int = 32) -> dict:
    """The oracle on VAE reconstructions of held-out rendered pictures: the ceiling for the whole pipeline."""
    import torch
    from PIL import Image

    captions, pixels = _pictures(config, seed + 1000, count)
    with torch.no_grad():
        images = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return oracle_scores([Image.fromarray(a) for a in arr], captions)


def eval_captions(config: world.WorldConfig, seed: int, count: int) -> list[str]:
    return [scene.caption for scene, _, _ in world.dataset(config, seed, count)]


def train_pocket(out: Path, seed: int = 0, examples: int = 4000, vae_steps: int = 1500, unet_steps: int = 5500,
                 eval_every: int = 1000, log=None) -> dict:
    """Train the three models and save a Hub-layout Stable Diffusion folder to `out`; returns a record."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .source import train_clip_tokenizer

    if log is None:  # progress on stderr: a build stage keeps stdout's library chatter for failures only
        def log(message):
            print(message, file=sys.stderr, flush=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = world.WorldConfig(size=64, max_shapes=1)
    captions, pixels, masks = _pictures(config, seed, examples, with_masks=True)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "captions.txt"
    corpus.write_text("\n".join(sorted(set(captions))) + "\n")
    # 400: every word of the world becomes one token (at 200 the BPE had no room for merges: captions went
    # letter by letter, and 16 positions cut off the background; measured on the first training run).
    train_clip_tokenizer(corpus, 400, out / "tokenizer")
    corpus.unlink()
    tokenizer = CLIPTokenizer(str(out / "tokenizer" / "vocab.json"), str(out / "tokenizer" / "merges.txt"),
                              model_max_length=TEXT["max_position_embeddings"])
    started = time.time()
    vae = train_vae(pixels, vae_steps, seed, lr=VAE_LR, masks=masks, foreground_weight=FOREGROUND_WEIGHT, log=log)
    checks = eval_captions(config, seed + 1000, 32)
    log(f"vae: oracle on reconstructions of {len(checks)} held-out pictures {reconstruction_scores(vae, config, seed)}")
    latents = encode_latents(vae, pixels)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    factor = pixels.shape[-1] // latents.shape[-1]
    latent_weights = _foreground_weights(torch.nn.functional.max_pool2d(masks, factor), FOREGROUND_WEIGHT / 2, grow=0)
    vae_seconds = time.time() - started

    def tokens(texts):
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    token_ids, empty_ids = tokens(captions), tokens([""])[0]
    torch.manual_seed(seed + 1)
    te_cfg = dict(TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    unet = UNet2DConditionModel(**UNET)

    def evaluate(te, un):
        pictures = sample_pictures(te, un, vae, tokenizer, checks, seed)
        evaluate.count += 1  # each check's pictures with their readings, beside the model folder
        world.contact_sheet(pictures, checks).save(out.parent / f"training-check-{evaluate.count}.png")
        return oracle_scores(pictures, checks)

    evaluate.count = 0

    text_encoder, unet = train_denoiser(latents, token_ids, empty_ids, text_encoder, unet, unet_steps, seed,
                                        weights=latent_weights, evaluate=evaluate, eval_every=eval_every, log=log)
    scores = evaluate(text_encoder, unet)
    log(f"pocket SD: oracle on {len(checks)} held-out captions {scores}")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=PNDMScheduler.from_config({k: v for k, v in SCHEDULER.items()
                                                                        if not k.startswith("_")}),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    # shards under 4 MB: the weights are committed (pocket/sd), and the repository takes no file over 5 MB
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="4MB")
    record = {"seed": seed, "examples": examples, "vae_steps": vae_steps, "unet_steps": unet_steps,
              "latent_scaling_factor": round(scaling, 6), "train_seconds": round(time.time() - started),
              "vae_seconds": round(vae_seconds), "torch_oracle": scores}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
