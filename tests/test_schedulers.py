"""The numpy schedulers against diffusers, run through the same fake denoising loop.

The comparison tests need torch + diffusers (the build extra) and skip without
them; the import and bad-input tests need only numpy.
"""

import subprocess
import sys

import numpy as np
import pytest

from onnxforge.runtime.schedulers import SCHEDULER_NAMES, make_scheduler

# CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json (a PNDMScheduler config).
# No timestep_spacing key, so each scheduler falls back to its own default.
SD14_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
    "trained_betas": None,
}

# Final-sample tolerance (absolute; samples here are O(1), max |x| ~3). Both
# sides keep float32 samples, but diffusers does its per-step scalar maths in
# float32 torch and we do it in float64, and torch's float32 linspace rounds a
# few betas 1 ulp differently from numpy's. Measured differences are <= 4e-6
# for every case below. The subtlest deliberate slip tried (final alpha_bar = 1
# instead of alpha_bar[0] in DDIM) shows up at 2e-3, so 1e-4 still catches it.
SAMPLE_ATOL = 1e-4

# init_noise_sigma: Euler's is a float32 table value (max sigma ~14.6) and the
# 1-ulp beta difference above leaves it 1 float32 ulp (~1.3e-7 relative) off
# diffusers'; the others are exactly 1.0.
SIGMA_RTOL = 1e-6

LATENT_SHAPE = (1, 4, 8, 8)


def _diffusers_scheduler(name, config):
    """diffusers' scheduler for one of our names: the same mapping the build's calibration uses."""
    from onnxforge.families.sd.calibrate import diffusers_scheduler

    return diffusers_scheduler(name, config)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
    bias = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
    return latents, bias


# alpha_bar of the SD v1 training schedule in float64, computed here rather than
# taken from the module under test.
_SD14_ALPHA_BAR = np.cumprod(1.0 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)


def _fake_model(x, t, bias):
    # Deterministic stand-in for the UNet, the same arithmetic on numpy arrays and
    # torch tensors. sqrt(1 - alpha_bar_t) * x is the exact noise prediction when
    # the data is N(0, I), so samples stay O(1) as with a real model (a plain
    # 0.1 * x blows them up to ~50, where float32 rounding alone is ~1e-5). The
    # small t-dependent bias term makes the output differ at every step.
    c = float(np.sqrt(1.0 - np.interp(float(t), np.arange(1000), _SD14_ALPHA_BAR)))
    return c * x + (0.1 * float(t) / 1000.0) * bias


# LCM re-noises between steps. diffusers draws that noise with torch.randn from the
# generator passed to step(); we give diffusers a torch generator seeded with
# NOISE_SEED and our scheduler the same draws, made beforehand from a second torch
# generator with the same seed (same calls, same order, so the same numbers).
NOISE_SEED = 1234


def _lcm_noises(steps):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(NOISE_SEED)
    # One draw per step except the last, which returns the clean prediction.
    return [torch.randn(LATENT_SHAPE, generator=g, dtype=torch.float32).numpy() for _ in range(steps - 1)]


def _run_ours(name, config, steps, latents, bias, noises=None):
    sched = make_scheduler(name, config)
    sched.set_timesteps(steps)
    x = latents * np.float32(sched.init_noise_sigma)
    trace = []  # (prev_sample, denoised) per step, for LCM
    for i, t in enumerate(sched.timesteps):
        out = _fake_model(sched.scale_model_input(x, t), t, bias)
        if sched.stochastic:
            x = sched.step(out, t, x, noise=noises[i] if i < len(noises) else None)
            trace.append((x, sched.denoised))
        else:
            x = sched.step(out, t, x)
    return sched.timesteps, sched.init_noise_sigma, x, trace


def _run_diffusers(name, config, steps, latents, bias):
    torch = pytest.importorskip("torch")
    sched = _diffusers_scheduler(name, config)
    sched.set_timesteps(steps)
    bias_t = torch.from_numpy(bias)
    x = torch.from_numpy(latents) * sched.init_noise_sigma
    extra = {"generator": torch.Generator().manual_seed(NOISE_SEED)} if name == "lcm" else {}
    trace = []
    for t in sched.timesteps:
        out = _fake_model(sched.scale_model_input(x, t), t, bias_t)
        result = sched.step(out, t, x, **extra)
        x = result.prev_sample
        if name == "lcm":
            trace.append((x.numpy(), result.denoised.numpy()))
    return sched.timesteps.numpy(), float(sched.init_noise_sigma), x.numpy(), trace


