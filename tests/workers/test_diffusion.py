"""The reverse process: schedules, t*, the respaced DensePure chain, batching and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workers.engine import Engine, majority_votes
from workers.denoiser import Denoiser
from workers.purify import Purifier, PurifySpec
from workers.schedule import (
    DensePureScheduler,
    NoiseSchedule,
    one_shot_denoise,
    reverse_timesteps,
    start_scale,
    timestep_for_sigma,
)
from tests.fixtures.models import ToyClassifier, replay_noise, tiny_denoiser

def test_linear_and_cosine_schedules_match_openai_definitions():
    lin = NoiseSchedule.from_name("linear", 1000)
    assert lin.betas[0] == pytest.approx(1e-4) and lin.betas[-1] == pytest.approx(0.02)
    lin4000 = NoiseSchedule.from_name("linear", 4000)
    assert lin4000.betas[-1] == pytest.approx(0.005)
    cos = NoiseSchedule.from_name("cosine", 4000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cos.alphas_cumprod[99] == pytest.approx(f(100 / 4000) / f(0), rel=1e-9)
    assert cos.betas.max() <= 0.999
    with pytest.raises(ValueError):
        NoiseSchedule.from_name("quadratic", 10)


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_timestep_rules(sigma):
    sched = NoiseSchedule.from_name("linear", 1000)
    ratio = sched.noise_ratio
    t_dp = int(timestep_for_sigma(sched, sigma, "densepure"))
    t_c = int(timestep_for_sigma(sched, sigma, "carlini"))
    # Carlini: first t with ratio >= 2 sigma.
    assert ratio[t_c] >= 2 * sigma and ratio[t_c - 1] < 2 * sigma
    # DensePure: the nearer of the two bracketing integers.
    assert t_dp in (t_c - 1, t_c)
    assert abs(ratio[t_dp] - 2 * sigma) <= abs(ratio[t_c if t_dp == t_c - 1 else t_c - 1] - 2 * sigma)


def test_cosine_closed_form_matches_the_discrete_schedule():
    sched = NoiseSchedule.from_name("cosine", 4000)
    for sigma in (0.25, 0.5, 1.0):
        t_real = timestep_for_sigma(sched, sigma, "densepure")
        t_disc = timestep_for_sigma(sched, sigma, "carlini")
        assert abs(t_real - t_disc) < 1.5
        # abar at the continuous t* is exactly a = 1 / (1 + 4 sigma^2).
        c = 1.008
        abar = math.cos((t_real / 4000 + 0.008) / c * math.pi / 2) ** 2 / math.cos(0.008 / c * math.pi / 2) ** 2
        assert abar == pytest.approx(start_scale(sigma) ** 2, rel=1e-9)


def test_reverse_timesteps_follow_the_reference_rounding():
    assert reverse_timesteps(396.0, 10) == [396, 356, 317, 277, 238, 198, 158, 119, 79, 40]
    assert reverse_timesteps(100.0, 1) == [100]


def _reference_chain(abar_full: np.ndarray, taus: list[int]):
    """An independent transcription of ALGORITHM.md section 3 for one step of the chain."""
    chain = [0] + taus[::-1]
    betas = np.array([min(1 - abar_full[chain[j + 1]] / abar_full[chain[j]], 0.999) for j in range(len(taus))])
    abar = np.cumprod(1 - betas)
    return betas, abar


@pytest.mark.parametrize("variance", ["learned_range", "fixed_large"])
def test_scheduler_step_is_the_ddpm_posterior_of_the_respaced_chain(variance):
    sched = NoiseSchedule.from_name("linear", 1000)
    s = DensePureScheduler(sched, 120.4, 3, variance)
    betas, abar = _reference_chain(sched.alphas_cumprod, s.timesteps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    v = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    i, j = 0, 2  # first evaluation = top of the chain
    out, x0 = s.step(eps, i, x, noise, v)
    x0_ref = ((x - math.sqrt(1 - abar[j]) * eps) / math.sqrt(abar[j])).clamp(-1, 1)
    mean = (betas[j] * math.sqrt(abar[j - 1]) / (1 - abar[j])) * x0_ref + ((1 - abar[j - 1]) * math.sqrt(1 - betas[j]) / (1 - abar[j])) * x
    post_var = betas * (1 - np.append(1.0, abar[:-1])) / (1 - abar)
    if variance == "learned_range":
        log_var = (v + 1) / 2 * math.log(betas[j]) + (1 - (v + 1) / 2) * math.log(post_var[j])
    else:
        log_var = torch.full_like(x, math.log(betas[j]))
    torch.testing.assert_close(x0, x0_ref)
    torch.testing.assert_close(out, mean + torch.exp(0.5 * log_var) * noise)
    # The last step adds no noise and returns the predicted x0.
    last, x0_last = s.step(eps, 2, x, None, v)
    torch.testing.assert_close(last, x0_last)


def test_one_step_densepure_is_the_one_shot_denoiser_up_to_abar0():
    sched = NoiseSchedule.from_name("linear", 1000)
    s = DensePureScheduler(sched, 200.0, 1, "learned_range")
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out, _ = s.step(eps, 0, x, None, torch.zeros_like(x))
    abar = sched.alphas_cumprod[200] / sched.alphas_cumprod[0]
    torch.testing.assert_close(out, ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1))
    close = one_shot_denoise(sched, 200, x, eps)
    assert (out - close).abs().max() < 1e-3


def test_shared_first_step_equals_k_separate_runs():
    """The K votes computed together equal K runs of the reference loop with the same noise."""
    den = tiny_denoiser(learn_sigma=True)
    spec = PurifySpec("densepure", 0.25, steps=3, votes=4)
    x01 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    seeds = [11, 12]
    with torch.inference_mode():
        together = Purifier(spec, den)(x01, seeds)
        # The reference loop: one vote at a time, every step evaluated, noise replayed from the same streams.
        sched = Purifier(spec, den).scheduler
        delta, step_noise = replay_noise(seeds, (1, 8, 8), votes=4, noisy_steps=2)
        x_t = start_scale(0.25) * (2 * (x01 + 0.25 * delta) - 1)
        for k in range(4):
            x = x_t.clone()
            for i, t in enumerate(sched.timesteps):
                eps, v = den(x, torch.full((2,), t))
                x, _ = sched.step(eps, i, x, step_noise[i][:, k] if i < 2 else None, v)
            torch.testing.assert_close(together[:, k], (x + 1) / 2, rtol=1e-5, atol=1e-5)


def test_draws_do_not_depend_on_batching_and_global_rng_is_untouched():
    den = tiny_denoiser(learn_sigma=True)
    spec = PurifySpec("densepure", 0.5, steps=2, votes=3)
    image = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(4))
    seeds = list(range(100, 107))
    state = torch.random.get_rng_state()
    # fp32: the claim is about the maths of the batching, not about bf16 kernels' rounding.
    big = Engine(ToyClassifier(), den, batch_size=64, precision="fp32").purify(image, spec, seeds)
    small = Engine(ToyClassifier(), den, batch_size=6, precision="fp32").purify(image, spec, seeds)  # 2 draws per batch
    alone = Engine(ToyClassifier(), den, batch_size=64, precision="fp32").purify(image, spec, seeds[3:4])
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(big, small, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(big[3:4], alone, rtol=1e-5, atol=1e-5)


def test_methods_share_smoothing_noise_and_cohen_is_unclipped():
    den = tiny_denoiser(learn_sigma=False)
    image = torch.full((1, 8, 8), 0.5)
    eng = Engine(ToyClassifier(), den)
    cohen = eng.purify(image, PurifySpec("cohen", 1.0), [7])
    assert cohen.shape == (1, 1, 1, 8, 8) and (cohen < 0).any()
    dds = eng.purify(image, PurifySpec("dds", 1.0), [7])
    assert dds.min() >= 0 and dds.max() <= 1
    dp = eng.purify(image, PurifySpec("densepure", 1.0, steps=2, votes=2), [7])
    assert dp.shape == (1, 2, 1, 8, 8) and dp.min() >= 0 and dp.max() <= 1


def test_majority_vote_prefixes_and_tie_break_by_first_seen():
    labels = torch.tensor([[2, 1, 1, 2, 0], [0, 1, 2, 2, 1], [1, 1, 1, 1, 1]])
    out = majority_votes(labels, [1, 2, 4, 5], num_classes=3)
    # k=1: the first vote; k=2: a tie, won by the label seen first; k=4, row 0: 2 and 1 tie, 2 came
    # first; k=5, row 1: 1 and 2 tie with two votes each, 1 came first.
    assert out[0].tolist() == [2, 0, 1]
    assert out[1].tolist() == [2, 0, 1]
    assert out[2].tolist() == [2, 2, 1]
    assert out[3].tolist() == [2, 1, 1]


def test_engine_counts_sum_to_draws_and_report_forwards():
    den = tiny_denoiser(learn_sigma=True)
    eng = Engine(ToyClassifier(), den, batch_size=16)
    spec = PurifySpec("densepure", 0.25, steps=2, votes=3)
    res = eng.count(torch.rand(1, 8, 8), spec, list(range(10)), [1, 3])
    assert res.counts.shape == (2, 3) and (res.counts.sum(axis=1) == 10).all()
    # Early majority: a draw whose first 2 of 3 votes agree needs no third vote.
    assert res.classifier_calls == res.votes_computed and 20 <= res.votes_computed <= 30
    assert res.votes_computed + res.votes_skipped == 30
    assert res.unet_forwards == 10 + res.votes_computed * (2 - 1)
    full = Engine(ToyClassifier(), den, batch_size=16, early_majority=False).count(torch.rand(1, 8, 8), spec, list(range(10)), [1, 3])
    assert full.unet_forwards == 10 * (1 + 3 * 1) and full.classifier_calls == 30 and full.votes_skipped == 0
