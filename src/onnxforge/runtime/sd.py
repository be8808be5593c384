"""Stable Diffusion text-to-image on onnxruntime: numpy + onnxruntime + tokenizers + Pillow, never torch.

    sd = StableDiffusion("artifacts/sd-tiny/fp32")
    result = sd.generate("a lighthouse at dusk", seed=3, steps=25, width=512, height=512, scheduler="euler")
    result.save("lighthouse.png")        # PNG text metadata: prompt, seed, steps, scheduler, artifact versions
    edited = sd.edit(result.image, mask, "a red boat", strength=0.8, seed=3)   # redraw inside a bool mask

Everything model-specific comes from the artifact's manifest `runtime` block: tokenizer file and
special token ids, scheduler_config.json (PNDM, DDIM, Euler, DPM-Solver++ 2M and LCM are built from
it, see schedulers.py), VAE scale and scaling factor (TAESD's is 1.0, the SD VAE's 0.18215), latent
channels, the UNet's batch (1: one-pass guidance, no negative prompt), supported sizes and defaults.

The loop is diffusers' StableDiffusionPipeline: CLIP tokens (padded to 77) -> text encoder, once for
the prompt and once for the negative prompt; latents ~ N(0, I) from the seed, times the scheduler's
init_noise_sigma (LCM also draws its between-step noise from that seed's generator); each step runs the UNet on [negative, prompt] (batch 2) and mixes the two noise
predictions with the guidance scale (classifier-free guidance; guidance <= 1 runs the prompt alone);
the VAE decoder turns latents / scaling_factor into pixels.

Memory: by default the text encoder, UNet and VAE decoder sessions are loaded once and kept (the
full-size UNet takes seconds to load). `low_memory=True` loads one submodule at a time and drops it
after its phase, and turns off onnxruntime's memory arena.

Editing (`edit`) reuses the same components: the picture is VAE-encoded, noised to a strength, and
denoised with the new prompt while, after every step, the original latents re-noised to that step are
put back outside a dilated latent mask (Blended Latent Diffusion; diffusers' inpaint pipeline does the
same blend for 4-channel UNets); the original pixels are pasted back outside a feathered mask.
"""

from __future__ import annotations

import gc
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import artifact as art
from .schedulers import SCHEDULER_NAMES, make_scheduler

__all__ = ["StableDiffusion", "Generation", "ClipTokenizer", "PromptTruncatedWarning", "EmptyPromptWarning"]

SUBMODULES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


class PromptTruncatedWarning(UserWarning):
    """The prompt had more tokens than the text encoder reads; the rest was dropped."""


class EmptyPromptWarning(UserWarning):
    """An empty prompt: an unconditional sample (the model draws whatever it likes)."""