def _compare(name, config, steps):
    latents, bias = _inputs()
    noises = _lcm_noises(steps) if name == "lcm" else None
    ours_ts, ours_sigma, ours_x, _ = _run_ours(name, config, steps, latents, bias, noises)
    ref_ts, ref_sigma, ref_x, _ = _run_diffusers(name, config, steps, latents, bias)

    np.testing.assert_array_equal(ours_ts, ref_ts)
    assert ours_ts.dtype == ref_ts.dtype
    assert ours_sigma == pytest.approx(ref_sigma, rel=SIGMA_RTOL)
    assert ours_x.dtype == np.float32 and ours_x.shape == LATENT_SHAPE
    assert np.isfinite(ours_x).all()
    diff = float(np.abs(ours_x - ref_x).max())
    assert diff < SAMPLE_ATOL, f"{name} {steps} steps: max abs diff {diff:.3g} (scale {np.abs(ref_x).max():.3g})"


@pytest.mark.parametrize("steps", [5, 25])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_matches_diffusers_sd14(name, steps):
    _compare(name, SD14_CONFIG, steps)


# An awkward step count (1000 % 7 != 0) under every spacing, including the ones
# that are not the scheduler's default.
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_matches_diffusers_timestep_spacing(name, spacing):
    _compare(name, {**SD14_CONFIG, "timestep_spacing": spacing}, 7)


# SD 2.x-style v-prediction with a plain linear beta schedule.
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_matches_diffusers_v_prediction(name):
    config = {**SD14_CONFIG, "prediction_type": "v_prediction", "beta_schedule": "linear"}
    _compare(name, config, 10)


def test_single_step_matches_diffusers():
    for name in SCHEDULER_NAMES:
        _compare(name, SD14_CONFIG, 1)


def test_import_does_not_pull_torch():
    code = (
        "import sys, onnxforge.runtime.schedulers\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "sys.exit(f'imported {heavy}' if heavy else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_state_resets_between_runs():
    # Reusing one instance for a second generation must give the same result.
    latents, bias = _inputs()
    for name in SCHEDULER_NAMES:
        sched = make_scheduler(name, SD14_CONFIG)
        results = []
        for _ in range(2):
            sched.set_timesteps(6)
            x = latents * np.float32(sched.init_noise_sigma)
            extra = {"generator": np.random.default_rng(3)} if sched.stochastic else {}
            for t in sched.timesteps:
                x = sched.step(_fake_model(sched.scale_model_input(x, t), t, bias), t, x, **extra)
            results.append(x)
        np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("name", ["PNDM", "lms", "dpm++", "LCM", ""])
def test_unknown_name_raises(name):
    with pytest.raises(ValueError, match=r"unknown scheduler .*expected one of: pndm, ddim, euler, dpm\+\+2m, lcm$"):
        make_scheduler(name, SD14_CONFIG)


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, True])
@pytest.mark.parametrize("name", [n for n in SCHEDULER_NAMES if n != "lcm"])  # LCM's own range: see below
def test_bad_step_count_raises(name, steps):
    sched = make_scheduler(name, SD14_CONFIG)
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in \[1, 1000\], got"):
        sched.set_timesteps(steps)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_step_before_set_timesteps_raises(name):
    sched = make_scheduler(name, SD14_CONFIG)
    x = np.zeros(LATENT_SHAPE, np.float32)
    with pytest.raises(ValueError, match=r"call set_timesteps"):
        sched.step(x, 1, x)


