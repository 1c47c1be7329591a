"""The sampler against an independent transcription of the reference, and the sampler's refusals.

``Ref*`` below is written for this test from the reference formulas (OpenAI's ``space_timesteps``
/ ``SpacedDiffusion`` / ``_WrappedModel``, DensePure's runners and its modified
``GaussianDiffusion.p_sample``), deliberately not through ``workers.schedule``: the project's
scheduler coefficients, its t*, the timesteps its network is fed and one full b-step trajectory
(shared noise, a small random OpenAI UNet with learned variance) must agree with it.

Precision: everything runs in float64 (the UNet casts its input to float32 and back), so a 1e-6
tolerance tests the formulas. The reference fetches its coefficients as float32
(``_extract_into_tensor(...).float()``); keeping float64 here is a deliberate difference of the
transcription that no formula depends on.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.fixtures.models import replay_noise
from workers.denoiser import Denoiser
from workers.purify import Purifier, PurifySpec
from workers.schedule import (
    DensePureScheduler,
    NoiseSchedule,
    check_sampler,
    max_steps,
    openai_schedule,
    reverse_timesteps,
    schedule_from_flags,
    sigma_range,
    space_timesteps,
    timestep_for_sigma,
)
from workers.unet import build_openai_unet
from workers.unet_flags import diffusion_settings

NET_FLAGS = dict(
    image_size=8, in_channels=1, num_channels=32, channel_mult="1,2", num_res_blocks=1,
    attention_resolutions="2", num_head_channels=16, use_scale_shift_norm=True, learn_sigma=True,
)


# --------------------------------------------------------------------------------------------
# the reference, transcribed


def ref_base_betas(name: str, T: int) -> np.ndarray:
    """get_named_beta_schedule."""
    if name == "linear":
        return np.linspace(1000 / T * 0.0001, 1000 / T * 0.02, T, dtype=np.float64)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])


def ref_space_timesteps(T: int, spec: str) -> set[int]:
    """space_timesteps, with create_gaussian_diffusion's '' -> [T]."""
    if spec.startswith("ddim"):
        n = int(spec[4:])
        return next(set(range(0, T, k)) for k in range(1, T) if len(range(0, T, k)) == n)
    counts = [int(c) for c in spec.split(",")] if spec else [T]
    per, extra = T // len(counts), T % len(counts)
    out: set[int] = set()
    begin = 0
    for i, n in enumerate(counts):
        size = per + (i < extra)
        stride = 1 if n <= 1 else (size - 1) / (n - 1)
        cur = 0.0
        for _ in range(n):
            out.add(begin + round(cur))
            cur += stride
        begin += size
    return out


