"""Torch-free numpy ports of the Stable Diffusion noise schedulers.

Five samplers, each matching its diffusers counterpart (diffusers 0.39) for the
options Stable Diffusion checkpoints actually use:

    "pndm"     PNDMScheduler with skip_prk_steps=True (PLMS steps; SD v1.x's own)
    "ddim"     DDIMScheduler with eta=0
    "euler"    EulerDiscreteScheduler
    "dpm++2m"  DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2
    "lcm"      LCMScheduler (for LCM / LCM-LoRA UNets: 1-8 steps, guidance ~1)

Each is built from a plain dict shaped like diffusers' scheduler_config.json.
Keys a scheduler does not use are ignored (as diffusers' from_config does); keys
that would change the maths in a way not implemented here raise ValueError
rather than being silently ignored.

Usage, the same loop for all five:

    sched = make_scheduler("euler", config)
    sched.set_timesteps(25)
    latents = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(latents, t), t)
        latents = sched.step(eps, t, latents)

LCM is stochastic (it re-noises its prediction between steps), so its step also
takes the run's numpy Generator: `sched.step(eps, t, latents, generator=rng)`;
`sched.stochastic` says which schedulers need one.

img2img (the demo's generative edits), also the same for all five:

    timesteps = sched.img2img_timesteps(steps, strength)   # strength in (0, 1]
    latents = sched.add_noise(picture_latents, noise, timesteps[0])
    for t in timesteps: ...                                  # as above

The classic samplers enter their full schedule part-way (about strength x steps
run); LCM rebuilds its schedule from the strength and runs every step.

Arrays in and out are float32. The noise tables are float32 like diffusers';
per-step scalar coefficients are computed in float64.
"""

import math

import numpy as np

__all__ = [
    "SCHEDULER_NAMES",
    "Scheduler",
    "PNDMScheduler",
    "DDIMScheduler",
    "EulerScheduler",
    "DPMSolverPP2MScheduler",
    "LCMScheduler",
    "make_scheduler",
]

SCHEDULER_NAMES = ("pndm", "ddim", "euler", "dpm++2m", "lcm")

_SPACINGS = ("leading", "linspace", "trailing")
_PREDICTION_TYPES = ("epsilon", "v_prediction")


def _f32(x):
    return np.asarray(x, dtype=np.float32)


def _require(config, key, diffusers_default, supported):
    # Options that change the maths are refused, not ignored: a silently
    # different sampler is worse than an error.
    value = config.get(key, diffusers_default)
    if value != supported:
        raise ValueError(f"unsupported scheduler option {key}={value!r}; only {key}={supported!r} is implemented")


def _check_strength(strength):
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) \
            or not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")


def _alphas_cumprod(config):
    """The training noise table alpha_bar[t], float32 as in diffusers."""
    n = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        betas = _f32(config["trained_betas"])
    else:
        schedule = config.get("beta_schedule", "linear")
        start = config.get("beta_start", 0.0001)
        end = config.get("beta_end", 0.02)
        if schedule == "linear":
            betas = _f32(np.linspace(start, end, n))
        elif schedule == "scaled_linear":
            # Linear in sqrt(beta): what SD was trained with.
            betas = _f32(np.linspace(start**0.5, end**0.5, n)) ** 2
        else:
            raise ValueError(f"unsupported beta_schedule {schedule!r}; expected 'scaled_linear' or 'linear'")
    alphas = np.float32(1.0) - betas
    # torch's CPU cumprod accumulates in float64 and rounds each entry, so do the same.
    return _f32(np.cumprod(alphas.astype(np.float64)))


