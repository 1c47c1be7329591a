"""The denoiser: a noise-prediction network together with the diffusion settings it was trained with.

The sampler (``workers/schedule.py``, ``workers/purify.py``) speaks in timesteps of the model's
training chain; ``Denoiser.forward`` turns them into what the network was trained on (OpenAI's
``rescale_timesteps``) so that no caller needs to know.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from workers.schedule import NoiseSchedule, openai_schedule

__all__ = ["Denoiser", "DiffusersEps"]


class Denoiser(nn.Module):
    """A noise-prediction network with the diffusion settings it was trained with.

    Attributes: ``schedule`` (the sampling chain, betas of length T; for OpenAI flags the
    ``SpacedDiffusion`` chain of ``timestep_respacing``, with its ``timestep_map``), ``learn_sigma``
    (the output has 2C channels: eps and the variance interpolation v in [-1, 1]), ``sigma_small``
    (for fixed variance: True = posterior variance, False = betas, "fixed large"),
    ``rescale_timesteps`` (the network is fed t * 1000 / original T), ``in_channels``, ``image_size``.

    ``net`` is called as ``net(x, t) -> Tensor``; diffusers UNets are adapted to that by
    ``DiffusersEps``.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        *,
        learn_sigma: bool,
        sigma_small: bool,
        rescale_timesteps: bool,
        in_channels: int,
        image_size: int,
    ):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.learn_sigma = bool(learn_sigma)
        self.sigma_small = bool(sigma_small)
        self.rescale_timesteps = bool(rescale_timesteps)
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        # Chain index -> original timestep of a respaced chain (None: the identity, nothing to map).
        # A non-persistent buffer, so that it follows .to(device) and never enters a state dict.
        tmap = schedule.timestep_map if schedule.is_respaced else None
        self.register_buffer(
            "timestep_map", None if tmap is None else torch.tensor(tmap, dtype=torch.long), persistent=False
        )

    def forward(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """x in model scale [-1,1]-ish (N,C,H,W); t: (N,) timesteps, indices of ``schedule``.

        Returns (eps, v) with v None unless ``learn_sigma``. As OpenAI's ``_WrappedModel``, a
        respaced chain's index is first mapped to its original timestep, then rescaled by
        1000 / original T when ``rescale_timesteps``; callers speak in chain indices only.
        """
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if self.timestep_map is not None:
            if t.is_floating_point():
                # The reference indexes the map with t, so only integer indices have a meaning.
                if not torch.equal(t, t.round()):
                    raise ValueError("a respaced chain's timesteps are integer indices; got fractional ones")
                t = t.long()
            tmap = self.timestep_map if self.timestep_map.device == t.device else self.timestep_map.to(t.device)
            t = tmap[t]
        if self.rescale_timesteps:
            # As OpenAI's _WrappedModel: float, so that real (non-integer) t survive the scaling.
            t = t.float() * (1000.0 / self.schedule.original_T)
        out = self.net(x, t)
        if not self.learn_sigma:
            return out, None
        eps, v = torch.split(out, x.shape[1], dim=1)
        return eps, v

    @classmethod
    def from_openai(cls, net: nn.Module, settings: Any, schedule: NoiseSchedule | None = None) -> "Denoiser":
        """Wrap an OpenAI ``UNetModel`` with the diffusion settings of its flags
        (``workers.unet_flags.diffusion_settings``); ``schedule`` defaults to their
        ``openai_schedule`` (the respaced chain, as ``create_gaussian_diffusion`` builds it)."""
        if schedule is None:
            schedule = openai_schedule(settings.noise_schedule, settings.diffusion_steps, settings.timestep_respacing)
        return cls(
            net,
            schedule,
            learn_sigma=settings.learn_sigma,
            sigma_small=settings.sigma_small,
            rescale_timesteps=settings.rescale_timesteps,
            in_channels=net.in_channels,
            image_size=net.image_size,
        )

    def with_net(self, net: nn.Module) -> "Denoiser":
        """The same denoiser around another network (e.g. a compiled one sharing the weights)."""
        out = Denoiser(
            net, self.schedule, learn_sigma=self.learn_sigma, sigma_small=self.sigma_small,
            rescale_timesteps=self.rescale_timesteps, in_channels=self.in_channels, image_size=self.image_size,
        )
        out.timestep_map = self.timestep_map  # on this denoiser's device already
        return out

    def extra_repr(self) -> str:
        return (
            f"schedule={self.schedule.describe()}, learn_sigma={self.learn_sigma}, "
            f"sigma_small={self.sigma_small}, rescale_timesteps={self.rescale_timesteps}, "
            f"in_channels={self.in_channels}, image_size={self.image_size}"
        )


class DiffusersEps(nn.Module):
    """Adapts a diffusers ``UNet2DModel`` to the ``net(x, t) -> Tensor`` call of ``Denoiser``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t, return_dict=False)[0]