class RefDensePure:
    """SpacedDiffusion + DensePure's runner (t*) + its p_sample (chain recomputed at the first step)."""

    def __init__(self, name: str, T: int, respacing: str, rescale: bool, var_type: str):
        base_abar = np.cumprod(1 - ref_base_betas(name, T))
        keep = ref_space_timesteps(T, respacing)
        self.timestep_map, betas, last = [], [], 1.0
        for i, a in enumerate(base_abar):
            if i in keep:
                betas.append(1 - a / last)
                last = a
                self.timestep_map.append(i)
        self.name, self.T_total, self.rescale, self.var_type = name, T, rescale, var_type
        self.abar_origin = np.cumprod(1 - np.array(betas))  # alphas_cumprod_origin of the spaced diffusion
        self.sqrt_recipm1 = np.sqrt(1.0 / self.abar_origin - 1)

    # runners: t*
    def t_star(self, sigma: float) -> float:
        s = sigma * 2
        if self.name == "cosine":
            return self.T_total * (1 - (2 * 1.008 * math.asin(math.sin(math.pi / (2 * 1.008)) / (1 + s**2) ** 0.5)) / math.pi)
        r = self.sqrt_recipm1
        for t in range(len(r) - 1):
            if r[t] < s and r[t + 1] >= s:
                return t + 1 if s - r[t] > r[t + 1] - s else t
        return len(r) - 1  # the fallback the project refuses

    def carlini_t(self, sigma: float) -> int:
        return int(np.nonzero(self.sqrt_recipm1 >= 2 * sigma)[0][0])

    # p_sample, step == len(indices): the chain
    def chain(self, indices: list[int]) -> None:
        ind = indices[::-1]
        ind = [0] + ind
        if self.name == "cosine":
            f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            b = [min(1 - f(ind[i + 1] / self.T_total) / f(ind[i] / self.T_total), 0.999) for i in range(len(ind) - 1)]
        else:
            a = self.abar_origin
            b = [min(1 - a[ind[i + 1]] / a[ind[i]], 0.999) for i in range(len(ind) - 1)]
        self.betas = np.array(b, dtype=np.float64)
        self.abar = np.cumprod(1 - self.betas)
        abar_prev = np.append(1.0, self.abar[:-1])
        self.post_var = self.betas * (1 - abar_prev) / (1 - self.abar)
        with np.errstate(divide="ignore"):
            self.post_logvar = np.log(np.append(self.post_var[1], self.post_var[1:]))
        self.coef1 = self.betas * np.sqrt(abar_prev) / (1 - self.abar)
        self.coef2 = (1 - abar_prev) * np.sqrt(1 - self.betas) / (1 - self.abar)

    # _WrappedModel
    def net_t(self, real_t: torch.Tensor) -> torch.Tensor:
        new = torch.tensor(self.timestep_map, dtype=real_t.dtype)[real_t]
        return new.float() * (1000.0 / self.T_total) if self.rescale else new

    # p_mean_variance + p_sample given the network output
    def p_sample(self, out: torch.Tensor, x: torch.Tensor, t: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        C = x.shape[1]
        if self.var_type == "learned_range":
            eps, v = torch.split(out, C, dim=1)
            frac = (v + 1) / 2
            logvar = frac * math.log(self.betas[t]) + (1 - frac) * self.post_logvar[t]
        else:
            eps = out
            fixed = {
                "fixed_large": np.log(np.append(self.post_var[1], self.betas[1:])),
                "fixed_small": self.post_logvar,
            }[self.var_type]
            logvar = torch.full_like(x, fixed[t])
        x0 = (np.sqrt(1.0 / self.abar[t]) * x - np.sqrt(1.0 / self.abar[t] - 1) * eps).clamp(-1, 1)
        mean = self.coef1[t] * x0 + self.coef2[t] * x
        return mean + float(t != 0) * torch.exp(0.5 * logvar) * noise, x0

    def run(self, model, x01: torch.Tensor, sigma: float, steps: int, delta: torch.Tensor, noises: list[torch.Tensor]):
        """image_editing_sample(--use_t_steps) on (x01 + sigma delta): Smooth's noise, then the runner."""
        x = (1 / (1 + (sigma * 2) ** 2)) ** 0.5 * ((x01 + sigma * delta - 0.5) * 2)
        t = self.t_star(sigma)
        inter = t / steps
        indices = [round(t - i * inter) for i in range(steps)]
        for i in range(steps):
            if i == 0:
                self.chain(indices.copy())
            real_t = torch.tensor([indices[i]] * x.shape[0])
            out = model(x, self.net_t(real_t)).to(x.dtype)
            x, _ = self.p_sample(out, x, steps - i - 1, noises[i] if i < steps - 1 else torch.full_like(x, 1e3))
        return x


# --------------------------------------------------------------------------------------------
# helpers


class Recorder(torch.nn.Module):
    """The network, logging every timestep tensor it is fed."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.in_channels, self.image_size = net.in_channels, net.image_size
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(t.detach().clone())
        return self.net(x, t)


def random_unet(seed: int = 0) -> torch.nn.Module:
    """The tiny OpenAI UNet with every parameter random (OpenAI zero-initialises the output conv,
    which would make eps = v = 0 and the network irrelevant to the comparison)."""
    net = build_openai_unet(NET_FLAGS)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 1.0 / p[0].numel() ** 0.5, generator=gen)
    return net.eval()


def flags_for(name: str, T: int, respacing: str, rescale: bool) -> dict:
    return {**NET_FLAGS, "noise_schedule": name, "diffusion_steps": T, "timestep_respacing": respacing,
            "rescale_timesteps": rescale}


# (schedule, T, timestep_respacing, rescale_timesteps, sigma, steps)
CASES = [
    ("linear", 1000, "", True, 0.25, 3),
    ("linear", 1000, "1000", True, 0.25, 3),
    ("linear", 1000, "250", True, 0.25, 4),
    ("linear", 1000, "250", False, 0.5, 2),
    ("linear", 1000, "ddim50", True, 0.5, 3),
    ("cosine", 4000, "", True, 0.25, 3),
]


# --------------------------------------------------------------------------------------------
# respacing


@pytest.mark.parametrize("T,spec", [(1000, ""), (1000, "1000"), (1000, "250"), (1000, "ddim50"), (300, "10,15,20"),
                                    (4000, "1000"), (1000, "7,1,33"), (1000, "ddim7")])
def test_space_timesteps_matches_openai(T: int, spec: str) -> None:
    assert space_timesteps(T, spec) == sorted(ref_space_timesteps(T, spec))


def test_openai_docstring_example_and_refusals() -> None:
    kept = space_timesteps(300, "10,15,20")
    assert len(kept) == 45 and kept[:3] == [0, 11, 22] and kept[-1] == 299
    for bad in ("2000", "ddim3000", "ddimx", "10,", "0"):
        with pytest.raises(ValueError, match="timestep_respacing"):
            space_timesteps(1000, bad)


@pytest.mark.parametrize("name,T,spec,rescale,sigma,steps", CASES)
def test_respaced_chain_and_t_star_match_the_reference(name, T, spec, rescale, sigma, steps) -> None:
    sched = schedule_from_flags(flags_for(name, T, spec, rescale))
    ref = RefDensePure(name, T, spec, rescale, "learned_range")
    assert list(sched.timestep_map) == ref.timestep_map and sched.original_T == T
    np.testing.assert_allclose(sched.alphas_cumprod, ref.abar_origin, rtol=1e-13, atol=0)
    assert timestep_for_sigma(sched, sigma, "densepure") == pytest.approx(ref.t_star(sigma), rel=1e-13, abs=0)
    t_star = timestep_for_sigma(sched, sigma, "densepure")
    for variance in ("learned_range", "fixed_large", "fixed_small"):
        s = DensePureScheduler(sched, t_star, steps, variance)
        ref.chain(s.timesteps.copy())
        np.testing.assert_allclose(s.betas, ref.betas, rtol=1e-13, atol=0)
        np.testing.assert_allclose(s.alphas_cumprod, ref.abar, rtol=1e-13, atol=0)
        # One step at every chain position, random network output, against p_sample.
        ref.var_type = variance
        g = torch.Generator().manual_seed(steps)
        x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
        out = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64)
        noise = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
        for i in range(steps):
            eps, v = (out[:, :1], out[:, 1:]) if variance == "learned_range" else (out[:, :1], None)
            got, x0 = s.step(eps, i, x, noise if i < steps - 1 else None, v)
            want, want_x0 = ref.p_sample(out if variance == "learned_range" else out[:, :1], x, steps - 1 - i, noise)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(x0, want_x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,T,spec,rescale,sigma,steps", CASES)
def test_full_trajectory_matches_the_reference(name, T, spec, rescale, sigma, steps) -> None:
    """One draw, b steps, learned variance: the engine's Purifier against the transcribed reference."""
    flags = flags_for(name, T, spec, rescale)
    net = Recorder(random_unet())
    den = Denoiser.from_openai(net, diffusion_settings(flags))
    ref = RefDensePure(name, T, spec, rescale, "learned_range")
    x01 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    seeds = [21, 22]
    with torch.inference_mode():
        got = Purifier(PurifySpec("densepure", sigma, steps=steps, votes=1), den)(x01, seeds)
        fed_project = net.seen.copy()
        net.seen.clear()
        # The same random numbers, in the Purifier's documented order: delta, then one tensor per noisy step.
        delta, step_noise = replay_noise(seeds, (1, 8, 8), votes=1, noisy_steps=steps - 1, dtype=torch.float64)
        noises = [n[:, 0] for n in step_noise]
        want = ref.run(net, x01, sigma, steps, delta, noises)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:, 0], (want + 1) / 2, rtol=0, atol=1e-6)
    # The network saw the mapped, rescaled original timesteps, in the same dtype.
    assert len(fed_project) == len(net.seen) == steps
    for a, b in zip(fed_project, net.seen):
        assert a.dtype == b.dtype and torch.equal(a, b)
    taus = reverse_timesteps(ref.t_star(sigma), steps)
    expected = [ref.timestep_map[tau] * (1000.0 / T if rescale else 1) for tau in taus]
    assert [float(t[0]) for t in net.seen] == pytest.approx(expected, rel=1e-6)