def _descending_timesteps(spacing, num_train, n, steps_offset):
    """n timesteps, noisiest first, as float64 (linspace values not yet rounded).

    This is the DDIM/PNDM/Euler recipe; DPM-Solver has its own (see there).
    """
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(n) * (num_train // n))[::-1].astype(np.float64) + steps_offset
    # trailing: evenly spaced ending at the last training step.
    return np.round(np.arange(num_train, 0, -num_train / n)) - 1


def _index_of(timesteps, t):
    """Position of timestep t in the schedule.

    Like diffusers, a repeated timestep resolves to its second occurrence, so a
    schedule entered part-way (img2img) does not skip a step.
    """
    hits = np.flatnonzero(timesteps == t)
    if len(hits) == 0:
        raise ValueError(f"timestep {t!r} is not in this scheduler's timesteps")
    return int(hits[1] if len(hits) > 1 else hits[0])


def _vp(sigma):
    """Variance-preserving (alpha, sigma) for a k-diffusion sigma: x_vp = x / sqrt(sigma^2 + 1)."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


class Scheduler:
    """Shared config handling; subclasses implement set_timesteps and step."""

    default_spacing = "leading"
    stochastic = False  # True: step() draws noise and needs generator= (or noise=)

    def __init__(self, config):
        self.config = dict(config)
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        self.steps_offset = int(config.get("steps_offset", 0))
        self.timestep_spacing = config.get("timestep_spacing", self.default_spacing)
        self.prediction_type = config.get("prediction_type", "epsilon")
        if self.timestep_spacing not in _SPACINGS:
            raise ValueError(f"unsupported timestep_spacing {self.timestep_spacing!r}; expected one of {_SPACINGS}")
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}; expected one of {_PREDICTION_TYPES}")
        _require(config, "thresholding", False, False)
        _require(config, "rescale_betas_zero_snr", False, False)
        self.alphas_cumprod = _alphas_cumprod(config)
        self.num_inference_steps = None
        self.timesteps = None
        self.init_noise_sigma = 1.0

    def _check_steps(self, num_inference_steps):
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be an integer in [1, {self.num_train_timesteps}], got {n!r}"
            )
        self.num_inference_steps = int(n)
        return int(n)

    def _check_ready(self):
        if self.timesteps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")

    def scale_model_input(self, sample, t):
        return _f32(sample)

    def add_noise(self, original, noise, t):
        """Clean latents noised to the level of timestep t, in this sampler's own scale (diffusers' add_noise).

        DDPM form sqrt(a_bar) * x0 + sqrt(1 - a_bar) * eps; Euler overrides it (its latents are x0 + sigma * eps).
        """
        a = float(self.alphas_cumprod[int(t)])
        return _f32(math.sqrt(a) * _f32(original) + math.sqrt(1.0 - a) * _f32(noise))

    def img2img_timesteps(self, num_inference_steps, strength):
        """img2img: set the schedule for `num_inference_steps` and return the timesteps a picture noised
        to `strength` runs, the first being the level it is noised to (add_noise at timesteps[0]).

        diffusers' StableDiffusionImg2ImgPipeline: the full schedule, entered part-way (strength_start).
        LCM overrides this (its pipeline rebuilds the schedule from the strength instead).
        """
        self.set_timesteps(num_inference_steps)
        return self.timesteps[self.strength_start(strength):]

    def strength_start(self, strength):
        """img2img: where in `timesteps` a picture noised to `strength` enters (diffusers' get_timesteps).

        strength 1 starts at the first (noisiest) timestep, 0.5 halfway down the schedule. Every
        scheduler here has diffusers' order 1, so the index is also the step count skipped.
        Raises if strength x steps leaves no step to run.
        """
        self._check_ready()
        _check_strength(strength)
        n = self.num_inference_steps
        run = min(int(n * float(strength)), n)
        if run < 1:
            raise ValueError(f"strength {strength} x {n} steps leaves no denoising step: raise the strength "
                             f"to at least {1 / n:.3g} or use more steps")
        return n - run

    def __repr__(self):
        return f"{type(self).__name__}(num_inference_steps={self.num_inference_steps})"


class PNDMScheduler(Scheduler):
    """PLMS: 4th-order linear multistep on the PNDM transfer (paper eq. 9).

    Needs skip_prk_steps=True (SD's config); the Runge-Kutta warm-up is not ported.
    The second timestep is evaluated twice (a Heun-like warm-up step), so
    len(timesteps) == num_inference_steps + 1 (for more than one step), exactly
    as in diffusers.
    """

    def __init__(self, config):
        super().__init__(config)
        _require(config, "skip_prk_steps", False, True)
        self.final_alpha_cumprod = 1.0 if config.get("set_alpha_to_one", False) else float(self.alphas_cumprod[0])
        self._reset()

    def _reset(self):
        self.ets = []  # past model outputs, newest last (at most 4 kept)
        self.cur_sample = None
        self.counter = 0

    def set_timesteps(self, num_inference_steps):
        n = self._check_steps(num_inference_steps)
        ts = np.round(_descending_timesteps(self.timestep_spacing, self.num_train_timesteps, n, self.steps_offset))
        ts = ts.astype(np.int64)
        # Repeat the second timestep: [t0, t1, t1, t2, ...]. The repeat is where
        # the warm-up step re-evaluates the model (see step()). One step: just [t0].
        self.timesteps = np.concatenate([ts[:1], ts[1:2], ts[1:]])
        self._reset()

    def _alpha_bar(self, t):
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def _prev_sample(self, x, t, prev_t, eps):
        a_t, a_prev = self._alpha_bar(t), self._alpha_bar(prev_t)
        if self.prediction_type == "v_prediction":
            eps = math.sqrt(a_t) * eps + math.sqrt(1 - a_t) * x
        # PNDM paper eq. (9): the DDIM transfer written with a single denominator.
        x_coeff = math.sqrt(a_prev / a_t)
        denom = a_t * math.sqrt(1 - a_prev) + math.sqrt(a_t * (1 - a_t) * a_prev)
        return _f32(x_coeff * x - ((a_prev - a_t) / denom) * eps)

    def step(self, model_output, t, sample):
        self._check_ready()
        eps, x, t = _f32(model_output), _f32(sample), int(t)
        # diffusers uses this stride for every timestep_spacing, so we do too.
        stride = self.num_train_timesteps // self.num_inference_steps
        prev_t = t - stride
        if self.counter == 1:
            # Warm-up correction: redo the first step from the saved sample with the
            # average of the outputs at both ends (t is the repeated timestep here).
            # This output is not kept in the history.
            t, prev_t = t + stride, t
            eps = (eps + self.ets[-1]) / 2
            x, self.cur_sample = self.cur_sample, None
        else:
            self.ets = self.ets[-3:] + [eps]
            e = self.ets
            if len(e) == 1:
                self.cur_sample = x  # kept for the warm-up correction
            elif len(e) == 2:
                eps = (3 * e[-1] - e[-2]) / 2
            elif len(e) == 3:
                eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
            else:
                eps = (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24
        self.counter += 1
        return self._prev_sample(x, t, prev_t, eps)


class DDIMScheduler(Scheduler):
    """Deterministic DDIM (eta=0): predict x0, then re-noise it to the previous level."""

    def __init__(self, config):
        super().__init__(config)
        # diffusers' DDIM defaults differ from PNDM's: set_alpha_to_one and clip_sample default True.
        self.final_alpha_cumprod = 1.0 if config.get("set_alpha_to_one", True) else float(self.alphas_cumprod[0])
        self.clip_sample = bool(config.get("clip_sample", True))
        self.clip_sample_range = float(config.get("clip_sample_range", 1.0))

    def set_timesteps(self, num_inference_steps):
        n = self._check_steps(num_inference_steps)
        ts = _descending_timesteps(self.timestep_spacing, self.num_train_timesteps, n, self.steps_offset)
        self.timesteps = np.round(ts).astype(np.int64)

    def step(self, model_output, t, sample):
        self._check_ready()
        out, x, t = _f32(model_output), _f32(sample), int(t)
        # diffusers steps back by this stride whatever the spacing.
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        s_t = math.sqrt(1 - a_t)
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x - s_t * eps) / math.sqrt(a_t)
        else:  # v_prediction
            x0 = math.sqrt(a_t) * x - s_t * out
            eps = math.sqrt(a_t) * out + s_t * x
        if self.clip_sample:
            # Only x0 is clipped; eps stays the model's (diffusers' use_clipped_model_output=False).
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        return _f32(math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps)


class EulerScheduler(Scheduler):
    """Euler's method on the probability-flow ODE in k-diffusion sigma space.

    Here latents live at scale x = x0 + sigma * eps, hence init_noise_sigma > 1 and
    the model input is rescaled by 1 / sqrt(sigma^2 + 1).
    """

    default_spacing = "linspace"

    def __init__(self, config):
        super().__init__(config)
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            _require(config, key, False, False)
        _require(config, "interpolation_type", "linear", "linear")
        _require(config, "timestep_type", "discrete", "discrete")
        _require(config, "final_sigmas_type", "zero", "zero")
        ac = self.alphas_cumprod
        self.train_sigmas = np.sqrt((np.float32(1.0) - ac) / ac)
        self.sigmas = np.append(self.train_sigmas[::-1], np.float32(0.0))
        self.init_noise_sigma = self._init_noise_sigma()
        self._step_index = None

    def _init_noise_sigma(self):
        top = self.sigmas.max()
        if self.timestep_spacing in ("linspace", "trailing"):
            return float(top)
        # "leading" never reaches the noisiest training step; diffusers pads the start noise.
        return float(np.sqrt(top * top + np.float32(1.0)))

    def set_timesteps(self, num_inference_steps):
        n = self._check_steps(num_inference_steps)
        ts = _descending_timesteps(self.timestep_spacing, self.num_train_timesteps, n, self.steps_offset)
        # Timesteps stay fractional for linspace: the sigma is interpolated between training steps.
        self.timesteps = _f32(ts)
        sigmas = np.interp(self.timesteps, np.arange(self.num_train_timesteps), self.train_sigmas)
        self.sigmas = _f32(np.append(sigmas, 0.0))
        self.init_noise_sigma = self._init_noise_sigma()
        self._step_index = None

    def _index(self, t):
        if self._step_index is None:
            self._step_index = _index_of(self.timesteps, t)
        return self._step_index

    def scale_model_input(self, sample, t):
        self._check_ready()
        sigma = float(self.sigmas[self._index(t)])
        return _f32(_f32(sample) / math.sqrt(sigma * sigma + 1.0))

    def add_noise(self, original, noise, t):
        # diffusers finds sigma from the timestep's position in the schedule, so the timestep must be in it.
        self._check_ready()
        sigma = float(self.sigmas[_index_of(self.timesteps, t)])
        return _f32(_f32(original) + sigma * _f32(noise))

    def step(self, model_output, t, sample):
        self._check_ready()
        out, x = _f32(model_output), _f32(sample)
        i = self._index(t)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if self.prediction_type == "epsilon":
            eps = out
        else:  # v_prediction, defined on the unit-variance input x / sqrt(sigma^2 + 1)
            alpha, s = _vp(sigma)
            eps = alpha * out + (s * alpha) * x
        # dx/dsigma = eps; one Euler step down to the next sigma.
        self._step_index = i + 1
        return _f32(x + (sigma_next - sigma) * eps)


class DPMSolverPP2MScheduler(Scheduler):
    """DPM-Solver++(2M): second-order multistep solver on the data (x0) prediction.

    Works in log-SNR time lambda = -log(sigma). The first step has no history and the
    last step lands on sigma=0, so both are first order (the last returns x0), as
    diffusers does with its default final_sigmas_type="zero".
    """

    default_spacing = "linspace"

    def __init__(self, config):
        super().__init__(config)
        _require(config, "algorithm_type", "dpmsolver++", "dpmsolver++")
        _require(config, "solver_order", 2, 2)
        _require(config, "solver_type", "midpoint", "midpoint")
        _require(config, "final_sigmas_type", "zero", "zero")
        _require(config, "lambda_min_clipped", -float("inf"), -float("inf"))
        _require(config, "variance_type", None, None)
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                    "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting"):
            _require(config, key, False, False)
        # lower_order_final / euler_at_final only matter for solver_order 3 or a
        # nonzero final sigma, neither of which is supported: accepted, no effect.
        ac = self.alphas_cumprod
        self.train_sigmas = np.sqrt((np.float32(1.0) - ac) / ac)
        self.sigmas = None
        self._reset()

    def _reset(self):
        self._step_index = None
        self._prev_x0 = None  # data prediction from the previous step

    def set_timesteps(self, num_inference_steps):
        n = self._check_steps(num_inference_steps)
        T = self.num_train_timesteps
        # DPM-Solver spaces n+1 points and drops the last (t=0 end), unlike DDIM.
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        elif self.timestep_spacing == "leading":
            ts = (np.arange(n + 1) * (T // (n + 1)))[::-1][:-1] + self.steps_offset
        else:  # trailing
            ts = np.arange(T, 0, -T / n).round() - 1
        self.timesteps = ts.astype(np.int64)
        sigmas = np.interp(self.timesteps, np.arange(T), self.train_sigmas)
        self.sigmas = _f32(np.append(sigmas, 0.0))
        self._reset()

    def add_noise(self, original, noise, t):
        # As diffusers: the schedule's sigma at t, turned into variance-preserving (alpha, sigma).
        self._check_ready()
        alpha, s = _vp(float(self.sigmas[_index_of(self.timesteps, t)]))
        return _f32(alpha * _f32(original) + s * _f32(noise))

    def step(self, model_output, t, sample):
        self._check_ready()
        out, x = _f32(model_output), _f32(sample)
        if self._step_index is None:
            self._step_index = _index_of(self.timesteps, t)
        i = self._step_index
        sigma_s0, sigma_t = float(self.sigmas[i]), float(self.sigmas[i + 1])
        alpha_s0, s_s0 = _vp(sigma_s0)
        # Solve in terms of the predicted clean latents.
        if self.prediction_type == "epsilon":
            x0 = (x - s_s0 * out) / alpha_s0
        else:  # v_prediction
            x0 = alpha_s0 * x - s_s0 * out
        x0 = _f32(x0)
        prev_x0, self._prev_x0 = self._prev_x0, x0
        self._step_index = i + 1

        if sigma_t == 0.0:
            # Final step: the first-order update at sigma=0 reduces exactly to x0.
            return x0
        alpha_t, s_t = _vp(sigma_t)
        h = math.log(sigma_s0 / sigma_t)  # lambda_t - lambda_s0
        decay = -math.expm1(-h)  # 1 - exp(-h), the weight x0 gets over the step
        if prev_x0 is None:
            # First order (= DDIM step) until a previous x0 exists.
            d = x0
        else:
            # Linear extrapolation of x0 in lambda, evaluated at the midpoint.
            h_prev = math.log(float(self.sigmas[i - 1]) / sigma_s0)  # lambda_s0 - lambda_s1
            r = h_prev / h
            d = x0 + (0.5 / r) * (x0 - prev_x0)
        return _f32((s_t / s_s0) * x + (alpha_t * decay) * d)


class LCMScheduler(Scheduler):
    """Latent Consistency Model sampling (Luo et al. 2023; diffusers' LCMScheduler).

    An LCM UNet predicts the clean latents in one evaluation from any noise level.
    Each step turns that prediction into the consistency function's output
    (boundary-condition mix of the prediction and the input), then re-noises it to
    the next timestep with fresh Gaussian noise; the last step returns the clean
    prediction itself. So the sampler is stochastic: step() draws its noise from
    the run's numpy Generator (or takes it as `noise=`, which the diffusers parity
    test uses to feed both sides the same draws).

    The timesteps are a subset of the schedule the model was distilled on:
    original_inference_steps evenly spaced training steps (k-1, 2k-1, ..., T-1 with
    k = T // original_inference_steps), of which num_inference_steps are taken at
    evenly spaced indices from the noisiest end. E.g. 4 of 50: 999, 759, 499, 259.
    diffusers 0.39 ignores timestep_spacing and steps_offset for LCM, so we do too
    (timestep_spacing is still checked to be a known value).
    """

    stochastic = True

    def __init__(self, config):
        # LCMScheduler's own defaults are SD's noise table, not the DDPM one the
        # other diffusers schedulers default to.
        config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", **config}
        super().__init__(config)
        T = self.num_train_timesteps
        ois = config.get("original_inference_steps", 50)
        if isinstance(ois, bool) or not isinstance(ois, (int, np.integer)) or not 1 <= ois <= T:
            raise ValueError(f"original_inference_steps must be an integer in [1, {T}] (num_train_timesteps), got {ois!r}")
        self.original_inference_steps = int(ois)
        self.timestep_scaling = float(config.get("timestep_scaling", 10.0))
        # Off for SD latents (diffusers' LCM default); ported because it is one clamp.
        self.clip_sample = bool(config.get("clip_sample", False))
        self.clip_sample_range = float(config.get("clip_sample_range", 1.0))
        # set_alpha_to_one is accepted and has no effect: LCM never steps past its
        # last timestep (the last step returns the prediction), so no alpha_bar[-1].
        self._step_index = None
        self.denoised = None  # the last step's clean-latent prediction (for previews)

    def set_timesteps(self, num_inference_steps, strength=1.0):
        """`strength` < 1 (img2img, diffusers' LCMScheduler.set_timesteps(..., strength=)): the distillation
        schedule is cut to its int(original_inference_steps x strength) least noisy steps and all
        num_inference_steps are picked from that, so an edit still runs every step, just from lower noise."""
        n, ois = num_inference_steps, self.original_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= ois:
            raise ValueError(f"num_inference_steps must be an integer in [1, {ois}] for LCM (it picks its steps from "
                             f"the original_inference_steps={ois} schedule the model was distilled on), got {n!r}")
        _check_strength(strength)
        n = int(n)
        # The same float product as diffusers, so a strength on a rounding edge cuts the same step count.
        kept = int(ois * strength)
        if kept < n:
            raise ValueError(f"strength {strength} keeps {kept} of the {ois} LCM distillation steps, fewer than the "
                             f"{n} steps asked: raise the strength to at least {n / ois:.3g} or use fewer steps")
        self.num_inference_steps = n
        k = self.num_train_timesteps // ois
        origin = (np.arange(1, kept + 1, dtype=np.int64) * k - 1)[::-1]  # noisiest first
        picks = np.floor(np.linspace(0, kept, num=n, endpoint=False)).astype(np.int64)
        self.timesteps = origin[picks].copy()
        self._step_index = None
        self.denoised = None

    def img2img_timesteps(self, num_inference_steps, strength):
        """diffusers' LatentConsistencyModelImg2ImgPipeline: the schedule rebuilt for the strength
        (set_timesteps(n, strength=)), every step of it run; the picture is noised to its first."""
        self.set_timesteps(num_inference_steps, strength=strength)
        return self.timesteps

    def strength_start(self, strength):
        raise TypeError("LCM enters no fixed schedule part-way: img2img_timesteps(steps, strength) rebuilds it")

    def _boundary_scalings(self, t):
        # Consistency-model boundary condition: c_skip(0) = 1, c_out(0) = 0, so the
        # function is the identity at t = 0; sigma_data = 0.5 as in the LCM paper.
        sigma_data = 0.5
        s = t * self.timestep_scaling
        c_skip = sigma_data**2 / (s * s + sigma_data**2)
        c_out = s / math.sqrt(s * s + sigma_data**2)
        return c_skip, c_out

    def step(self, model_output, t, sample, generator=None, noise=None):
        """One LCM step; the run's numpy `generator` supplies the re-injected noise
        (or pass `noise`, an array shaped like sample). The last step draws nothing."""
        self._check_ready()
        out, x, t = _f32(model_output), _f32(sample), int(t)
        if self._step_index is None:
            self._step_index = _index_of(self.timesteps, t)
        i = self._step_index
        last = i == len(self.timesteps) - 1
        a_t = float(self.alphas_cumprod[t])
        s_t = math.sqrt(1 - a_t)
        if self.prediction_type == "epsilon":
            x0 = (x - s_t * out) / math.sqrt(a_t)
        else:  # v_prediction
            x0 = math.sqrt(a_t) * x - s_t * out
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        c_skip, c_out = self._boundary_scalings(t)
        denoised = _f32(c_out * x0 + c_skip * x)
        self.denoised = denoised
        self._step_index = i + 1
        if last:
            return denoised
        if noise is None:
            if generator is None:
                raise ValueError("LCM re-noises between steps: pass step(..., generator=<the run's "
                                 "numpy.random.Generator>) or noise=<array shaped like sample>")
            noise = generator.standard_normal(x.shape, dtype=np.float32)
        noise = _f32(noise)
        if noise.shape != x.shape:
            raise ValueError(f"noise of shape {noise.shape} does not match the sample's {x.shape}")
        # Forward-diffuse the prediction to the next timestep's noise level.
        a_prev = float(self.alphas_cumprod[int(self.timesteps[i + 1])])
        return _f32(math.sqrt(a_prev) * denoised + math.sqrt(1 - a_prev) * noise)


_SCHEDULERS = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerScheduler,
    "dpm++2m": DPMSolverPP2MScheduler,
    "lcm": LCMScheduler,
}


def make_scheduler(name: str, config: dict) -> Scheduler:
    """Build the scheduler `name` (one of SCHEDULER_NAMES) from a scheduler_config.json dict."""
    if name not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of: {', '.join(SCHEDULER_NAMES)}")
    return _SCHEDULERS[name](config)