class ClipTokenizer:
    """CLIP tokenization as the pipeline does it: [BOS] tokens [EOS] padded with pad_id to max_length."""

    def __init__(self, path: Path, max_length: int, bos_id: int, eos_id: int, pad_id: int):
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise art.ArtifactError(f"{path}: tokenizer file named by the manifest is missing; rebuild the artifact")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.max_length, self.bos_id, self.eos_id, self.pad_id = int(max_length), int(bos_id), int(eos_id), int(pad_id)

    def tokens(self, text: str) -> list[int]:
        """Token ids of the text alone (no BOS/EOS)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, text: str, warn: bool = True) -> tuple[np.ndarray, dict]:
        """(1, max_length) int64 ids, and {'tokens': n, 'truncated': dropped text or None}."""
        ids = self.tokens(text)
        room = self.max_length - 2
        info = {"tokens": len(ids), "truncated": None}
        if len(ids) > room:
            dropped = self.tokenizer.decode(ids[room:]).strip()
            info["truncated"] = dropped
            if warn:
                warnings.warn(f"prompt is {len(ids)} tokens but the text encoder reads {room}: truncated, "
                              f"dropping {dropped!r}", PromptTruncatedWarning, stacklevel=3)
            ids = ids[:room]
        row = [self.bos_id] + ids + [self.eos_id]
        row += [self.pad_id] * (self.max_length - len(row))
        return np.asarray([row], dtype=np.int64), info


@dataclass
class Generation:
    """One generated picture and how it was made."""

    image: "object"  # PIL.Image.Image, RGB
    pixels: np.ndarray  # (H, W, 3) float32 in [0, 1], before rounding to 8 bits
    latents: np.ndarray  # final latents (1, C, h, w), before the VAE
    settings: dict  # prompt, negative_prompt, seed, steps, scheduler, guidance_scale, width, height
    artifact: dict  # recipe, variant, version and per-component sha256 of what drew it
    timings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def png_metadata(self) -> dict[str, str]:
        s = self.settings
        meta = {"prompt": s["prompt"], "negative_prompt": s["negative_prompt"], "seed": str(s["seed"]),
                "steps": str(s["steps"]), "scheduler": s["scheduler"], "guidance_scale": str(s["guidance_scale"]),
                "size": f"{s['width']}x{s['height']}", "artifact": json.dumps(self.artifact, sort_keys=True),
                "software": "onnxforge imagine (onnxruntime)"}
        return meta

    def save(self, path: str | Path) -> Path:
        """Save as PNG with the settings and artifact versions in its text chunks."""
        from PIL.PngImagePlugin import PngInfo

        path = Path(path)
        if path.suffix.lower() != ".png":
            raise ValueError(f"{path}: the image is saved as PNG (metadata lives in PNG text chunks); use a .png name")
        info = PngInfo()
        for key, value in self.png_metadata().items():
            info.add_itxt(key, value)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.image.save(path, pnginfo=info)
        return path


def _stage_line(progress, text: str) -> None:
    """progress="lines" (not a terminal): one line per stage on stderr instead of a progress bar."""
    if progress == "lines":
        import sys

        print(f"  {text}", file=sys.stderr, flush=True)


def _session_factory(paths: dict[str, Path], manifest_components: dict | None, threads, low_memory):
    def make(name: str):
        sess = art.make_session(paths[name], threads=threads, low_memory=low_memory)
        if manifest_components is not None:
            expected = [i["name"] for i in manifest_components[name]["inputs"]]
            actual = [i.name for i in sess.get_inputs()]
            if expected != actual:
                raise art.ArtifactError(f"{paths[name]}: inputs {actual} do not match the manifest's {expected}")
        return sess

    return make


def predict_noise(unet, model_in: np.ndarray, t, embeddings: np.ndarray, guidance_scale: float) -> np.ndarray:
    """One UNet call. With [negative, prompt] embeddings (batch 2) the input is doubled and the two noise
    predictions are mixed by the guidance scale (classifier-free guidance); batch 1 runs the prompt alone."""
    cfg = embeddings.shape[0] == 2
    if cfg:
        model_in = np.concatenate([model_in, model_in])
    noise = unet.run(None, {"sample": model_in, "timestep": np.full(model_in.shape[0], t, dtype=np.float32),
                            "encoder_hidden_states": embeddings})[0]
    if cfg:
        uncond, cond = noise[:1], noise[1:]
        noise = uncond + np.float32(guidance_scale) * (cond - uncond)
    return noise


class StableDiffusion:
    """Text-to-image with an SD artifact (fp32 or a quantized variant)."""

    def __init__(self, artifact, threads: int | None = None, low_memory: bool = False, check_hashes: bool = True):
        a = art.load(artifact, check_hashes=check_hashes, expect_kind="sd")
        m = a.manifest
        paths = {name: a.component_path(name) for name in m["components"]}
        versions = {"recipe": m["artifact"]["recipe"], "variant": m["artifact"]["variant"],
                    "version": m["artifact"]["version"],
                    "components": {n: c["files"][0]["sha256"][:16] for n, c in m["components"].items()}}
        self._init(a.dir, a.runtime, paths, versions, _session_factory(paths, m["components"], threads, low_memory),
                   low_memory)
        self.artifact = a

    @classmethod
    def from_folder(cls, folder: Path, runtime: dict, components: dict[str, str], threads: int | None = None,
                    low_memory: bool = False, label: dict | None = None) -> "StableDiffusion":
        """A pipeline on component files that are not (yet) a published artifact: used by the build's checks."""
        self = cls.__new__(cls)
        folder = Path(folder)
        paths = {name: folder / file for name, file in components.items()}
        self._init(folder, runtime, paths, label or {"folder": str(folder)},
                   _session_factory(paths, None, threads, low_memory), low_memory)
        self.artifact = None
        return self

    def _init(self, folder: Path, runtime: dict, paths: dict, versions: dict, make_session, low_memory: bool) -> None:
        self.dir, self.runtime, self.paths, self.versions = Path(folder), runtime, paths, versions
        self._make_session, self.low_memory = make_session, low_memory
        self.tokenizer = ClipTokenizer(self.dir / runtime["tokenizer"], runtime["max_length"], runtime["bos_id"],
                                       runtime["eos_id"], runtime["pad_id"])
        self._sessions: dict = {}
        self.session_loads = {name: 0 for name in paths}
        if not low_memory:  # all at once, kept for every picture
            for name in ("text_encoder", "unet", "vae_decoder"):
                self.session(name)

    # ---- sessions ---------------------------------------------------------------------

    def session(self, name: str):
        if name not in self.paths:
            raise art.ArtifactError(f"{self.dir}: this artifact has no {name} component")
        if name not in self._sessions:
            self._sessions[name] = self._make_session(name)
            self.session_loads[name] += 1
        return self._sessions[name]

    def _release(self, name: str) -> None:
        if self.low_memory and name in self._sessions:
            del self._sessions[name]
            gc.collect()

    @property
    def loaded(self) -> list[str]:
        return sorted(self._sessions)

    # ---- checks -------------------------------------------------------------------------

    def check_size(self, width, height) -> tuple[int, int]:
        rt = self.runtime
        mult, lo, hi = rt["size_multiple"], rt["min_size"], rt["max_size"]
        for label, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{label} must be a whole number of pixels, got {v!r}")
            if v % mult:
                lower, upper = max(mult, v - v % mult), v - v % mult + mult
                raise ValueError(f"{label} {v} is not a multiple of {mult} (the VAE works on {rt['vae_scale_factor']}x"
                                 f"{rt['vae_scale_factor']} pixel blocks); try {lower} or {upper}")
            if not lo <= v <= hi:
                raise ValueError(f"{label} {v} is outside the supported range {lo}..{hi} px")
        fixed = rt.get("fixed_size")
        if fixed and [int(width), int(height)] != list(fixed):
            raise ValueError(f"this artifact was exported for {fixed[0]}x{fixed[1]} px only (export.dynamic_size: false)")
        return int(width), int(height)

    def check_steps(self, steps) -> int:
        hi = self.runtime["max_steps"]
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= hi:
            raise ValueError(f"steps must be a whole number from 1 to {hi}, got {steps!r}")
        return int(steps)

    @staticmethod
    def check_scheduler(name) -> str:
        if name not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULER_NAMES)}")
        return name

    @staticmethod
    def check_guidance(g) -> float:
        if isinstance(g, bool) or not isinstance(g, (int, float, np.floating)) or not (0.0 <= float(g) <= 50.0) \
                or math.isnan(float(g)):
            raise ValueError(f"guidance scale must be a number from 0 to 50 (<= 1 turns guidance off), got {g!r}")
        return float(g)

    def check_one_pass(self, guidance_scale: float) -> None:
        """A UNet exported for batch 1 (one-pass guidance: LCM at guidance 1) has no negative-prompt pass."""
        if guidance_scale > 1.0 and int(self.runtime.get("unet_batch", 2)) == 1:
            raise ValueError(f"guidance scale {guidance_scale:g} > 1 needs a negative-prompt pass, but this artifact's "
                             f"UNet runs the prompt alone (one-pass, batch 1): use --guidance 1 or a classifier-free "
                             f"guidance artifact such as sd-tiny")

    # ---- the pipeline ------------------------------------------------------------------------

    def encode_prompts(self, prompt: str, negative_prompt: str, guidance: bool) -> tuple[np.ndarray, dict]:
        """Text embeddings: (2, 77, D) [negative, prompt] with guidance, else (1, 77, D)."""
        ids, info = self.tokenizer(prompt)
        rows = [ids]
        if guidance:
            neg_ids, neg_info = self.tokenizer(negative_prompt)
            rows.insert(0, neg_ids)
            info["negative_tokens"], info["negative_truncated"] = neg_info["tokens"], neg_info["truncated"]
        te = self.session("text_encoder")
        out = te.run(None, {"input_ids": np.concatenate(rows)})[0]
        self._release("text_encoder")
        return out.astype(np.float32), info

    def initial_latents(self, seed: int | np.random.Generator, width: int, height: int) -> np.ndarray:
        """N(0, I) latents from a seed, or drawn next from the run's Generator."""
        f, c = self.runtime["vae_scale_factor"], self.runtime["latent_channels"]
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        return rng.standard_normal((1, c, height // f, width // f), dtype=np.float32)

    def denoise(self, latents: np.ndarray, embeddings: np.ndarray, scheduler: str, steps: int, guidance_scale: float,
                progress: bool | str = False, callback=None,
                generator: np.random.Generator | None = None) -> tuple[np.ndarray, list[float]]:
        """`generator`: the run's Generator, for schedulers that draw noise between steps (LCM)."""
        sched = make_scheduler(scheduler, self.runtime["scheduler_config"])
        step_kwargs = {"generator": generator} if sched.stochastic else {}
        sched.set_timesteps(steps)
        x = (latents * np.float32(sched.init_noise_sigma)).astype(np.float32)
        unet = self.session("unet")
        times = []
        from tqdm import tqdm

        # The bar counts UNet calls: PNDM calls the UNet steps + 1 times (its first step is run twice).
        calls = len(sched.timesteps)
        label = f"{steps} {scheduler} steps" + (f" = {calls} UNet calls" if calls != steps else "")
        bar = tqdm(sched.timesteps, desc=f"denoising ({label})", unit="call", disable=progress is not True, leave=False)
        for i, t in enumerate(bar):
            started = time.perf_counter()
            noise = predict_noise(unet, sched.scale_model_input(x, t), t, embeddings, guidance_scale)
            times.append(time.perf_counter() - started)
            x = sched.step(noise, t, x, **step_kwargs)
            if callback is not None:
                callback(i, t, x)
        _stage_line(progress, f"denoising: {label}, {sum(times):.1f} s")
        self._release("unet")
        return x, times

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> (H, W, 3) float32 pixels in [0, 1]."""
        vae = self.session("vae_decoder")
        z = (latents / np.float32(self.runtime["scaling_factor"])).astype(np.float32)
        image = vae.run(None, {"latent_sample": z})[0]
        self._release("vae_decoder")
        return np.clip(image[0] / 2 + 0.5, 0.0, 1.0).transpose(1, 2, 0).astype(np.float32)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W, 3) pixels in [0, 1] -> latent mean * scaling_factor (1, C, H/f, W/f), as img2img starts."""
        vae = self.session("vae_encoder")
        x = (np.asarray(pixels, np.float32).transpose(2, 0, 1)[None] * 2 - 1).astype(np.float32)
        mean = vae.run(["latent_mean"], {"sample": x})[0]
        self._release("vae_encoder")
        return mean * np.float32(self.runtime["scaling_factor"])

    def generate(self, prompt: str, negative_prompt: str = "", *, steps: int | None = None,
                 guidance_scale: float | None = None, width: int | None = None, height: int | None = None,
                 seed: int | None = None, scheduler: str | None = None, latents: np.ndarray | None = None,
                 progress: bool | str = False, callback=None) -> Generation:
        """Draw one picture. Unset settings come from the manifest; `latents` (1, C, h, w) replaces the
        seeded starting noise (it is scaled by the scheduler's init_noise_sigma, as diffusers does).
        progress: True a progress bar, "lines" one line per stage on stderr (for logs), False nothing."""
        from PIL import Image

        rt = self.runtime
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be text, got {type(prompt).__name__}")
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative prompt must be text, got {type(negative_prompt).__name__}")
        steps = self.check_steps(rt["steps"] if steps is None else steps)
        scheduler = self.check_scheduler(rt["scheduler"] if scheduler is None else scheduler)
        guidance_scale = self.check_guidance(rt["guidance_scale"] if guidance_scale is None else guidance_scale)
        self.check_one_pass(guidance_scale)
        width, height = self.check_size(rt["width"] if width is None else width, rt["height"] if height is None else height)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2**32)
        elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
        notes = []
        if not prompt.strip():
            notes.append("empty prompt: an unconditional sample (the model draws whatever it likes)")
            warnings.warn(notes[-1], EmptyPromptWarning, stacklevel=2)
        guidance = guidance_scale > 1.0
        if negative_prompt.strip() and not guidance:
            notes.append(f"negative prompt ignored: guidance scale {guidance_scale} <= 1 turns guidance off")
        # One Generator per run, as diffusers passes one: the starting latents, then any step noise.
        rng = np.random.default_rng(seed)
        if latents is None:
            latents = self.initial_latents(rng, width, height)
        else:
            f, c = rt["vae_scale_factor"], rt["latent_channels"]
            expected = (1, c, height // f, width // f)
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != expected:
                raise ValueError(f"latents of shape {latents.shape} do not fit {width}x{height} px: expected {expected}")

        started = time.perf_counter()
        embeddings, token_info = self.encode_prompts(prompt, negative_prompt, guidance)
        t_text = time.perf_counter() - started
        _stage_line(progress, f"text encoder: {t_text:.2f} s")
        if token_info["truncated"]:
            notes.append(f"prompt truncated to {rt['max_length'] - 2} tokens, dropped {token_info['truncated']!r}")
        final, step_times = self.denoise(latents, embeddings, scheduler, steps, guidance_scale, progress, callback,
                                         generator=rng)
        t_vae = time.perf_counter()
        pixels = self.decode(final)
        t_end = time.perf_counter()
        _stage_line(progress, f"VAE decoder: {t_end - t_vae:.2f} s")
        image = Image.fromarray((pixels * 255).round().astype(np.uint8))
        settings = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": int(seed), "steps": steps,
                    "scheduler": scheduler, "guidance_scale": guidance_scale, "width": width, "height": height}
        timings = {"text_encoder_s": round(t_text, 4), "unet_steps": len(step_times),
                   "unet_s_per_step": round(float(np.mean(step_times)), 4) if step_times else 0.0,
                   "vae_decoder_s": round(t_end - t_vae, 4), "total_s": round(t_end - started, 4)}
        return Generation(image, pixels, final, settings, self.versions, timings, notes)

    def edit(self, image, mask, prompt: str, negative_prompt: str = "", *, strength: float = 0.8,
             steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
             scheduler: str | None = None, dilate_latents: int = 1, feather_px: int | None = None,
             progress: bool = False, callback=None) -> Generation:
        """Redraw the masked part of a picture from `prompt`, keeping the rest: Blended Latent Diffusion
        (Avrahami et al. 2023), which needs no inpainting checkpoint.

        image: (H, W, 3) uint8 (or a PIL image) at a size the artifact supports; mask: (H, W) bool, the
        part to redraw. strength in (0, 1]: how far into the noise the picture goes (1 = from scratch,
        the mask's content is then only a place, not a hint); `steps` is the full schedule, of which
        about strength x steps run (LCM: all `steps` run, picked from the less noisy part of its
        schedule, as diffusers' LCM img2img pipeline does). Pixels outside the mask come back byte-identical.
        """
        from PIL import Image

        from . import edits

        rt = self.runtime
        # 1. check inputs
        rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"picture must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
        height, width = rgb.shape[:2]
        self.check_size(width, height)
        mask = np.asarray(mask)
        if mask.shape != (height, width):
            raise ValueError(f"mask is {mask.shape[::-1]} px (WxH) but the picture is {width}x{height} px")
        mask = mask.astype(bool)
        if not mask.any():
            raise ValueError("the mask is empty: nothing to redraw (pick another object)")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be text, got {type(prompt).__name__}")
        if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) \
                or not 0.0 < float(strength) <= 1.0:
            raise ValueError(f"strength must be a number in (0, 1] (1 = redraw from pure noise), got {strength!r}")
        steps = self.check_steps(rt["steps"] if steps is None else steps)
        scheduler = self.check_scheduler(rt["scheduler"] if scheduler is None else scheduler)
        guidance_scale = self.check_guidance(rt["guidance_scale"] if guidance_scale is None else guidance_scale)
        self.check_one_pass(guidance_scale)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
        guidance = guidance_scale > 1.0
        sched = make_scheduler(scheduler, rt["scheduler_config"])
        timesteps = sched.img2img_timesteps(steps, float(strength))

        # 2. encode the prompt and the picture
        started = time.perf_counter()
        embeddings, token_info = self.encode_prompts(prompt, negative_prompt, guidance)
        t_text = time.perf_counter()
        original = self.encode_image(rgb.astype(np.float32) / 255)
        t_enc = time.perf_counter()

        # 3. latent mask: a latent cell is redrawn if any of its f x f pixels is masked, then dilated so
        #    the new content reaches past the pixel mask's edge (the pixel paste trims it back)
        f = rt["vae_scale_factor"]
        cells = mask.reshape(height // f, f, width // f, f).any(axis=(1, 3))
        m = edits.dilate(cells, dilate_latents).astype(np.float32)[None, None]

        # 4. noise the picture's latents to the first timestep
        rng = np.random.default_rng(seed)  # one Generator per run: this noise, then any step noise (LCM)
        noise = rng.standard_normal(original.shape, dtype=np.float32)
        step_kwargs = {"generator": rng} if sched.stochastic else {}
        x = sched.add_noise(original, noise, timesteps[0])

        # 5. denoise with the new prompt; after every step the original, re-noised to the level the step
        #    reached, goes back outside the mask (at the end: the clean original)
        unet = self.session("unet")
        step_times = []
        from tqdm import tqdm

        for i, t in enumerate(tqdm(timesteps, desc="editing", unit="step", disable=not progress, leave=False)):
            t0 = time.perf_counter()
            eps = predict_noise(unet, sched.scale_model_input(x, t), t, embeddings, guidance_scale)
            step_times.append(time.perf_counter() - t0)
            x = sched.step(eps, t, x, **step_kwargs)
            known = sched.add_noise(original, noise, timesteps[i + 1]) if i < len(timesteps) - 1 else original
            x = (m * x + (1 - m) * known).astype(np.float32)
            if callback is not None:
                callback(i, t, x)
        self._release("unet")

        # 6. decode, then paste the original pixels back outside a feathered (inward) pixel mask
        t_vae = time.perf_counter()
        pixels = self.decode(x)
        radius = edits.default_feather((height, width)) if feather_px is None else int(feather_px)
        out = edits.blend(rgb, pixels, edits.feather(mask, radius))
        t_end = time.perf_counter()

        notes = []
        if token_info["truncated"]:
            notes.append(f"prompt truncated to {rt['max_length'] - 2} tokens, dropped {token_info['truncated']!r}")
        settings = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": int(seed), "steps": steps,
                    "scheduler": scheduler, "guidance_scale": guidance_scale, "width": width, "height": height,
                    "strength": float(strength), "denoising_steps": len(timesteps), "dilate_latents": dilate_latents,
                    "feather_px": radius}
        timings = {"text_encoder_s": round(t_text - started, 4), "vae_encoder_s": round(t_enc - t_text, 4),
                   "unet_steps": len(step_times),
                   "unet_s_per_step": round(float(np.mean(step_times)), 4) if step_times else 0.0,
                   "vae_decoder_s": round(t_end - t_vae, 4), "total_s": round(t_end - started, 4)}
        return Generation(Image.fromarray(out), pixels, x, settings, self.versions, timings, notes)