def test_densepure_imagenet_respacing_1000_is_exactly_no_respacing() -> None:
    imagenet = dict(diffusion_steps=1000, noise_schedule="linear", learn_sigma=True, rescale_timesteps=True,
                    num_head_channels=64, resblock_updown=True)
    a = schedule_from_flags({**imagenet, "timestep_respacing": "1000"})
    b = schedule_from_flags({**imagenet, "timestep_respacing": ""})
    assert np.array_equal(a.betas, b.betas) and a.timestep_map == b.timestep_map
    assert (a.name, a.T, a.original_T, a.respacing, a.is_respaced) == (b.name, b.T, b.original_T, b.respacing, False)
    # ... and so are the sampler and a whole trajectory.
    sa, sb = (DensePureScheduler(s, timestep_for_sigma(s, 0.5), 10, "learned_range") for s in (a, b))
    assert sa.timesteps == sb.timesteps and np.array_equal(sa.betas, sb.betas)
    net = random_unet()
    x01 = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    outs = []
    for spec in ("1000", ""):
        den = Denoiser.from_openai(net, diffusion_settings({**flags_for("linear", 1000, spec, True)}))
        with torch.inference_mode():
            outs.append(Purifier(PurifySpec("densepure", 0.5, steps=3, votes=2), den)(x01, [9]))
    assert torch.equal(outs[0], outs[1])