@pytest.mark.parametrize(
    "name, override, match",
    [
        ("pndm", {"skip_prk_steps": False}, r"skip_prk_steps=False"),
        ("euler", {"use_karras_sigmas": True}, r"use_karras_sigmas=True"),
        ("dpm++2m", {"algorithm_type": "sde-dpmsolver++"}, r"algorithm_type='sde-dpmsolver\+\+'"),
        ("dpm++2m", {"solver_order": 3}, r"solver_order=3"),
        ("ddim", {"prediction_type": "sample"}, r"prediction_type 'sample'"),
        ("ddim", {"timestep_spacing": "uniform"}, r"timestep_spacing 'uniform'"),
        ("euler", {"beta_schedule": "squaredcos_cap_v2"}, r"beta_schedule 'squaredcos_cap_v2'"),
        ("lcm", {"thresholding": True}, r"thresholding=True; only thresholding=False"),
        ("lcm", {"prediction_type": "sample"}, r"prediction_type 'sample'"),
        ("lcm", {"rescale_betas_zero_snr": True}, r"rescale_betas_zero_snr=True"),
        ("lcm", {"beta_schedule": "squaredcos_cap_v2"}, r"beta_schedule 'squaredcos_cap_v2'"),
    ],
)
def test_unsupported_config_raises(name, override, match):
    with pytest.raises(ValueError, match=match):
        make_scheduler(name, {**SD14_CONFIG, **override})


# ---- LCM (issue 12, part 2) ---------------------------------------------------------------
# LCM-LoRA runs on SD's own scheduler config turned into an LCMScheduler
# (LCMScheduler.from_config(pipe.scheduler.config)), i.e. SD14_CONFIG here; both
# sides ignore the PNDM-only keys and, for LCM, steps_offset and timestep_spacing.

# Per-step tolerance (absolute; samples are O(1)). As above, diffusers does its
# scalar maths in float32 torch (c_skip, c_out, sqrt(alpha_bar)) and we in float64.
# Measured: <= 3.5e-6 for every case below (1e-6 up to 4 steps). Note what the
# tolerance can see: with the default timestep_scaling=10 the boundary-condition
# scalings are within ~1e-5 of (c_skip, c_out) = (0, 1) at every LCM timestep >= 19
# (their purpose: the identity only near t = 0), so dropping them is invisible at
# 1-8 steps. The timestep_scaling=0.1 cases make them matter: dropping them there
# is off by 2e-3 (8 steps) and 0.1 (50 steps).
LCM_ATOL = 1e-5


def _assert_close(ours, ref, what):
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    diff = float(np.abs(ours - ref).max())
    assert diff < LCM_ATOL, f"{what}: max abs diff {diff:.3g} (scale {np.abs(ref).max():.3g})"


def _compare_lcm(config, steps):
    latents, bias = _inputs()
    noises = _lcm_noises(steps)
    ours_ts, ours_sigma, _, ours_trace = _run_ours("lcm", config, steps, latents, bias, noises)
    ref_ts, ref_sigma, _, ref_trace = _run_diffusers("lcm", config, steps, latents, bias)
    np.testing.assert_array_equal(ours_ts, ref_ts)
    assert ours_ts.dtype == ref_ts.dtype == np.int64
    assert ours_sigma == ref_sigma == 1.0
    assert len(ours_trace) == len(ref_trace) == steps
    for i, ((x, d), (rx, rd)) in enumerate(zip(ours_trace, ref_trace)):
        _assert_close(x, rx, f"step {i} prev_sample")
        _assert_close(d, rd, f"step {i} denoised")
    # The last step returns the clean prediction itself (no noise added).
    np.testing.assert_array_equal(ours_trace[-1][0], ours_trace[-1][1])
    return ours_ts


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_matches_diffusers_step_by_step(steps):
    ts = _compare_lcm(SD14_CONFIG, steps)
    if steps == 4:
        # What issue 12 quotes from diffusers for 4 of the 50 distillation steps.
        assert ts.tolist() == [999, 759, 499, 259]


@pytest.mark.parametrize(
    "override, steps",
    [
        ({}, 4),  # nothing but SD14_CONFIG's keys
        ({"prediction_type": "v_prediction", "beta_schedule": "linear"}, 4),
        ({"clip_sample": True, "clip_sample_range": 0.5}, 4),
        ({"original_inference_steps": 100}, 8),
        ({"original_inference_steps": 7}, 7),  # 1000 % 7 != 0, and as many steps as allowed
        ({"original_inference_steps": 7}, 3),
        ({"timestep_scaling": 2.5}, 4),
        ({"timestep_scaling": 0.1}, 8),  # boundary scalings far from (0, 1): see LCM_ATOL
        ({"timestep_scaling": 0.1}, 50),
        ({}, 50),  # the most steps the default schedule allows
        ({"timestep_spacing": "trailing"}, 4),  # accepted, and ignored by both
        ({"timestep_spacing": "linspace", "steps_offset": 0}, 2),
    ],
)
def test_lcm_matches_diffusers_config(override, steps):
    _compare_lcm({**SD14_CONFIG, **override}, steps)


