"""From a noisy draw to purified copies: Cohen (none), DDS (one shot) and DensePure (K votes of b steps).

A ``Purifier`` holds the sampler of one ``PurifySpec`` (t*, the respaced chain) and does the
per-row arithmetic; the network is a function it is handed (``Net``: rows at one timestep ->
(eps, v)), so the engine decides how rows are batched. Every random number comes from a stream
the caller passes in (``workers/noise.py``), in a fixed order: the draw's smoothing noise delta,
then, for DensePure vote j, one tensor per noise-adding reverse step from vote j's own stream. A
row's result therefore depends only on its seeds, never on which batch, wave, worker or retry
computed it. The smoothing noise does not depend on the method, so the three methods see the
same noisy inputs (common random numbers).

DensePure's K votes of one draw all start from the same x_t*, so the network output of the
first step is computed once per draw and shared (1 + K (b - 1) evaluations instead of K b, with
identical results); each vote then adds its own noise from step 1 on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

import numpy as np

from workers.contract import METHODS, copies, unet_forwards_per_draw
from workers.noise import Streams
from workers.schedule import DensePureScheduler, check_sampler, one_shot_denoise, start_scale, timestep_for_sigma
from workers.seeds import vote_seeds

if TYPE_CHECKING:
    from workers.denoiser import Denoiser

Net = Callable[[torch.Tensor, int], tuple[torch.Tensor, "torch.Tensor | None"]]
"""Network evaluation of any number of rows at one timestep (an index of the denoiser's chain)."""


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
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.steps < 1 or self.votes < 1:
            raise ValueError("steps and votes must be >= 1")

    @property
    def copies(self) -> int:
        """Purified copies per draw: K for DensePure, 1 otherwise."""
        return copies(self.method, self.votes)

    def unet_forwards_per_draw(self) -> int:
        """Network evaluations per draw when every vote is computed (1 + K (b - 1) for DensePure)."""
        return unet_forwards_per_draw(self.method, self.steps, self.votes)

    def describe(self) -> str:
        """e.g. ``densepure sigma=0.25 steps=2 votes=4``, for messages."""
        extra = f" steps={self.steps} votes={self.votes}" if self.method == "densepure" else ""
        return f"{self.method} sigma={self.sigma:g}{extra}"


class Purifier:
    """The sampler of one spec: t*, the DensePure scheduler, and the steps applied to rows."""

    def __init__(self, spec: PurifySpec, denoiser: "Denoiser | None" = None):
        if spec.method != "cohen" and denoiser is None:
            raise ValueError(f"method {spec.method!r} needs a denoiser")
        self.spec = spec
        self.denoiser = denoiser
        self.t_star: float | None = None
        self.scheduler: DensePureScheduler | None = None
        if denoiser is not None and spec.method != "cohen":
            # Refuse, with a message that says what works, settings that would give NaN images,
            # a pure-noise start or a clamped one.
            check_sampler(denoiser.schedule, spec.sigma, spec.steps, spec.method)
        if denoiser is not None and spec.method == "dds":
            self.t_star = timestep_for_sigma(denoiser.schedule, spec.sigma, "carlini")
        elif denoiser is not None and spec.method == "densepure":
            self.t_star = timestep_for_sigma(denoiser.schedule, spec.sigma, "densepure")
            variance = "learned_range" if denoiser.learn_sigma else ("fixed_small" if denoiser.sigma_small else "fixed_large")
            self.scheduler = DensePureScheduler(denoiser.schedule, self.t_star, spec.steps, variance)

    def noisy(self, x01: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x + sigma delta, in [0, 1] image scale (unclipped: Cohen classifies it as it is)."""
        return x01 + self.spec.sigma * delta

    def start(self, noisy: torch.Tensor) -> torch.Tensor:
        """x_t*: the noisy image in model scale, 2 (x + delta) - 1, scaled onto the chain at t*."""
        return start_scale(self.spec.sigma) * (2.0 * noisy - 1.0)

    def one_shot(self, x_t: torch.Tensor, net: Net) -> torch.Tensor:
        """DDS: Carlini et al.'s one-shot denoised x0 in [-1, 1]."""
        assert self.denoiser is not None and self.t_star is not None
        t = int(self.t_star)
        eps, _ = net(x_t, t)
        return one_shot_denoise(self.denoiser.schedule, t, x_t, eps)

    @property
    def reverse_steps(self) -> int:
        return len(self.scheduler) if self.scheduler is not None else 0

    def first_eval(self, x_t: torch.Tensor, net: Net) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network at tau_0 on the draws' x_t*: shared by all of a draw's votes."""
        assert self.scheduler is not None
        return net(x_t, self.scheduler.timesteps[0])

    def vote(self, x_t: torch.Tensor, eps0: torch.Tensor, v0: torch.Tensor | None, net: Net,
             noise: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One vote's whole reverse process for rows (one per (draw, vote)), from the shared first
        evaluation; returns x0 in [-1, 1]. ``noise()`` gives the next standard-normal tensor of each
        row's vote stream, called once per noise-adding step, in step order."""
        assert self.scheduler is not None
        last = len(self.scheduler) - 1
        sample, eps, v = x_t, eps0, v0
        for i in range(len(self.scheduler)):
            if i > 0:
                eps, v = net(sample, self.scheduler.timesteps[i])
            sample, _ = self.scheduler.step(eps, i, sample, noise() if i < last else None, v)
        return sample

    def __call__(self, x01: torch.Tensor, seeds: np.ndarray | list[int]) -> torch.Tensor:
        """Purified copies of rows ``x01`` (B, C, H, W) in [0, 1], one draw per seed, every vote,
        in the dtype of ``x01`` with the denoiser on all rows at once: (B, copies, C, H, W) in [0, 1]
        (for Cohen the noisy images). The reference-style path, for tests and benchmarks; the
        engine runs the same steps in fixed-size batches."""
        seeds = np.asarray(seeds, dtype=np.uint64)
        if x01.shape[0] != len(seeds):
            raise ValueError("one seed per image is required")
        shape, dtype = tuple(x01.shape[1:]), x01.dtype
        noisy = self.noisy(x01, Streams(seeds, x01.device).normal(shape, dtype))
        if self.spec.method == "cohen":
            return noisy.unsqueeze(1)
        x_t = self.start(noisy)
        if self.spec.method == "dds":
            return ((self.one_shot(x_t, self._direct_net) + 1.0) / 2.0).unsqueeze(1)
        B, K = x_t.shape[0], self.spec.votes
        eps0, v0 = self.first_eval(x_t, self._direct_net)
        d = np.repeat(np.arange(B), K)
        j = np.tile(np.arange(K), B)
        streams = Streams(vote_seeds(seeds[d], j), x01.device)
        x0 = self.vote(x_t[d], eps0[d], v0[d] if v0 is not None else None, self._direct_net,
                       lambda: streams.normal(shape, dtype))
        return ((x0 + 1.0) / 2.0).reshape(B, K, *shape)

    def _direct_net(self, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self.denoiser is not None
        eps, v = self.denoiser(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        # The UNet may run in reduced precision; the sampler's arithmetic stays in the sample's dtype.
        return eps.to(x.dtype), (v.to(x.dtype) if v is not None else None)