def test_cosine_chain_is_the_continuous_schedule_at_rounded_tau() -> None:
    sched = openai_schedule("cosine", 4000)
    t_star = timestep_for_sigma(sched, 0.25)
    assert t_star != round(t_star)  # real-valued closed form...
    s = DensePureScheduler(sched, t_star, 10, "learned_range")
    f = lambda u: math.cos((u / 4000 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # ... but only the rounded tau reach the chain: abar'_j = f(tau_j), not alphas_cumprod[tau_j].
    np.testing.assert_allclose(s.alphas_cumprod, [f(t) for t in s.timesteps[::-1]], rtol=1e-12)
    discrete = sched.alphas_cumprod[s.timesteps[0]]
    assert abs(s.alphas_cumprod[-1] / discrete - 1) > 1e-4  # the old discrete chain, one step later


def test_dds_on_a_respaced_chain_feeds_the_mapped_timestep() -> None:
    flags = flags_for("linear", 1000, "250", True)
    net = Recorder(random_unet())
    den = Denoiser.from_openai(net, diffusion_settings(flags))
    ref = RefDensePure("linear", 1000, "250", True, "learned_range")
    x01 = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    with torch.inference_mode():
        got = Purifier(PurifySpec("dds", 0.5), den)(x01, [4])
        t = ref.carlini_t(0.5)
        delta = replay_noise([4], (1, 8, 8), votes=0, noisy_steps=0, dtype=torch.float64)[0][0]
        x = (1 / (1 + 1.0**2)) ** 0.5 * ((x01 + 0.5 * delta - 0.5) * 2)
        eps = net(x, ref.net_t(torch.tensor([t])))[:, :1].double()
    abar = ref.abar_origin[t]
    want = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
    assert float(net.seen[0][0]) == pytest.approx(ref.timestep_map[t])
    torch.testing.assert_close(got[:, 0], (want + 1) / 2, rtol=0, atol=1e-6)


def test_denoiser_maps_integer_indices_only() -> None:
    den = Denoiser.from_openai(Recorder(random_unet()), diffusion_settings(flags_for("linear", 1000, "250", True)))
    x = torch.zeros(1, 1, 8, 8)
    with torch.inference_mode():
        den(x, torch.tensor([10.0]))  # an integral float is an index
        assert float(den.net.seen[-1][0]) == pytest.approx(space_timesteps(1000, "250")[10])
        with pytest.raises(ValueError, match="integer"):
            den(x, torch.tensor([10.5]))


# --------------------------------------------------------------------------------------------
# refusals


LINEAR = openai_schedule("linear", 1000)


def _message(fn, *args) -> str:
    with pytest.raises(ValueError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_too_many_steps_names_t_star_and_what_works() -> None:
    t_star = int(timestep_for_sigma(LINEAR, 0.12))
    check_sampler(LINEAR, 0.12, t_star, "densepure")
    msg = _message(check_sampler, LINEAR, 0.12, t_star + 1, "densepure")
    for part in (f"sigma 0.12 with --steps {t_star + 1}", f"t* = {t_star}", f"at most {t_star} steps",
                 f"--steps <= {t_star}", "sigma >"):
        assert part in msg, msg
    assert max_steps(LINEAR, 0.12) == t_star
    # The reference's alternative: repeated timesteps, beta' = 0 and a NaN image. The scheduler refuses too.
    _message(DensePureScheduler, LINEAR, float(t_star), t_star + 1, "learned_range")
    assert len(set(reverse_timesteps(float(t_star), t_star + 1))) < t_star + 1 or reverse_timesteps(float(t_star), t_star + 1)[-1] == 0


def test_max_steps_is_exact_on_the_cosine_closed_form() -> None:
    sched = openai_schedule("cosine", 4000)
    for t_target in (1.3, 2.5, 7.6, 9.6, 12.0, 30.49):
        # The sigma whose real t* is t_target (inverting the continuous abar).
        abar = (math.cos((t_target / 4000 + 0.008) / 1.008 * math.pi / 2) / math.cos(0.008 / 1.008 * math.pi / 2)) ** 2
        sigma = math.sqrt(1 / abar - 1) / 2
        t_star = timestep_for_sigma(sched, sigma)
        assert t_star == pytest.approx(t_target, abs=1e-6)
        brute = [b for b in range(1, 40) if len(set(ts := reverse_timesteps(t_star, b))) == b and ts[-1] >= 1]
        assert max_steps(sched, sigma) == max(brute) and brute == list(range(1, max(brute) + 1))
        check_sampler(sched, sigma, max(brute), "densepure")
        _message(check_sampler, sched, sigma, max(brute) + 1, "densepure")
    assert max_steps(sched, _sigma_for(sched, 9.6)) == 10  # round(t*) > t*: one step more than floor(t*)


def _sigma_for(sched: NoiseSchedule, t: float) -> float:
    abar = (math.cos((t / sched.T + 0.008) / 1.008 * math.pi / 2) / math.cos(0.008 / 1.008 * math.pi / 2)) ** 2
    return math.sqrt(1 / abar - 1) / 2


def test_sigma_outside_the_schedule_is_refused_not_clamped() -> None:
    ratio = LINEAR.noise_ratio
    lo, hi = sigma_range(LINEAR, "densepure")
    assert lo == pytest.approx((ratio[0] + ratio[1]) / 4) and hi == pytest.approx(ratio[-1] / 2)
    # Below the smallest ratio the reference falls back to T - 1 (pure noise); above the largest it clamps.
    ref = RefDensePure("linear", 1000, "", True, "learned_range")
    assert ref.t_star(0.003) == 999 and ref.t_star(80.0) == 999
    small = _message(check_sampler, LINEAR, 0.003, 1, "densepure")
    assert "sigma 0.003" in small and "smallest noise ratio" in small and "sigma > 0.006208" in small
    large = _message(check_sampler, LINEAR, 80.0, 10, "densepure")
    assert "sigma 80" in large and "largest noise ratio" in large and "sigma <= 78.7" in large
    for rule in ("densepure", "carlini"):
        _message(timestep_for_sigma, LINEAR, 80.0, rule)
        _message(timestep_for_sigma, LINEAR, 0.003, rule)
    dds = _message(check_sampler, LINEAR, 80.0, 1, "dds")
    assert "for dds" in dds and "<= sigma <= 78.7" in dds
    # Just inside the limits works; t* = 0 (no step possible) is refused with the sigma that works.
    check_sampler(LINEAR, hi, 10, "densepure")
    check_sampler(LINEAR, lo * (1 + 1e-9), 1, "densepure")
    zero = _message(check_sampler, LINEAR, lo * (1 - 1e-9), 1, "densepure")
    assert "t* = 0" in zero and "no DensePure step" in zero
    # Cohen has nothing to match; DDS ignores steps.
    check_sampler(LINEAR, 80.0, 10**6, "cohen")
    check_sampler(LINEAR, 0.25, 10**6, "dds")


def test_steps_beyond_the_chain_and_bad_arguments() -> None:
    msg = _message(check_sampler, LINEAR, 0.5, 1001, "densepure")
    assert "--steps 1001 exceeds the 1000 timesteps" in msg
    spaced = openai_schedule("linear", 1000, "ddim50")
    msg = _message(check_sampler, spaced, 0.5, 51, "densepure")
    assert "50 of 1000 timesteps" in msg and "'ddim50'" in msg
    assert "--steps must be >= 1" in _message(check_sampler, LINEAR, 0.5, 0, "densepure")
    assert "sigma must be > 0" in _message(check_sampler, LINEAR, 0.0, 1, "dds")
    assert "unknown method" in _message(check_sampler, LINEAR, 0.5, 1, "ddpm")


def test_cosine_densepure_refuses_a_respaced_chain() -> None:
    sched = schedule_from_flags({"noise_schedule": "cosine", "diffusion_steps": 4000, "timestep_respacing": "1000"})
    msg = _message(check_sampler, sched, 0.25, 10, "densepure")
    assert "1000 of 4000 timesteps" in msg and "timestep_respacing '' or '4000'" in msg
    check_sampler(sched, 0.25, 10, "dds")  # Carlini's rule on the spaced discrete chain is coherent
    same = schedule_from_flags({"noise_schedule": "cosine", "diffusion_steps": 4000, "timestep_respacing": "4000"})
    check_sampler(same, 0.25, 10, "densepure")


def test_purifier_refuses_before_any_draw() -> None:
    den = Denoiser.from_openai(random_unet(), diffusion_settings(flags_for("linear", 1000, "ddim50", True)))
    with pytest.raises(ValueError, match="at most 13 steps"):
        Purifier(PurifySpec("densepure", 0.5, steps=14, votes=2), den)
    with pytest.raises(ValueError, match="largest noise ratio"):
        Purifier(PurifySpec("dds", 100.0), den)


def test_schedule_from_flags_refuses_bad_respacing() -> None:
    with pytest.raises(ValueError, match="timestep_respacing '2000'"):
        schedule_from_flags({"timestep_respacing": "2000"})
    assert schedule_from_flags({"timestep_respacing": 250}).T == 250  # ints as flag files write them