def test_lcm_defaults_match_diffusers():
    # An empty config means LCMScheduler's own defaults (SD's scaled_linear table), not the DDPM one.
    _compare_lcm({}, 4)


def _lcm_run(steps, **step_kwargs):
    latents, bias = _inputs()
    sched = make_scheduler("lcm", SD14_CONFIG)
    sched.set_timesteps(steps)
    x = latents
    for t in sched.timesteps:
        x = sched.step(_fake_model(x, t, bias), t, x, **step_kwargs)
    return x


def test_lcm_noise_comes_from_the_runs_generator():
    # generator= draws standard normals, one array per step but the last, from the run's Generator.
    rng = np.random.default_rng(5)
    from_generator = _lcm_run(4, generator=rng)
    replay = np.random.default_rng(5)
    latents, bias = _inputs()
    sched = make_scheduler("lcm", SD14_CONFIG)
    sched.set_timesteps(4)
    x = latents
    for i, t in enumerate(sched.timesteps):
        noise = replay.standard_normal(LATENT_SHAPE, dtype=np.float32) if i < 3 else None
        x = sched.step(_fake_model(x, t, bias), t, x, noise=noise)
    np.testing.assert_array_equal(from_generator, x)
    # Both generators are now in the same state: the last step drew nothing.
    assert rng.bit_generator.state == replay.bit_generator.state
    np.testing.assert_array_equal(from_generator, _lcm_run(4, generator=np.random.default_rng(5)))
    assert np.abs(from_generator - _lcm_run(4, generator=np.random.default_rng(6))).max() > 1e-2


def test_lcm_single_step_draws_no_noise():
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    one = _lcm_run(1, generator=rng)
    assert rng.bit_generator.state == before
    np.testing.assert_array_equal(one, _lcm_run(1))  # and needs no generator at all


@pytest.mark.parametrize("steps", [0, -1, 51, 1000, 2.5, True])
def test_lcm_bad_step_count_raises(steps):
    sched = make_scheduler("lcm", SD14_CONFIG)
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in \[1, 50\] for LCM "
                                         r"\(.*original_inference_steps=50 .*\), got"):
        sched.set_timesteps(steps)


def test_lcm_steps_above_original_inference_steps_raise():
    config = {**SD14_CONFIG, "original_inference_steps": 8}
    sched = make_scheduler("lcm", config)
    sched.set_timesteps(8)
    with pytest.raises(ValueError, match=r"integer in \[1, 8\] for LCM .*original_inference_steps=8 .*got 9$"):
        sched.set_timesteps(9)
    # diffusers refuses it too (with its own wording).
    ref = _diffusers_scheduler("lcm", config)
    with pytest.raises(ValueError, match="original"):
        ref.set_timesteps(9)


@pytest.mark.parametrize("value", [0, -5, 1001, 2.0, "50", None])
def test_lcm_bad_original_inference_steps_raises(value):
    with pytest.raises(ValueError, match=r"original_inference_steps must be an integer in \[1, 1000\] "
                                         r"\(num_train_timesteps\), got"):
        make_scheduler("lcm", {**SD14_CONFIG, "original_inference_steps": value})


def test_lcm_step_needs_noise_between_steps():
    sched = make_scheduler("lcm", SD14_CONFIG)
    sched.set_timesteps(2)
    x = np.zeros(LATENT_SHAPE, np.float32)
    with pytest.raises(ValueError, match=r"LCM re-noises between steps: pass step\(\.\.\., generator="):
        sched.step(x, sched.timesteps[0], x)
    sched.set_timesteps(2)
    with pytest.raises(ValueError, match=r"noise of shape \(1, 4, 4, 4\) does not match the sample's \(1, 4, 8, 8\)"):
        sched.step(x, sched.timesteps[0], x, noise=np.zeros((1, 4, 4, 4), np.float32))
