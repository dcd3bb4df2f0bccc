"""Numerical agreement of `ldm_course.scheduler` with diffusers' DDPMScheduler, DDIMScheduler and DPMSolverMultistepScheduler.

Both sides get identical inputs and identically seeded `torch.Generator`s: diffusers draws its step noise with
`randn_tensor(shape, generator, device, dtype)` and our samplers draw it the same way, so whole trajectories
must agree to float32 rounding. diffusers is configured to our conventions: `clip_sample=False` unless clipping
is what is tested, the same `timestep_spacing`, `steps_offset=0`.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
# DPMSolverMultistepScheduler.set_timesteps calls np.array on a tensor in a way NumPy 2 deprecates: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn.t accept a copy keyword:DeprecationWarning")
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ldm_course.scheduler import (BETA_SCHEDULES, DPM_TIMESTEP_SPACINGS, PREDICTION_TYPES, DDIMSampler, DDPMSampler,
                                  DPMSolverMultistepSampler, NoiseScheduler, make_beta_schedule)

DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (1e-4, 0.02)}
SHAPE = (2, 3, 4, 4)
TOL = dict(rtol=1e-5, atol=1e-5)


def make_pair(reference_cls, schedule="linear", prediction_type="epsilon", num_train_timesteps=1000, **ref_kwargs):
    "Our NoiseScheduler and the same schedule as a diffusers scheduler (clip_sample off unless asked)."
    start, end = BETA_RANGE[schedule]
    ours = NoiseScheduler(num_train_timesteps, schedule, start, end, prediction_type)
    ref = reference_cls(num_train_timesteps=num_train_timesteps, beta_schedule=DIFFUSERS_NAME[schedule],
                        beta_start=start, beta_end=end, prediction_type=prediction_type,
                        **{"clip_sample": False, **ref_kwargs})
    return ours, ref


def toy_model(x, t):
    "A deterministic stand-in for a network: depends non-linearly on x_t and on t, as a real model would."
    return torch.tanh(x) * torch.cos(t.float() / 250).view(-1, 1, 1, 1) + 0.3 * x


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- schedules and forward process

@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("num_train_timesteps", [1000, 100])
@pytest.mark.parametrize("reference_cls", [DDPMScheduler, DDIMScheduler])
def test_betas_and_alphas_cumprod(reference_cls, schedule, num_train_timesteps):
    ours, ref = make_pair(reference_cls, schedule, num_train_timesteps=num_train_timesteps)
    assert ours.betas.dtype == torch.float32 and ours.betas.shape == (num_train_timesteps,)
    torch.testing.assert_close(ours.betas, ref.betas, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours.alphas, ref.alphas, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_add_noise_velocity_and_target(schedule, prediction_type):
    ours, ref = make_pair(DDPMScheduler, schedule, prediction_type)
    g = gen(0)
    x0, noise = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 250, 500, 750, 998, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), **TOL)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t), **TOL)
    expected = noise if prediction_type == "epsilon" else ref.get_velocity(x0, noise, t)
    torch.testing.assert_close(ours.get_target(x0, noise, t), expected, **TOL)
    # v by its definition, independently of diffusers
    a = ours.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0, **TOL)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_model_output_to_x0_and_eps_round_trip(prediction_type):
    ours = NoiseScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type)
    g = gen(1)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([3, 900])
    x_t = ours.add_noise(x0, noise, t)
    x0_hat, eps_hat = ours.predict_start_and_noise(ours.get_target(x0, noise, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_hat, noise, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- inference timesteps

@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [1, 3, 7, 10, 16, 50, 999, 1000])
@pytest.mark.parametrize("sampler_cls, reference_cls", [(DDPMSampler, DDPMScheduler), (DDIMSampler, DDIMScheduler)])
def test_set_timesteps_matches_diffusers(sampler_cls, reference_cls, spacing, n):
    ours, ref = make_pair(reference_cls, timestep_spacing=spacing)
    sampler = sampler_cls(ours, timestep_spacing=spacing)
    ref.set_timesteps(n)
    timesteps = sampler.set_timesteps(n)
    assert timesteps.dtype == torch.int64
    assert torch.equal(timesteps, ref.timesteps)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_timesteps_are_n_distinct_descending_values_in_range(spacing):
    # diffusers' float `np.arange` gives n + 1 "trailing" steps for some n (e.g. 61); ours must always give n
    sampler = DDIMSampler(NoiseScheduler(), timestep_spacing=spacing)
    for n in range(1, 1001):
        ts = sampler.set_timesteps(n)
        assert len(ts) == n and int(ts.min()) >= 0 and int(ts.max()) <= 999
        assert bool((ts[:-1] > ts[1:]).all())


# ---------------------------------------------------------------- single steps, every timestep of the grid

def compare_every_step(sampler, ref, seed, scale=1.0, **ref_step_kwargs):
    "Call both `step`s at every inference timestep with identical random inputs and identically seeded generators."
    g = gen(seed)
    for t in ref.timesteps:
        x_t = torch.randn(SHAPE, generator=g) * scale
        out = torch.randn(SHAPE, generator=g) * scale
        expected = ref.step(out, t, x_t, generator=gen(int(t)), **ref_step_kwargs)
        x_prev, x0 = sampler.step(out, t, x_t, generator=gen(int(t)), return_x0=True)
        torch.testing.assert_close(x0, expected.pred_original_sample, **TOL, msg=lambda m: f"x0 at t={int(t)}: {m}")
        torch.testing.assert_close(x_prev, expected.prev_sample, **TOL, msg=lambda m: f"x_prev at t={int(t)}: {m}")
        assert torch.equal(sampler.step(out, t, x_t, generator=gen(int(t))), x_prev)  # return_x0 changes nothing


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("n", [10, 50, 1000])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddpm_step(schedule, prediction_type, n, clip_sample):
    ours, ref = make_pair(DDPMScheduler, schedule, prediction_type, clip_sample=clip_sample)
    sampler = DDPMSampler(ours, clip_sample=clip_sample)
    ref.set_timesteps(n); sampler.set_timesteps(n)
    compare_every_step(sampler, ref, seed=n, scale=2.0 if clip_sample else 1.0)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("n", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_step(schedule, prediction_type, n, eta, set_alpha_to_one):
    ours, ref = make_pair(DDIMScheduler, schedule, prediction_type, set_alpha_to_one=set_alpha_to_one)
    sampler = DDIMSampler(ours, eta=eta, set_alpha_to_one=set_alpha_to_one)
    ref.set_timesteps(n); sampler.set_timesteps(n)
    compare_every_step(sampler, ref, seed=n, eta=eta)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("use_clipped_model_output", [False, True])
def test_ddim_step_with_clipping(prediction_type, eta, use_clipped_model_output):
    ours, ref = make_pair(DDIMScheduler, "linear", prediction_type, clip_sample=True, clip_sample_range=1.5)
    sampler = DDIMSampler(ours, eta=eta, clip_sample=True, clip_sample_range=1.5, use_clipped_model_output=use_clipped_model_output)
    ref.set_timesteps(20); sampler.set_timesteps(20)
    compare_every_step(sampler, ref, seed=7, scale=3.0, eta=eta, use_clipped_model_output=use_clipped_model_output)


@pytest.mark.parametrize("sampler_cls, reference_cls", [(DDPMSampler, DDPMScheduler), (DDIMSampler, DDIMScheduler)])
@pytest.mark.parametrize("n", [10, 50])
def test_step_with_trailing_spacing(sampler_cls, reference_cls, n):
    ours, ref = make_pair(reference_cls, "cosine", "v_prediction", timestep_spacing="trailing")
    eta = {"eta": 0.5} if sampler_cls is DDIMSampler else {}
    sampler = sampler_cls(ours, timestep_spacing="trailing", **eta)
    ref.set_timesteps(n); sampler.set_timesteps(n)
    compare_every_step(sampler, ref, seed=3, **eta)


# ---------------------------------------------------------------- whole trajectories

def diffusers_sample(ref, model_fn, shape, seed, **step_kwargs):
    "The loop of diffusers' pipelines: x_T = randn_tensor(shape, generator), then ref.step at every timestep."
    from diffusers.utils.torch_utils import randn_tensor
    g = gen(seed)
    x = randn_tensor(shape, generator=g)
    x0s = []
    for t in ref.timesteps:
        out = ref.step(model_fn(x, t.expand(shape[0])), t, x, generator=g, **step_kwargs)
        x = out.prev_sample
        x0s.append(getattr(out, "pred_original_sample", None))  # DPMSolverMultistepScheduler does not return it
    return x, x0s


TRAJECTORIES = [("ddpm", n, 0.0) for n in (10, 50, 1000)] + [("ddim", n, eta) for n in (10, 50) for eta in (0.0, 0.5, 1.0)]


@pytest.mark.parametrize("kind, n, eta", TRAJECTORIES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_full_trajectory(kind, n, eta, prediction_type):
    schedule = "scaled_linear" if prediction_type == "epsilon" else "cosine"
    if kind == "ddpm":
        ours, ref = make_pair(DDPMScheduler, schedule, prediction_type)
        sampler, step_kwargs = DDPMSampler(ours), {}
    else:
        ours, ref = make_pair(DDIMScheduler, schedule, prediction_type)
        sampler, step_kwargs = DDIMSampler(ours, eta=eta), {"eta": eta}
    ref.set_timesteps(n)
    expected, _ = diffusers_sample(ref, toy_model, SHAPE, seed=11, **step_kwargs)
    got = sampler.sample(toy_model, SHAPE, gen(11), num_inference_steps=n)
    assert not got.requires_grad and got.is_inference()
    torch.testing.assert_close(got, expected, **TOL)


def test_sample_trajectory_snapshots_match_diffusers():
    ours, ref = make_pair(DDIMScheduler, "linear", "v_prediction")
    ref.set_timesteps(20)
    expected, ref_x0s = diffusers_sample(ref, toy_model, SHAPE, seed=5, eta=0.3)
    traj = DDIMSampler(ours, eta=0.3).sample_trajectory(toy_model, SHAPE, gen(5), n_snapshots=5, num_inference_steps=20)
    # states after 0, 5, 10, 15 and 20 steps: x_T first, the final sample last
    assert traj.timesteps.tolist() == [int(ref.timesteps[i]) for i in (0, 5, 10, 15)] + [-1]
    assert traj.x_t.shape == (5, *SHAPE) and traj.pred_x0.shape == (5, *SHAPE)
    torch.testing.assert_close(traj.x_t[0], torch.randn(SHAPE, generator=gen(5)))
    torch.testing.assert_close(traj.sample, expected, **TOL)
    torch.testing.assert_close(traj.x_t[-1], expected, **TOL)
    for j, i in enumerate((0, 5, 10, 15)):
        torch.testing.assert_close(traj.pred_x0[j], ref_x0s[i], **TOL)


def test_sample_callback_and_given_start():
    sampler = DDPMSampler(NoiseScheduler(beta_schedule="cosine"))
    x_T = torch.randn(SHAPE, generator=gen(2))
    seen = []
    out = sampler.sample(toy_model, SHAPE, gen(3), x_T=x_T, num_inference_steps=8,
                         callback=lambda i, t, x, x0: seen.append((i, t, x.shape, x0.shape)))
    assert [s[:2] for s in seen] == list(enumerate([875, 750, 625, 500, 375, 250, 125, 0]))
    assert torch.equal(out, sampler.sample(toy_model, SHAPE, gen(3), x_T=x_T))  # same start and seed, same result
    with pytest.raises(ValueError, match="x_T has shape"):
        sampler.sample(toy_model, (1, 3, 4, 4), x_T=x_T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_with_cpu_generator_matches_diffusers():
    ours, ref = make_pair(DDIMScheduler, "cosine", "v_prediction")
    ref.set_timesteps(25)
    expected, _ = diffusers_sample(ref, toy_model, SHAPE, seed=4, eta=0.5)
    got = DDIMSampler(ours.to("cuda"), eta=0.5).sample(toy_model, SHAPE, gen(4), num_inference_steps=25, device="cuda")
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, **TOL)


# ---------------------------------------------------------------- the maths, independently of diffusers

def test_ddim_eta_zero_follows_the_forward_marginals():
    # with the true ε, deterministic DDIM lands exactly on √ᾱ_s·x0 + √(1-ᾱ_s)·ε at every jump
    ours = NoiseScheduler(beta_schedule="cosine")
    sampler = DDIMSampler(ours)
    sampler.set_timesteps(25)
    g = gen(9)
    x0, noise = torch.rand(SHAPE, generator=g) * 2 - 1, torch.randn(SHAPE, generator=g)
    x = ours.add_noise(x0, noise, int(sampler.timesteps[0]))
    for t in sampler.timesteps:
        x = sampler.step(noise, t, x)
        prev = sampler.previous_timestep(t)
        torch.testing.assert_close(x, ours.add_noise(x0, noise, prev) if prev >= 0 else x0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_eta_one_equals_ddpm(prediction_type):
    ours = NoiseScheduler(prediction_type=prediction_type)
    ddim, ddpm = DDIMSampler(ours, eta=1.0), DDPMSampler(ours)
    ddim.set_timesteps(40); ddpm.set_timesteps(40)
    g = gen(6)
    for t in ddpm.timesteps:
        out, x_t = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        torch.testing.assert_close(ddim.step(out, t, x_t, generator=gen(1)), ddpm.step(out, t, x_t, generator=gen(1)),
                                   rtol=1e-4, atol=1e-4)


def test_schedule_tensors_are_buffers_that_follow_to():
    ours = NoiseScheduler()
    assert ours.state_dict() == {}  # derived from the config, not saved
    moved = NoiseScheduler().to(torch.float64)
    assert moved.alphas_cumprod.dtype == torch.float64
    assert NoiseScheduler().to("meta").sqrt_alphas_cumprod.device.type == "meta"


def test_cosine_schedule_closed_form():
    import math
    betas = make_beta_schedule("cosine", 1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    abar = torch.cumprod(1 - betas.double(), 0)
    for t in (0, 100, 500, 900, 998):
        assert abs(float(abar[t]) - f((t + 1) / 1000) / f(0)) < 1e-5
    assert abs(float(betas[-1]) - 0.999) < 1e-7


# ---------------------------------------------------------------- bad inputs

def test_clear_errors():
    ours = NoiseScheduler()
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="Unknown beta_schedule 'squaredcos_cap_v2'"):
        NoiseScheduler(beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError, match="Unknown prediction_type 'sample'"):
        NoiseScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match=r"\[0, 999\], got values from 0 to 1000"):
        ours.add_noise(x, x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="integers"):
        ours.get_velocity(x, x, torch.tensor([0.5, 1.0]))
    sampler = DDIMSampler(ours)
    with pytest.raises(ValueError, match=r"num_inference_steps must be an int in \[1, 1000\]"):
        sampler.set_timesteps(0)
    sampler.set_timesteps(10)
    with pytest.raises(ValueError, match="950 is not one of the 10 inference timesteps"):
        sampler.step(x, 950, x)
    with pytest.raises(ValueError, match="must match x_t shape"):
        sampler.step(torch.zeros(2, 6, 4, 4), 900, x)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        DDIMSampler(ours, eta=-1)
    with pytest.raises(ValueError, match="Unknown timestep_spacing 'linspace'"):
        DDPMSampler(ours, timestep_spacing="linspace")
    with pytest.raises(ValueError, match="3 only with algorithm_type='dpmsolver\\+\\+'"):
        DPMSolverMultistepSampler(ours, solver_order=3, algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match=r"num_inference_steps must be an int in \[1, 999\]"):
        DPMSolverMultistepSampler(ours, timestep_spacing="leading").set_timesteps(1000)


# ---------------------------------------------------------------- DPM-Solver++ (DPMSolverMultistepScheduler)

def dpm_pair(schedule="linear", prediction_type="epsilon", **options):
    "Our DPMSolverMultistepSampler and diffusers' DPMSolverMultistepScheduler: same schedule, same options (same names)."
    start, end = BETA_RANGE[schedule]
    ours = DPMSolverMultistepSampler(NoiseScheduler(1000, schedule, start, end, prediction_type), **options)
    ref = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_NAME[schedule], beta_start=start,
                                      beta_end=end, prediction_type=prediction_type, **options)
    return ours, ref


def bounded_model(scheduler):
    "A stand-in network whose x̂0 = tanh(1.5·x_t + cos(t/250)) stays in [-1, 1], as ε̂ or v̂ (the samples stay O(1))."
    def model_fn(x, t):
        x0 = torch.tanh(1.5 * x + torch.cos(t.float() / 250).view(-1, 1, 1, 1))
        return scheduler.get_target(x0, scheduler.predict_noise_from_start(x, t, x0), t)
    return model_fn


def compare_dpm_trajectories(ours, ref, n, seed=0, scale=1.0):
    "Both solvers from the same x_T, each on its own trajectory, same model, identically seeded step noise: every state agrees."
    ref.set_timesteps(n); ours.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref.timesteps)
    model = bounded_model(ours.scheduler)
    x = x_ref = torch.randn(SHAPE, generator=gen(seed)) * scale
    g_ours, g_ref = gen(seed + 1), gen(seed + 1)
    for t in ref.timesteps:
        x_ref = ref.step(model(x_ref, t.expand(SHAPE[0])), t, x_ref, generator=g_ref).prev_sample
        x, x0 = ours.step(model(x, t.expand(SHAPE[0])), t, x, generator=g_ours, return_x0=True)
        # x̂0 itself is ill-conditioned for ε at t = 999 (it divides by α_t ≈ 6e-3): float32 leaves both sides ~3e-5
        # from the float64 value there. The samples multiply it by α_t(1 − e^{-h}) and must agree to 1e-5.
        torch.testing.assert_close(x0, ref.model_outputs[-1], rtol=1e-4, atol=1e-4, msg=lambda m: f"x0 at t={int(t)}: {m}")
        torch.testing.assert_close(x, x_ref, **TOL, msg=lambda m: f"x at the step after t={int(t)}: {m}")
    return x


@pytest.mark.parametrize("spacing", DPM_TIMESTEP_SPACINGS)
@pytest.mark.parametrize("n", [1, 3, 7, 10, 15, 16, 50, 999])
def test_dpm_set_timesteps_matches_diffusers(spacing, n):
    ours, ref = dpm_pair(timestep_spacing=spacing)
    ref.set_timesteps(n)
    timesteps = ours.set_timesteps(n)
    assert timesteps.dtype == torch.int64 and torch.equal(timesteps, ref.timesteps)


@pytest.mark.parametrize("spacing", DPM_TIMESTEP_SPACINGS)
def test_dpm_timesteps_are_n_distinct_descending_values_in_range(spacing):
    sampler = DPMSolverMultistepSampler(NoiseScheduler(), timestep_spacing=spacing)
    for n in range(1, sampler.max_inference_steps + 1):
        ts = sampler.set_timesteps(n)
        assert len(ts) == n and int(ts.min()) >= 0 and int(ts.max()) <= 999
        assert bool((ts[:-1] > ts[1:]).all())
    assert sampler.max_inference_steps == (1000 if spacing == "trailing" else 999)


# ε with scaled_linear, v with cosine (ε at the cosine's last step divides by α ≈ 5e-5: meaningless in float32)
PAIRS = [("scaled_linear", "epsilon"), ("cosine", "v_prediction")]
ORDERS = [(1, "dpmsolver++"), (2, "dpmsolver++"), (3, "dpmsolver++"), (1, "sde-dpmsolver++"), (2, "sde-dpmsolver++")]


@pytest.mark.parametrize("schedule, prediction_type", PAIRS)
@pytest.mark.parametrize("n", [5, 8, 15, 20])
@pytest.mark.parametrize("solver_order, algorithm_type", ORDERS)
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_dpm_every_intermediate_sample(schedule, prediction_type, n, solver_order, algorithm_type, lower_order_final):
    ours, ref = dpm_pair(schedule, prediction_type, solver_order=solver_order, algorithm_type=algorithm_type,
                         lower_order_final=lower_order_final, timestep_spacing="trailing")
    compare_dpm_trajectories(ours, ref, n, seed=n)


@pytest.mark.parametrize("spacing", DPM_TIMESTEP_SPACINGS)
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("n, solver_order, algorithm_type", [(5, 2, "dpmsolver++"), (15, 3, "dpmsolver++"), (8, 2, "sde-dpmsolver++")])
def test_dpm_spacings_and_final_sigmas(spacing, final_sigmas_type, n, solver_order, algorithm_type):
    ours, ref = dpm_pair("linear", "epsilon", solver_order=solver_order, algorithm_type=algorithm_type,
                         final_sigmas_type=final_sigmas_type, timestep_spacing=spacing)
    compare_dpm_trajectories(ours, ref, n, seed=3)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("solver_order, algorithm_type", [(2, "dpmsolver++"), (3, "dpmsolver++"), (2, "sde-dpmsolver++")])
@pytest.mark.parametrize("ratio, max_value", [(0.995, 1.0), (0.995, 1.5), (0.9, 3.0)])
def test_dpm_with_dynamic_thresholding(prediction_type, solver_order, algorithm_type, ratio, max_value):
    ours, ref = dpm_pair("linear", prediction_type, solver_order=solver_order, algorithm_type=algorithm_type, thresholding=True,
                         dynamic_thresholding_ratio=ratio, sample_max_value=max_value, timestep_spacing="leading")
    compare_dpm_trajectories(ours, ref, 12, seed=5, scale=3.0)


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_dpm_sample_loop_matches_diffusers_pipeline_loop(algorithm_type, prediction_type):
    # one generator draws x_T and then every step's noise, on both sides
    schedule = "scaled_linear" if prediction_type == "epsilon" else "cosine"
    ours, ref = dpm_pair(schedule, prediction_type, algorithm_type=algorithm_type, timestep_spacing="trailing")
    ref.set_timesteps(15)
    model = bounded_model(ours.scheduler)
    expected, _ = diffusers_sample(ref, model, SHAPE, seed=11)
    got = ours.sample(model, SHAPE, gen(11), num_inference_steps=15)
    assert not got.requires_grad and got.is_inference()
    torch.testing.assert_close(got, expected, **TOL)


def test_dpm_step_is_repeatable_and_a_new_run_forgets_the_last():
    ours, _ = dpm_pair("cosine", "v_prediction", solver_order=3)
    model = bounded_model(ours.scheduler)
    ours.set_timesteps(10)
    x = torch.randn(SHAPE, generator=gen(0))
    for t in ours.timesteps:
        out = model(x, t.expand(SHAPE[0]))
        x_next, x0 = ours.step(out, t, x, return_x0=True)
        assert torch.equal(ours.step(out, t, x), x_next)   # the same step twice, or without return_x0: the same result
        x = x_next
    x_T = torch.randn(SHAPE, generator=gen(1))
    first = ours.sample(model, SHAPE, x_T=x_T)
    assert torch.equal(ours.sample(model, SHAPE, x_T=x_T), first)   # the second run does not reuse the first run's x̂0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dpm_sde_on_cuda_with_cpu_generator_matches_diffusers():
    ours, ref = dpm_pair("cosine", "v_prediction", algorithm_type="sde-dpmsolver++", timestep_spacing="trailing")
    ref.set_timesteps(20)
    model = bounded_model(ours.scheduler)
    expected, _ = diffusers_sample(ref, model, SHAPE, seed=4)
    ours.scheduler.to("cuda")
    cuda_model = bounded_model(ours.scheduler)
    got = ours.sample(cuda_model, SHAPE, gen(4), num_inference_steps=20, device="cuda")
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, **TOL)
