"""Noise schedules, the choice of the starting timestep t*, and the DensePure respaced scheduler.

Modelled on diffusers: the network predicts, a scheduler object holds the schedule and steps.
Nothing here draws random numbers: the caller passes the noise for a step explicitly, drawn from
its own ``torch.Generator``. All schedule arithmetic is float64 numpy, as in OpenAI's code, and
only scalars cross into torch (every sample of a batch shares one timestep).

See ``shared/reference/ALGORITHM.md`` sections 2 and 3 for the maths and the reference quirks that
are reproduced here on purpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

TimestepRule = Literal["densepure", "carlini"]
VarianceType = Literal["learned_range", "fixed_large", "fixed_small"]

# Cosine schedule offset of Nichol & Dhariwal (improved-diffusion), used by the closed form for t*.
COSINE_S = 0.008


@dataclass(frozen=True)
class NoiseSchedule:
    """The training chain of a diffusion model: ``betas[t]`` for t = 0..T-1 (float64)."""

    name: str
    betas: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 1 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must be a 1-D array of values in (0, 1)")
        object.__setattr__(self, "betas", betas)

    @classmethod
    def from_name(cls, name: str, T: int) -> "NoiseSchedule":
        """OpenAI's named schedules for any number of steps T.

        ``linear``: betas from 1e-4 to 0.02 scaled by 1000 / T (so that any T spans the same
        noise range); ``cosine``: abar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), betas capped at 0.999.
        """
        if T < 1:
            raise ValueError(f"diffusion_steps must be >= 1, got {T}")
        if name == "linear":
            scale = 1000.0 / T
            return cls("linear", np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64))
        if name == "cosine":
            def abar(u: float) -> float:
                return math.cos((u + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2

            betas = [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)]
            return cls("cosine", np.array(betas, dtype=np.float64))
        raise ValueError(f"unknown noise schedule {name!r}: use 'linear' or 'cosine'")

    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    @property
    def noise_ratio(self) -> np.ndarray:
        """sqrt((1 - abar_t) / abar_t): the noise std of x_t / sqrt(abar_t), per t."""
        abar = self.alphas_cumprod
        return np.sqrt((1.0 - abar) / abar)


def start_scale(sigma: float) -> float:
    """sqrt(a), a = 1 / (1 + 4 sigma^2): scales x' = 2(x + delta) - 1 onto the chain at t*.

    x' carries noise of std 2 sigma; sqrt(a) x' then has signal weight sqrt(abar) and noise std
    sqrt(1 - abar) for abar = a, i.e. it is exactly a sample of q(x_t | x) at the continuous t*.
    """
    return 1.0 / math.sqrt(1.0 + 4.0 * sigma * sigma)


def timestep_for_sigma(schedule: NoiseSchedule, sigma: float, rule: TimestepRule = "densepure") -> float:
    """The timestep t* whose noise level matches smoothing noise sigma (std 2 sigma in model scale).

    ``densepure``: for the cosine schedule the closed form of the continuous schedule (a real
    number); otherwise the nearer of the two integers whose ratios bracket 2 sigma, and T - 1
    when the schedule never reaches 2 sigma (the reference code's fallback).
    ``carlini``: the first integer t whose ratio is >= 2 sigma (T - 1 if none).
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    target = 2.0 * sigma
    ratio = schedule.noise_ratio
    T = schedule.T
    if rule == "carlini":
        above = np.nonzero(ratio >= target)[0]
        return float(above[0]) if len(above) else float(T - 1)
    if rule != "densepure":
        raise ValueError(f"unknown timestep rule {rule!r}: use 'densepure' or 'carlini'")
    if schedule.name == "cosine":
        c = 1.0 + COSINE_S
        return T * (1 - (2 * c / math.pi) * math.asin(math.sin(math.pi / (2 * c)) / math.sqrt(1 + target**2)))
    for t in range(T - 1):
        if ratio[t] < target <= ratio[t + 1]:
            return float(t + 1 if target - ratio[t] > ratio[t + 1] - target else t)
    return float(T - 1)


def reverse_timesteps(t_star: float, steps: int) -> list[int]:
    """DensePure's b descending real timesteps tau_i = round(t* - i t*/b), i = 0..b-1.

    Python's round (half to even) is the reference's rounding, kept on purpose.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    inter = t_star / steps
    return [round(t_star - i * inter) for i in range(steps)]


class DensePureScheduler:
    """The b-step respaced ancestral sampler of DensePure, for one (schedule, t*, b).

    The chain is the ascending list [0, tau_{b-1}, ..., tau_0]; entry j (j = 0..b-1) steps from
    list[j] to list[j+1] with beta'_j = min(1 - abar[list[j+1]] / abar[list[j]], 0.999). Note that
    beta'_0 is taken relative to abar_0, not 1: a quirk of the reference kept on purpose (it makes
    b = 1 the one-shot denoiser up to abar_0). Evaluation order is i = 0..b-1 at real timestep
    tau_i, which is chain index j = b-1-i; the last step (j = 0) adds no noise.
    """

    def __init__(self, schedule: NoiseSchedule, t_star: float, steps: int, variance: VarianceType):
        self.schedule = schedule
        self.t_star = float(t_star)
        self.timesteps = reverse_timesteps(t_star, steps)
        self.variance = variance
        abar_full = schedule.alphas_cumprod
        chain = [0] + self.timesteps[::-1]
        betas = np.array(
            [min(1 - abar_full[chain[j + 1]] / abar_full[chain[j]], 0.999) for j in range(steps)],
            dtype=np.float64,
        )
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # The posterior variance is 0 at j = 0; OpenAI replaces it by the next entry before the log.
        post_var_for_log = np.append(post_var[1], post_var[1:]) if steps > 1 else post_var.copy()
        with np.errstate(divide="ignore"):
            self._post_log_var_clipped = np.log(post_var_for_log)
        self._log_betas = np.log(betas)
        if variance == "fixed_large":
            fixed = np.append(post_var[1], betas[1:]) if steps > 1 else betas.copy()
            with np.errstate(divide="ignore"):
                self._fixed_log_var = np.log(fixed)
        elif variance == "fixed_small":
            self._fixed_log_var = self._post_log_var_clipped
        elif variance != "learned_range":
            raise ValueError(f"unknown variance type {variance!r}")
        self._sqrt_recip_abar = np.sqrt(1.0 / abar)
        self._sqrt_recipm1_abar = np.sqrt(1.0 / abar - 1.0)
        self._coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
        self._coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(
        self,
        eps: torch.Tensor,
        i: int,
        sample: torch.Tensor,
        noise: torch.Tensor | None,
        var_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step at evaluation index i (real timestep ``self.timesteps[i]``).

        Returns (previous sample, clipped predicted x0). ``noise`` (standard normal, shape of
        ``sample``) is required except at the last step, where none is added. ``var_values`` is
        the network's v in [-1, 1] for learned-range variance.
        """
        j = len(self.timesteps) - 1 - i
        pred_x0 = (self._sqrt_recip_abar[j] * sample - self._sqrt_recipm1_abar[j] * eps).clamp(-1.0, 1.0)
        mean = self._coef1[j] * pred_x0 + self._coef2[j] * sample
        if j == 0:
            return mean, pred_x0
        if noise is None:
            raise ValueError("noise is required before the last step")
        if self.variance == "learned_range":
            if var_values is None:
                raise ValueError("learned-range variance needs the network's variance output")
            frac = (var_values.float() + 1.0) / 2.0
            log_var = frac * self._log_betas[j] + (1.0 - frac) * self._post_log_var_clipped[j]
            std = torch.exp(0.5 * log_var).to(sample.dtype)
        else:
            std = math.exp(0.5 * self._fixed_log_var[j])
        return mean + std * noise, pred_x0


def one_shot_denoise(schedule: NoiseSchedule, t: int, sample: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Carlini et al.'s one-shot denoiser: x0 = clip((x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), -1, 1)."""
    abar = float(schedule.alphas_cumprod[int(t)])
    return ((sample - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)).clamp(-1.0, 1.0)