# ---- img2img entry and masked blending (the demo's generative edits) -------------------------------


def _blend_ours(name, config, steps, strength, x0, noise, mask, bias):
    sched = make_scheduler(name, config)
    sched.set_timesteps(steps)
    ts = sched.timesteps[sched.strength_start(strength):]
    x = sched.add_noise(x0, noise, ts[0])
    for i, t in enumerate(ts):
        x = sched.step(_fake_model(sched.scale_model_input(x, t), t, bias), t, x)
        known = sched.add_noise(x0, noise, ts[i + 1]) if i < len(ts) - 1 else x0
        x = mask * x + (1 - mask) * known
    return ts, x


def _blend_diffusers(name, config, steps, strength, x0, noise, mask, bias):
    # diffusers' StableDiffusionInpaintPipeline for a 4-channel UNet: get_timesteps, set_begin_index,
    # add_noise at the first timestep, re-noised originals at the next timestep after every step.
    torch = pytest.importorskip("torch")
    sched = _diffusers_scheduler(name, config)
    sched.set_timesteps(steps)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    ts = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    x0_t, noise_t, m = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(mask)
    x = sched.add_noise(x0_t, noise_t, ts[:1])
    for i, t in enumerate(ts):
        x = sched.step(_fake_model(sched.scale_model_input(x, t), t, torch.from_numpy(bias)), t, x).prev_sample
        known = sched.add_noise(x0_t, noise_t, ts[i + 1:i + 2]) if i < len(ts) - 1 else x0_t
        x = m * x + (1 - m) * known
    return ts.numpy(), x.numpy()


@pytest.mark.parametrize("strength", [0.5, 0.8, 1.0])
# LCM rebuilds its schedule for img2img (test_lcm_img2img_matches_diffusers_pipeline below); the masked blend on
# it is checked end to end in test_sd_lcm and test_demo.
@pytest.mark.parametrize("name", [n for n in SCHEDULER_NAMES if n != "lcm"])
def test_masked_img2img_blend_matches_diffusers(name, strength):
    x0, bias = _inputs(1)
    noise = np.random.default_rng(2).standard_normal(LATENT_SHAPE).astype(np.float32)
    mask = np.zeros(LATENT_SHAPE, np.float32)
    mask[..., 2:6, 3:7] = 1
    ours_ts, ours = _blend_ours(name, SD14_CONFIG, 10, strength, x0, noise, mask, bias)
    ref_ts, ref = _blend_diffusers(name, SD14_CONFIG, 10, strength, x0, noise, mask, bias)
    np.testing.assert_array_equal(ours_ts, ref_ts)
    assert np.abs(ours - ref).max() < SAMPLE_ATOL
    # outside the mask the loop ends on the original latents exactly
    np.testing.assert_array_equal(ours[mask == 0], x0[mask == 0])


