"""The denoiser: a noise-prediction network together with the diffusion settings it was trained with.

The sampler (``workers/schedule.py``, ``workers/purify.py``) speaks in timesteps of the model's
training chain; ``Denoiser.forward`` turns them into what the network was trained on (OpenAI's
``rescale_timesteps``) so that no caller needs to know.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from workers.schedule import NoiseSchedule

__all__ = ["Denoiser", "DiffusersEps"]


class Denoiser(nn.Module):
    """A noise-prediction network with the diffusion settings it was trained with.

    Attributes: ``schedule`` (the training chain, betas of length T), ``learn_sigma`` (the output
    has 2C channels: eps and the variance interpolation v in [-1, 1]), ``sigma_small`` (for fixed
    variance: True = posterior variance, False = betas, "fixed large"), ``rescale_timesteps`` (the
    network is fed t * 1000 / T), ``in_channels``, ``image_size``.

    ``net`` is called as ``net(x, t) -> Tensor``; diffusers UNets are adapted to that by
    ``_DiffusersEps``.
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

    def forward(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """x in model scale [-1,1]-ish (N,C,H,W); t: (N,) real timesteps of the training chain.

        Returns (eps, v) with v None unless ``learn_sigma``. The timestep rescaling of the
        training code is applied here, so callers always speak in training-chain timesteps.
        """
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if self.rescale_timesteps:
            # As OpenAI's _WrappedModel: float, so that real (non-integer) t* survive the scaling.
            t = t.float() * (1000.0 / self.schedule.T)
        out = self.net(x, t)
        if not self.learn_sigma:
            return out, None
        eps, v = torch.split(out, x.shape[1], dim=1)
        return eps, v

    @classmethod
    def from_openai(cls, net: nn.Module, settings: Any) -> "Denoiser":
        """Wrap an OpenAI ``UNetModel`` with the diffusion settings of its flags
        (``workers.unet.diffusion_settings``)."""
        return cls(
            net,
            NoiseSchedule.from_name(settings.noise_schedule, settings.diffusion_steps),
            learn_sigma=settings.learn_sigma,
            sigma_small=settings.sigma_small,
            rescale_timesteps=settings.rescale_timesteps,
            in_channels=net.in_channels,
            image_size=net.image_size,
        )

    def with_net(self, net: nn.Module) -> "Denoiser":
        """The same denoiser around another network (e.g. a compiled one sharing the weights)."""
        return Denoiser(
            net, self.schedule, learn_sigma=self.learn_sigma, sigma_small=self.sigma_small,
            rescale_timesteps=self.rescale_timesteps, in_channels=self.in_channels, image_size=self.image_size,
        )

    def extra_repr(self) -> str:
        return (
            f"schedule={self.schedule.name}(T={self.schedule.T}), learn_sigma={self.learn_sigma}, "
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
