"""From a clean image to smoothed, purified copies: Cohen (none), DDS (one shot) and DensePure.

Every random draw comes from the per-draw generators the caller passes in, in a fixed order:
first the smoothing noise delta (C,H,W), then, for DensePure, one (K,C,H,W) noise tensor per
reverse step that adds noise. A draw's result therefore depends only on its own seed, never on
which batch, worker or retry computed it. The smoothing noise of a draw does not depend on the
method, so the three methods see the same noisy inputs (common random numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from workers.contract import METHODS, copies, unet_forwards_per_draw
from workers.schedule import (
    DensePureScheduler,
    check_sampler,
    one_shot_denoise,
    start_scale,
    timestep_for_sigma,
)

if TYPE_CHECKING:
    from workers.denoiser import Denoiser


@dataclass(frozen=True)
class PurifySpec:
    """What to do with one noisy draw: method, smoothing sigma, reverse steps b and votes K."""

    method: str
    sigma: float
    steps: int = 1
    votes: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.steps < 1 or self.votes < 1:
            raise ValueError("steps and votes must be >= 1")

    @property
    def copies(self) -> int:
        """Purified copies per draw: K for DensePure, 1 otherwise."""
        return copies(self.method, self.votes)

    def unet_forwards_per_draw(self) -> int:
        """Network evaluations per draw: the K votes share the first step (1 + K (b - 1))."""
        return unet_forwards_per_draw(self.method, self.steps, self.votes)


def draw_generators(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per draw, seeded with the draw's own 63-bit seed."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _normal(gens: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Stack one standard-normal tensor of ``shape`` per generator (float32 draws, then cast)."""
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens]).to(dtype)


class Purifier:
    """Turns a batch of clean images into smoothed (and, for DDS/DensePure, purified) copies."""

    def __init__(self, spec: PurifySpec, denoiser: "Denoiser | None" = None):
        if spec.method != "cohen" and denoiser is None:
            raise ValueError(f"method {spec.method!r} needs a denoiser")
        self.spec = spec
        self.denoiser = denoiser
        self.t_star: float | None = None
        self.scheduler: DensePureScheduler | None = None
        if denoiser is not None and spec.method != "cohen":
            # Refuse, with a message that says what works, what would give NaN, pure-noise or clamped starts.
            check_sampler(denoiser.schedule, spec.sigma, spec.steps, spec.method)
        if denoiser is not None and spec.method == "dds":
            self.t_star = timestep_for_sigma(denoiser.schedule, spec.sigma, "carlini")
        elif denoiser is not None and spec.method == "densepure":
            self.t_star = timestep_for_sigma(denoiser.schedule, spec.sigma, "densepure")
            variance = "learned_range" if denoiser.learn_sigma else ("fixed_small" if denoiser.sigma_small else "fixed_large")
            self.scheduler = DensePureScheduler(denoiser.schedule, self.t_star, spec.steps, variance)

    def __call__(self, x01: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
        """x01: (B,C,H,W) clean images in [0,1], one generator per row.

        Returns (B, copies, C, H, W): for Cohen the noisy images x + delta (unclipped, as Cohen
        classifies them); for DDS and DensePure the purified images mapped back to [0,1].
        """
        if x01.shape[0] != len(gens):
            raise ValueError("one generator per image is required")
        noise = _normal(gens, tuple(x01.shape[1:]), x01.device, x01.dtype)
        noisy = x01 + self.spec.sigma * noise
        if self.spec.method == "cohen":
            return noisy.unsqueeze(1)
        x_t = start_scale(self.spec.sigma) * (2.0 * noisy - 1.0)
        if self.spec.method == "dds":
            x0 = self._one_shot(x_t)
            return ((x0 + 1.0) / 2.0).unsqueeze(1)
        return (self._reverse(x_t, gens) + 1.0) / 2.0

    def _net(self, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self.denoiser is not None
        timesteps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps, v = self.denoiser(x, timesteps)
        # The UNet may run in reduced precision; the sampler's arithmetic stays in the sample's dtype.
        return eps.to(x.dtype), (v.to(x.dtype) if v is not None else None)

    def _one_shot(self, x_t: torch.Tensor) -> torch.Tensor:
        assert self.denoiser is not None and self.t_star is not None
        t = int(self.t_star)
        eps, _ = self._net(x_t, t)
        return one_shot_denoise(self.denoiser.schedule, t, x_t, eps)

    def _reverse(self, x_t: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
        """K votes of the b-step reverse process for each row; returns (B, K, C, H, W) in [-1, 1]."""
        assert self.scheduler is not None
        B, K = x_t.shape[0], self.spec.votes
        shape = tuple(x_t.shape[1:])
        # All K votes start from the same x_t*, so the first network output is computed once per
        # draw and broadcast: 1 + K (b - 1) evaluations instead of K b, with identical results.
        eps, v = self._net(x_t, self.scheduler.timesteps[0])
        sample = x_t.unsqueeze(1).expand(B, K, *shape)
        eps = eps.unsqueeze(1).expand(B, K, *shape)
        v = v.unsqueeze(1).expand(B, K, *shape) if v is not None else None
        last = len(self.scheduler) - 1
        for i in range(len(self.scheduler)):
            if i > 0:
                flat = sample.reshape(B * K, *shape)
                eps, v = self._net(flat, self.scheduler.timesteps[i])
                eps = eps.reshape(B, K, *shape)
                v = v.reshape(B, K, *shape) if v is not None else None
            step_noise = _normal(gens, (K, *shape), x_t.device, x_t.dtype) if i < last else None
            sample, _ = self.scheduler.step(eps, i, sample, step_noise, v)
        return sample
