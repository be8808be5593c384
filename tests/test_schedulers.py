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
    diffusers = pytest.importorskip("diffusers")
    if name == "pndm":
        return diffusers.PNDMScheduler.from_config(config)
    if name == "ddim":
        return diffusers.DDIMScheduler.from_config(config)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(config)
    if name == "dpm++2m":
        return diffusers.DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True
        )
    raise AssertionError(name)


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


def _run_ours(name, config, steps, latents, bias):
    sched = make_scheduler(name, config)
    sched.set_timesteps(steps)
    x = latents * np.float32(sched.init_noise_sigma)
    for t in sched.timesteps:
        out = _fake_model(sched.scale_model_input(x, t), t, bias)
        x = sched.step(out, t, x)
    return sched.timesteps, sched.init_noise_sigma, x


def _run_diffusers(name, config, steps, latents, bias):
    torch = pytest.importorskip("torch")
    sched = _diffusers_scheduler(name, config)
    sched.set_timesteps(steps)
    bias_t = torch.from_numpy(bias)
    x = torch.from_numpy(latents) * sched.init_noise_sigma
    for t in sched.timesteps:
        out = _fake_model(sched.scale_model_input(x, t), t, bias_t)
        x = sched.step(out, t, x).prev_sample
    return sched.timesteps.numpy(), float(sched.init_noise_sigma), x.numpy()


def _compare(name, config, steps):
    latents, bias = _inputs()
    ours_ts, ours_sigma, ours_x = _run_ours(name, config, steps, latents, bias)
    ref_ts, ref_sigma, ref_x = _run_diffusers(name, config, steps, latents, bias)

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
            for t in sched.timesteps:
                x = sched.step(_fake_model(sched.scale_model_input(x, t), t, bias), t, x)
            results.append(x)
        np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("name", ["PNDM", "lms", "dpm++", ""])
def test_unknown_name_raises(name):
    with pytest.raises(ValueError, match=r"unknown scheduler .*expected one of: pndm, ddim, euler, dpm\+\+2m"):
        make_scheduler(name, SD14_CONFIG)


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, True])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
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
    ],
)
def test_unsupported_config_raises(name, override, match):
    with pytest.raises(ValueError, match=match):
        make_scheduler(name, {**SD14_CONFIG, **override})


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
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
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