def test_strength_start_counts_and_bad_strength():
    sched = make_scheduler("ddim", SD14_CONFIG)
    sched.set_timesteps(10)
    assert [sched.strength_start(s) for s in (1.0, 0.75, 0.5, 0.1)] == [0, 3, 5, 9]
    for bad in (0, -0.5, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
            sched.strength_start(bad)
    with pytest.raises(ValueError, match="leaves no denoising step"):
        sched.strength_start(0.05)


# ---- LCM img2img (the demo's generative edits on the fast path) ------------------------------------
# diffusers' LatentConsistencyModelImg2ImgPipeline does not enter the 4-step schedule part-way: it
# rebuilds it with LCMScheduler.set_timesteps(steps, strength=) (the distillation schedule cut to its
# int(50 x strength) least noisy steps, all `steps` picked from that), noises the picture's latents to
# the first of them with the run's generator (prepare_latents), then runs every step with the same
# generator. The reference below calls the pipeline's own retrieve_timesteps and prepare_latents.


def _lcm_img2img_ours(config, steps, strength, x0, bias, noises):
    sched = make_scheduler("lcm", config)
    ts = sched.img2img_timesteps(steps, strength)
    x = sched.add_noise(x0, noises[0], ts[0])
    trace = [x]
    for i, t in enumerate(ts):
        x = sched.step(_fake_model(sched.scale_model_input(x, t), t, bias), t, x,
                       noise=noises[i + 1] if i + 1 < len(noises) else None)
        trace += [x, sched.denoised]
    return ts, trace


def _lcm_img2img_diffusers(config, steps, strength, x0, bias):
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from diffusers.pipelines.latent_consistency_models import pipeline_latent_consistency_img2img as p

    sched = _diffusers_scheduler("lcm", config)
    g = torch.Generator().manual_seed(NOISE_SEED)
    ts, _ = p.retrieve_timesteps(sched, steps, "cpu", None, strength=strength)
    # image.shape[1] == 4: the latents are taken as encoded (our TAESD encoder gives them deterministically).
    x = p.LatentConsistencyModelImg2ImgPipeline.prepare_latents(
        SimpleNamespace(scheduler=sched), torch.from_numpy(x0), ts[:1], 1, 1, torch.float32, "cpu", g)
    trace = [x.numpy()]
    for t in ts:
        x, denoised = sched.step(_fake_model(x, t, torch.from_numpy(bias)), t, x, generator=g, return_dict=False)
        trace += [x.numpy(), denoised.numpy()]
    return ts.numpy(), trace


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("strength", [1.0, 0.8, 0.5, 0.3, 0.58])  # 50 x 0.58 = 28.999..., cut to 28 by both
def test_lcm_img2img_matches_diffusers_pipeline(strength, steps):
    x0, bias = _inputs(1)
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(NOISE_SEED)
    # the pipeline's draws in order: the starting noise, then one per step but the last
    noises = [torch.randn(LATENT_SHAPE, generator=g, dtype=torch.float32).numpy() for _ in range(steps)]
    ours_ts, ours = _lcm_img2img_ours(SD14_CONFIG, steps, strength, x0, bias, noises)
    ref_ts, ref = _lcm_img2img_diffusers(SD14_CONFIG, steps, strength, x0, bias)
    np.testing.assert_array_equal(ours_ts, ref_ts)
    assert len(ours_ts) == steps  # every step runs, from lower noise
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        _assert_close(a, b, f"img2img trace entry {i}")


def test_lcm_img2img_timesteps():
    sched = make_scheduler("lcm", SD14_CONFIG)
    assert sched.img2img_timesteps(4, 1.0).tolist() == [999, 759, 499, 259]  # = text-to-image
    assert sched.img2img_timesteps(4, 0.5).tolist() == [499, 379, 259, 139]
    assert sched.img2img_timesteps(4, 0.8).tolist() == [799, 599, 399, 199]
    # a later text-to-image schedule is the full one again
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 759, 499, 259]
    with pytest.raises(TypeError, match="img2img_timesteps"):
        sched.strength_start(0.5)


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), "0.5", True, None])
def test_lcm_img2img_bad_strength(bad):
    sched = make_scheduler("lcm", SD14_CONFIG)
    with pytest.raises(ValueError, match=r"^strength must be a number in \(0, 1\], got"):
        sched.img2img_timesteps(4, bad)


def test_lcm_img2img_strength_too_low_for_the_steps():
    sched = make_scheduler("lcm", SD14_CONFIG)
    with pytest.raises(ValueError, match=r"^strength 0\.1 keeps 5 of the 50 LCM distillation steps, fewer than the "
                                         r"8 steps asked: raise the strength to at least 0\.16 or use fewer steps$"):
        sched.img2img_timesteps(8, 0.1)
    assert len(sched.img2img_timesteps(5, 0.1)) == 5  # the most it allows
    # diffusers refuses the same combination
    ref = _diffusers_scheduler("lcm", SD14_CONFIG)
    with pytest.raises(ValueError, match="original_steps x strength"):
        ref.set_timesteps(8, strength=0.1)


def test_img2img_timesteps_of_the_classic_samplers_enter_part_way():
    sched = make_scheduler("ddim", SD14_CONFIG)
    ts = sched.img2img_timesteps(10, 0.5)
    np.testing.assert_array_equal(ts, sched.timesteps[5:])
