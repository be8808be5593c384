"""Issue 12, the fast picture on the tiny model: a LoRA fused into the UNet before export, a UNet exported for
batch 1 (one-pass guidance), TAESD as the VAE, LCM in the runtime; bad input for each.

References are diffusers' own public APIs (StableDiffusionPipeline.load_lora_weights + fuse_lora,
AutoencoderTiny, LCMScheduler), built here from the recipe's seeds, independent of the build's code.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml

from onnxforge.runtime import artifact as art
from onnxforge.runtime.sd import StableDiffusion

from conftest import REPO, new_project, run_cli

# Measured on the tiny model: fused UNet vs diffusers <= ~2e-6, TAESD <= ~2e-7, whole LCM pictures <= ~1e-6
# (outputs O(1), pixels in [0, 1]); the stated tolerances leave room for other CPUs' float kernels.
PARITY_ATOL = 1e-4
IMAGE_ATOL = 1e-4
PROMPT = "a lighthouse on a rocky cliff at dusk, oil painting"
RECIPE = yaml.safe_load((REPO / "recipes" / "sd-tiny-lcm.yaml").read_text())


@pytest.fixture(scope="module")
def lcm(sd_tiny_lcm):
    return art.load(sd_tiny_lcm.variant("fp32", "sd-tiny-lcm"))


@pytest.fixture(scope="module")
def lcm_sdvae(sd_tiny_lcm):
    return art.load(sd_tiny_lcm.variant("fp32-sdvae", "sd-tiny-lcm"))


@pytest.fixture(scope="module")
def lcm_int8(sd_tiny_lcm):
    return art.load(sd_tiny_lcm.variant("int8", "sd-tiny-lcm"))


@pytest.fixture(scope="module")
def source_stage(sd_tiny_lcm, lcm):
    digest = next(s["digest"] for s in lcm.manifest["stages"] if s["stage"] == "source")
    return sd_tiny_lcm.artifacts / "sd-tiny-lcm" / ".stages" / f"source-all-{digest}"


@pytest.fixture(scope="module")
def base_pipe(source_stage):
    """diffusers' pipeline with the recipe's seeded random weights, before any LoRA (built from the recipe's
    config and seed, as the source stage does, with the stage's tokenizer files)."""
    from onnxforge.families.sd.source import random_pipeline

    pipe = random_pipeline(RECIPE["source"]["random"]["config"], RECIPE["source"]["random"]["seed"],
                           source_stage / "model" / "tokenizer")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def fused_pipe(base_pipe, source_stage):
    """The same pipeline with the build's LoRA file loaded and fused the way diffusers documents it."""
    import copy

    from diffusers import AutoencoderTiny, LCMScheduler

    pipe = copy.deepcopy(base_pipe)
    pipe.load_lora_weights(source_stage / "lora", weight_name="pytorch_lora_weights.safetensors", adapter_name="lcm")
    pipe.fuse_lora(lora_scale=RECIPE["source"]["lora"]["scale"])
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    taesd = RECIPE["source"]["taesd"]["random"]
    with torch.random.fork_rng():
        torch.manual_seed(taesd["seed"])
        pipe.vae = AutoencoderTiny(**taesd["config"]).eval()
    return pipe


def _unet_inputs(seed=3, size=64):
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((1, 4, size // 8, size // 8), dtype=np.float32),
            "timestep": np.asarray([759.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 32), dtype=np.float32)}


def _torch_unet(unet, inputs):
    with torch.no_grad():
        return unet(torch.from_numpy(inputs["sample"]), torch.from_numpy(inputs["timestep"]),
                    encoder_hidden_states=torch.from_numpy(inputs["encoder_hidden_states"]), return_dict=False)[0].numpy()


# ---- part 1: LoRA fused before export -------------------------------------------------------------


def test_exported_unet_is_diffusers_unet_with_the_lora_loaded_and_fused(lcm, base_pipe, fused_pipe):
    inputs = _unet_inputs()
    ours = lcm.session("unet").run(None, inputs)[0]
    fused = _torch_unet(fused_pipe.unet, inputs)
    base = _torch_unet(base_pipe.unet, inputs)
    assert np.abs(ours - fused).max() <= PARITY_ATOL
    # The LoRA changed the UNet (a no-op LoRA would pass the line above too).
    assert np.abs(fused - base).max() > 100 * PARITY_ATOL


def test_manifest_records_the_lora_source_and_scale(lcm, source_stage):
    lora = lcm.manifest["source"]["lora"]
    assert lora["kind"] == "random" and lora["scale"] == 1.0 and lora["rank"] == 4 and lora["alpha"] == 4
    assert lora["target_modules"][:4] == ["to_q", "to_k", "to_v", "to_out.0"] and "time_emb_proj" in lora["target_modules"]
    assert lora["layers_fused"] > 50 and len(lora["file_sha256"]) == 64
    assert (source_stage / lora["file"]).is_file()
    assert lcm.manifest["source"]["taesd"]["scaling_factor"] == 1.0


def test_lora_scale_changes_the_fusion(base_pipe, source_stage):
    """fuse_lora's scale is applied: scale 0.5 lands halfway (LoRA is linear in the weights)."""
    import copy

    from onnxforge.families.sd.lora import fuse_lora

    inputs = _unet_inputs(seed=5)
    outs = {}
    for scale in (0.5, 1.0):
        unet = copy.deepcopy(base_pipe.unet)
        fuse_lora(unet, source_stage / "lora" / "pytorch_lora_weights.safetensors", scale)
        assert not any("lora" in n for n, _ in unet.named_parameters())  # plain modules after unload
        outs[scale] = _torch_unet(unet, inputs)
    base = _torch_unet(base_pipe.unet, inputs)
    assert np.abs(outs[0.5] - base).max() > 1e-3 and np.abs(outs[1.0] - outs[0.5]).max() > 1e-3


# ---- part 3: one-pass guidance ------------------------------------------------------------------


def test_one_pass_unet_is_exported_for_batch_one(lcm, lcm_sdvae, sd_tiny_lcm):
    for a in (lcm, lcm_sdvae):
        unet = {i["name"]: i["shape"] for i in a.manifest["components"]["unet"]["inputs"]}
        assert unet["sample"][0] == 1 and unet["timestep"] == [1] and unet["encoder_hidden_states"][0] == 1
        assert a.runtime["unet_batch"] == 1 and a.runtime["guidance_scale"] == 1.0
    with pytest.raises(Exception):  # the graph itself refuses a CFG batch
        lcm.session("unet").run(None, {k: np.concatenate([v, v]) for k, v in _unet_inputs().items()})


def test_guidance_above_one_on_a_batch_one_unet_is_one_clear_line(lcm, tmp_path):
    sd = StableDiffusion(lcm)
    with pytest.raises(ValueError, match=r"guidance scale 7\.5 > 1 needs a negative-prompt pass, but this artifact's "
                                         r"UNet runs the prompt alone \(one-pass, batch 1\)") as info:
        sd.generate(PROMPT, guidance_scale=7.5)
    assert "\n" not in str(info.value)
    proc = run_cli("imagine", "a fox", "--artifact", str(lcm.dir), "--guidance", "3", "--out", str(tmp_path / "x.png"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "guidance scale 3 > 1 needs a negative-prompt pass" in lines[0]
    assert not (tmp_path / "x.png").exists()


# ---- part 4: TAESD ------------------------------------------------------------------------------


def test_taesd_decoder_and_encoder_match_diffusers_autoencoder_tiny(lcm, fused_pipe):
    vae = fused_pipe.vae  # AutoencoderTiny from the recipe's config and seed
    assert lcm.manifest["components"]["vae_decoder"]["files"][0]["file"] == "taesd_decoder.onnx"
    rng = np.random.default_rng(0)
    for w, h in ((64, 64), (96, 48)):
        z = rng.standard_normal((1, 4, h // 8, w // 8), dtype=np.float32)
        x = rng.uniform(-1, 1, (1, 3, h, w)).astype(np.float32)
        with torch.no_grad():
            ref_dec = vae.decode(torch.from_numpy(z)).sample.numpy()
            ref_enc = vae.encode(torch.from_numpy(x)).latents.numpy()
        assert np.abs(lcm.session("vae_decoder").run(None, {"latent_sample": z})[0] - ref_dec).max() <= PARITY_ATOL
        assert np.abs(lcm.session("vae_encoder").run(None, {"sample": x})[0] - ref_enc).max() <= PARITY_ATOL


def test_runtime_reads_taesd_scaling_from_the_manifest(lcm, lcm_sdvae, fused_pipe):
    """TAESD decodes the SD-scaled latents as they are (scaling_factor 1.0); the SD VAE divides by 0.18215."""
    assert lcm.runtime["scaling_factor"] == fused_pipe.vae.config.scaling_factor == 1.0
    assert lcm_sdvae.runtime["scaling_factor"] == 0.18215
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8), dtype=np.float32)
    with torch.no_grad():
        ref = fused_pipe.vae.decode(torch.from_numpy(latents) / fused_pipe.vae.config.scaling_factor).sample.numpy()
    ref = np.clip(ref[0] / 2 + 0.5, 0, 1).transpose(1, 2, 0)
    assert np.abs(StableDiffusion(lcm).decode(latents) - ref).max() <= IMAGE_ATOL


# ---- the fast picture end to end ----------------------------------------------------------------


def test_fast_picture_matches_diffusers_lcm_lora_taesd_pipeline(lcm, fused_pipe, monkeypatch):
    """diffusers' StableDiffusionPipeline with the LoRA fused, LCMScheduler, AutoencoderTiny, guidance 1, 4 steps,
    the same start latents and step noise (replayed from the run's numpy Generator): the same picture."""
    from diffusers.schedulers import scheduling_lcm

    steps, seed = 4, 21
    sd = StableDiffusion(lcm)
    replay = np.random.default_rng(seed)
    latents = sd.initial_latents(replay, 64, 64)
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda shape, **kw: torch.from_numpy(
        replay.standard_normal(tuple(shape), dtype=np.float32)))
    ours = sd.generate(PROMPT, seed=seed)  # every setting from the manifest: lcm, 4 steps, guidance 1, 64 px
    assert ours.settings["scheduler"] == "lcm" and ours.settings["steps"] == steps and ours.timings["unet_steps"] == steps
    with torch.no_grad():
        ref = fused_pipe(PROMPT, num_inference_steps=steps, guidance_scale=1.0, width=64, height=64,
                         latents=torch.from_numpy(latents), output_type="np").images[0]
    assert np.abs(ours.pixels - ref).max() <= IMAGE_ATOL
    assert np.asarray(ours.image).std() > 1


def test_int8_fast_path_is_validated_against_fp32(lcm_int8):
    v = lcm_int8.manifest["validation"]
    assert v["passed"] and v["submodules"]["unet"]["mode"] == "dynamic"
    assert v["submodules"]["unet"]["cosine_mean"] > 0.999  # measured 0.999998
    assert v["submodules"]["unet"]["timesteps"][:4] == [999.0, 759.0, 499.0, 259.0]  # LCM's 4 steps, calibration set


# ---- bad input ------------------------------------------------------------------------------------


def _lora_recipe(lora_yaml: str, unet_channels="[32, 64]") -> str:
    text = (REPO / "recipes" / "sd-tiny-lcm.yaml").read_text()
    text = re.sub(r"  lora:\n    random: \{rank: 4, seed: 1\}\n", "  lora:\n" + lora_yaml, text)
    return text.replace("unet: {block_out_channels: [32, 64]", f"unet: {{block_out_channels: {unet_channels}")


def test_lora_that_does_not_fit_the_unet_is_one_line_naming_the_first_key(tmp_path, source_stage):
    lora = tmp_path / "other.safetensors"
    lora.write_bytes((source_stage / "lora" / "pytorch_lora_weights.safetensors").read_bytes())  # made for [32, 64]
    project = new_project(tmp_path / "p", {"bad-lora": _lora_recipe(f"    path: {lora}\n", "[32, 96]")})
    proc = project.doit("build", "recipes=bad-lora", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in text
    line = next(l for l in text.splitlines() if "LoRA shapes do not fit this UNet" in l)
    assert re.search(r"first mismatched key down_blocks\.1\.\S+\.lora_[AB]\.recipe_lora\.weight \(LoRA \[\d+(, \d+)*\], "
                     r"UNet \[\d+(, \d+)*\]\); use a LoRA trained for this architecture", line), line


def test_uncached_hub_lora_fails_fast_naming_the_fetch_command(tmp_path):
    hub = ("    hub: {repo: latent-consistency/lcm-lora-sdv1-5, revision: 0123456789abcdef0123456789abcdef01234567}\n")
    project = new_project(tmp_path / "p", {"hub-lora": _lora_recipe(hub)})
    proc = project.doit("build", "recipes=hub-lora", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in text
    assert ("latent-consistency/lcm-lora-sdv1-5@0123456789ab is not in the Hugging Face cache and HF_HUB_OFFLINE is "
            "set: fetch it on a connected machine with `huggingface-cli download latent-consistency/lcm-lora-sdv1-5 "
            "--revision 0123456789abcdef0123456789abcdef01234567`") in text


@pytest.mark.parametrize("body, match", [
    ("variants: {fp32: {vae: taesd}}\n", r"variants\.fp32\.vae: taesd needs a source\.taesd"),
    ("variants: {fp32: {vae: tiny}}\n", r"variants\.fp32\.vae: Input should be 'sd' or 'taesd'"),
    ("variants: {fp32: {}}\nruntime: {guidance_scale: 1.0}\ncalibration: {guidance_scale: 7.5}\n",
     r"calibration\.guidance_scale 7\.5 > 1, but runtime\.guidance_scale 1\.0 <= 1 exports the UNet for batch 1"),
    ("source:\n  random: {config: {}, seed: 0, tokenizer: {train_on: c.txt, vocab_size: 500}}\n"
     "  lora: {random: {rank: 4}, path: x.safetensors}\nvariants: {fp32: {}}\n",
     r"source\.lora: give exactly one of hub, path, random \(got \['path', 'random'\]\)"),
    ("source:\n  random: {config: {}, seed: 0, tokenizer: {train_on: c.txt, vocab_size: 500}}\n"
     "  lora: {random: {rank: 4}, scale: 0}\nvariants: {fp32: {}}\n", r"source\.lora\.scale: Input should be greater than 0"),
])
def test_bad_fast_path_recipe_is_one_line(tmp_path, body, match):
    from onnxforge.config import RecipeError, load_recipe

    head = ("family: sd\nsource:\n  random: {config: {}, seed: 0, tokenizer: {train_on: calibration/sd-prompts.txt, "
            "vocab_size: 500}}\n")
    path = tmp_path / "broken.yaml"
    path.write_text("family: sd\n" + body if body.startswith("source:") else head + body)
    with pytest.raises(RecipeError, match=match) as info:
        load_recipe(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


# ---- part 6: imagine and the demo take the fast path; steps and strength limits --------------------


def _fake_sd(root, recipe, created, runtime):
    vdir = root / recipe / "fp32" / "v1"
    vdir.mkdir(parents=True)
    manifest = {"schema_version": art.SCHEMA_VERSION, "runtime": {"kind": "sd", **runtime}, "validation": {"passed": True},
                "benchmark": None, "components": {},
                "artifact": {"recipe": recipe, "variant": "fp32", "version": "v1", "created": created}}
    (vdir / art.MANIFEST).write_text(json.dumps(manifest))
    (root / recipe / "fp32" / art.LATEST).write_text("v1")


def test_demo_chooses_the_fast_path_when_one_is_built(tmp_path):
    from onnxforge.runtime.demo import choose_artifact, fast_path_recipe

    _fake_sd(tmp_path, "sd-fast", "2026-01-01T00:00:00", {"scheduler": "lcm", "unet_batch": 1})
    _fake_sd(tmp_path, "sd-classic", "2026-02-01T00:00:00", {"scheduler": "pndm", "unet_batch": 2})
    c = choose_artifact("image", tmp_path)
    assert c.recipe == "sd-fast" and "newest built fast-path Stable Diffusion recipe (LCM, one-pass guidance)" in c.why
    assert fast_path_recipe(tmp_path) == "sd-fast"
    assert choose_artifact("image", tmp_path, "sd-classic").recipe == "sd-classic"  # an explicit choice still wins
    (tmp_path / "sd-fast" / "fp32" / art.LATEST).unlink()
    assert choose_artifact("image", tmp_path).recipe == "sd-classic" and fast_path_recipe(tmp_path) is None


def test_imagine_takes_the_fast_path_by_default_with_the_manifest_settings(sd_tiny_lcm, lcm, tmp_path):
    out = tmp_path / "fast.png"
    proc = run_cli("imagine", "a red fox in snow", "--artifacts", str(sd_tiny_lcm.artifacts), "--seed", "3",
                   "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["artifact"] == str(lcm.dir)
    assert (record["scheduler"], record["steps"], record["guidance_scale"]) == ("lcm", 4, 1.0)
    assert record["timings"]["unet_steps"] == 4
    again = StableDiffusion(lcm).generate("a red fox in snow", seed=3)
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(again.image))


@pytest.mark.parametrize("args, match", [
    (["--steps", "0"], r"steps must be a whole number from 1 to 8, got 0"),
    (["--steps", "9"], r"steps must be a whole number from 1 to 8, got 9"),
])
def test_lcm_steps_outside_one_to_eight_are_one_line(lcm, tmp_path, args, match):
    proc = run_cli("imagine", "a fox", "--artifact", str(lcm.dir), *args, "--out", str(tmp_path / "x.png"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and re.search(match, lines[0]), proc.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("steps", [1, 8])
def test_lcm_takes_one_to_eight_steps(lcm, steps):
    g = StableDiffusion(lcm).generate(PROMPT, seed=1, steps=steps)
    assert g.timings["unet_steps"] == steps and np.isfinite(g.pixels).all()


@pytest.fixture(scope="module")
def fast_sd(lcm):
    return StableDiffusion(lcm)


def test_generative_edit_on_the_fast_path(fast_sd):
    """img2img with a strength on the LCM + TAESD path (TAESD's encoder, one-pass UNet): as diffusers'
    LatentConsistencyModelImg2ImgPipeline, strength 0.5 runs all 4 LCM steps, picked from the less noisy half
    of the schedule (499, 379, 259, 139; see test_schedulers); outside the mask the picture comes back
    byte-identical."""
    base = fast_sd.generate(PROMPT, seed=4)
    rgb = np.asarray(base.image)
    mask = np.zeros(rgb.shape[:2], bool)
    mask[16:48, 16:48] = True
    edited = fast_sd.edit(rgb, mask, "a red boat", strength=0.5, seed=2)
    assert edited.settings["scheduler"] == "lcm" and edited.settings["denoising_steps"] == 4
    assert edited.timings["unet_steps"] == 4
    out = np.asarray(edited.image)
    assert np.array_equal(out[~mask], rgb[~mask])
    assert np.abs(out[mask].astype(int) - rgb[mask]).max() > 0


@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_edit_over_the_whole_picture_is_diffusers_lcm_img2img(fast_sd, fused_pipe, monkeypatch, strength):
    """A mask over the whole picture makes the edit plain img2img; diffusers' LCM img2img recipe on the fused
    UNet + AutoencoderTiny gives the same picture: the pipeline's own retrieve_timesteps (LCMScheduler's
    strength) and prepare_latents (the encoded picture noised to the first timestep), then the LCM steps,
    with the start noise and the step noise replayed from the run's numpy Generator."""
    from types import SimpleNamespace

    from diffusers.pipelines.latent_consistency_models import pipeline_latent_consistency_img2img as lcm_img2img
    from diffusers.schedulers import scheduling_lcm

    rgb = np.asarray(fast_sd.generate(PROMPT, seed=4).image)
    ours = fast_sd.edit(rgb, np.ones(rgb.shape[:2], bool), "a red boat", strength=strength, seed=2)
    replay = np.random.default_rng(2)
    draw = lambda shape, **kw: torch.from_numpy(replay.standard_normal(tuple(shape), dtype=np.float32))  # noqa: E731
    monkeypatch.setattr(lcm_img2img, "randn_tensor", draw)
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", draw)
    pipe, sched = fused_pipe, fused_pipe.scheduler
    with torch.no_grad():
        ids = pipe.tokenizer("a red boat", padding="max_length", max_length=77, return_tensors="pt").input_ids
        emb = pipe.text_encoder(ids)[0]
        pixels = torch.from_numpy(rgb.astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)[None]
        latents = pipe.vae.encode(pixels).latents * pipe.vae.config.scaling_factor
        ts, _ = lcm_img2img.retrieve_timesteps(sched, 4, "cpu", None, strength=strength)
        x = lcm_img2img.LatentConsistencyModelImg2ImgPipeline.prepare_latents(
            SimpleNamespace(scheduler=sched), latents, ts[:1], 1, 1, torch.float32, "cpu", None)
        for t in ts:
            x, denoised = sched.step(pipe.unet(x, t, encoder_hidden_states=emb)[0], t, x, return_dict=False)
        ref = pipe.vae.decode(denoised / pipe.vae.config.scaling_factor)[0]
    ref = (ref[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    assert ours.settings["denoising_steps"] == len(ts) == 4
    assert np.abs(ours.pixels - ref).max() <= IMAGE_ATOL
    assert np.abs(ours.pixels - rgb / 255).max() > 0.05  # it did redraw


@pytest.mark.parametrize("strength", [0, -0.1, 1.5, float("nan")])
def test_strength_outside_zero_one_is_refused(fast_sd, strength):
    rgb = np.zeros((64, 64, 3), np.uint8)
    mask = np.ones((64, 64), bool)
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]") as info:
        fast_sd.edit(rgb, mask, "a boat", strength=strength)
    assert "\n" not in str(info.value)


def test_strength_too_low_for_the_lcm_steps_is_one_line(fast_sd):
    rgb = np.zeros((64, 64, 3), np.uint8)
    mask = np.ones((64, 64), bool)
    with pytest.raises(ValueError, match=r"^strength 0\.05 keeps 2 of the 50 LCM distillation steps, fewer than the 4 "
                                         r"steps asked: raise the strength to at least 0\.08 or use fewer steps$"):
        fast_sd.edit(rgb, mask, "a boat", strength=0.05)
    assert fast_sd.edit(rgb, mask, "a boat", strength=0.05, steps=2).settings["denoising_steps"] == 2


def test_fast_path_runtime_imports_no_torch(lcm, tmp_path):
    import subprocess
    import sys

    code = ("import sys\nfrom onnxforge.runtime.sd import StableDiffusion\n"
            f"StableDiffusion({str(lcm.dir)!r}, low_memory=True).generate('a fox', seed=1).save({str(tmp_path / 'x.png')!r})\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers', 'peft') if m in sys.modules)\n"
            "sys.exit(f'imported {heavy}' if heavy else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shipped_fast_path_recipes_load():
    from onnxforge.config import load_recipes

    recipes = load_recipes(REPO / "recipes")
    tiny = recipes["sd-tiny-lcm"].body
    assert tiny.default is True and tiny.runtime.scheduler == "lcm" and tiny.runtime.max_steps == 8
    rand = recipes["sd-v1-4-lcm-random"].body
    assert rand.source.random.config == "sd-v1-4" and rand.source.lora.random.rank == 64
    assert rand.source.lora.random.alpha == 64 and len(rand.source.lora.random.target_modules) == 14
    assert rand.source.taesd.random.config == {} and rand.runtime.guidance_scale == 1.0
    assert {v.vae for v in rand.variants.values()} == {"sd", "taesd"}
    real = recipes["sd-v1-4-lcm"].body
    assert real.source.hub.revision == "133a221b8aa7292a167afc5127cb63fb5005638b"
    assert real.source.lora.hub.repo == "latent-consistency/lcm-lora-sdv1-5" and real.source.taesd.hub.repo == "madebyollin/taesd"


def test_demo_takes_the_fast_path_and_edits_on_it(sam_tiny, sd_tiny_lcm, lcm, tmp_path):
    """The demo with the fast path built: LCM picture (manifest defaults) and a generative edit with a strength,
    both on the one-pass UNet + TAESD; a strength outside (0, 1] is one line."""
    from PIL import Image

    root = tmp_path / "artifacts"
    root.mkdir()
    for project, recipe in ((sam_tiny, "sam-tiny"), (sd_tiny_lcm, "sd-tiny-lcm")):
        (root / recipe).symlink_to(project.artifacts / recipe, target_is_directory=True)
    args = ["demo", "--artifacts", str(root), "--no-progress", "--prompt", "a red boat on a lake", "--point", "20,20",
            "--edit", "replace it with a white cat", "--seed", "3"]
    proc = run_cli(*args, "--strength", "0.5", "--out", str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stderr
    run = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    record = json.loads((run / "run.json").read_text())
    image = record["artifacts"]["image"]
    assert image["recipe"] == "sd-tiny-lcm" and "fast-path" in image["why"]
    assert (record["steps"], record["scheduler"], record["guidance_scale"]) == (4, "lcm", 1.0)
    assert record["edit"]["kind"] == "generate" and record["edit"]["strength"] == 0.5
    assert record["edit"]["denoising_steps"] == 4  # LCM img2img runs every step (diffusers' LCM img2img pipeline)
    picture, edited = (np.asarray(Image.open(run / n)) for n in ("image.png", "edited.png"))
    mask = np.asarray(Image.open(run / "mask.png")) > 0
    np.testing.assert_array_equal(edited[~mask], picture[~mask])
    bad = run_cli(*args, "--strength", "1.5", "--out", str(tmp_path / "bad"))
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "--strength 1.5: must be in (0, 1]" in lines[0], bad.stderr
