"""A faithful re-implementation of the DensePure reference code's certification loop, for timing.

The reference (github.com/Jayfeather1024/DensePure) certifies with K separate runs of
``eval_certified_densepure.py``, one per vote (``--reverse_seed k``), and merges their saved
per-draw labels afterwards (``results/merge_results.py``). Inside one run:

``core.Smooth._sample_noise``
    for each batch of ``--certified_batch`` draws (100 for CIFAR-10, 16 for ImageNet):
    ``batch = x.repeat(n, 1, 1, 1)``; ``noise = torch.randn_like(batch) * sigma`` from the global
    RNG, seeded with ``--seed 0`` in every vote run, so all K runs see the same smoothing noise;
    then ``DensePure_Certify.forward(batch + noise)`` and ``argmax(1)``.
``DensePure_Certify.forward``
    ``runner.image_editing_sample((x - 0.5) * 2)``, then the classifier on ``(x_re + 1) / 2``.
``image_editing_sample`` (runners/diffpure_{ddpm,guided}_densepure.py, ``--use_t_steps``)
    ``x0 = scale * img``; ``indices_t_steps = [round(t - i * t / b) for i in range(b)]``; a
    Python loop over the b steps, building ``t = tensor([b - i - 1] * N)`` and
    ``real_t = tensor([tau_i] * N)`` and calling ``diffusion.p_sample`` for *every* step: no
    sharing between votes (each vote is its own process), so K * b UNet forwards per draw.
``GaussianDiffusion.p_sample`` (DensePure's modified improved/guided_diffusion)
    at the first step of each call sequence the respaced chain's numpy arrays are recomputed;
    ``p_mean_variance``: ``model(x, real_t * 1000 / T)``, ``split`` into eps and v, learned-range
    log variance, x0 prediction clipped to [-1, 1], posterior mean, every coefficient fetched with
    ``_extract_into_tensor`` (numpy -> torch -> device -> gather -> broadcast); then
    ``noise = randn_like(x)`` (drawn at the last step too) and
    ``sample = mean + (t != 0) * exp(0.5 * log_var) * noise``.

Precision: DensePure's ImageNet config sets ``use_fp16: True``, so guided-diffusion's
``convert_to_fp16`` turns the torso's convolution weights to fp16 (time embedding, norms and the
output head stay fp32); the CIFAR-10 improved-diffusion model runs in fp32. ``Fp16TorsoUNet``
reproduces that on GPU; on CPU everything is fp32.

Deliberate differences, none of which changes the amount or kind of work: explicit
``torch.Generator`` objects instead of the global RNG and its get/set_rng_state juggling; the
respaced chain's betas come from ``workers.schedule.densepure_chain_betas`` (the reference's own
rule: discrete abar, or the continuous cosine f at the rounded tau) instead of being recomputed
inline, so that this loop computes exactly the engine's function (tests/test_bench_reference.py
checks that); the K vote "processes" run one after the
other in this process with the models loaded once (the reference would load them K times: not
counted, in its favour); the merge runs in-process instead of from saved files.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from workers.classifier import Classifier
from workers.denoiser import Denoiser
from workers.schedule import densepure_chain_betas, reverse_timesteps, start_scale, timestep_for_sigma
from workers.unet import UNetModel, timestep_embedding


def _extract_into_tensor(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape: tuple[int, ...]) -> torch.Tensor:
    """The reference's coefficient lookup, verbatim in behaviour: a fresh tensor from numpy every call."""
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


class Fp16TorsoUNet(nn.Module):
    """guided-diffusion's ``use_fp16`` UNet: fp16 convolutions in the input, middle and output
    blocks (``convert_module_to_f16`` converts Conv1d/2d/3d only), fp32 time embedding, norms
    (GroupNorm32 computes in fp32) and output head; ``h = x.type(fp16)`` in, ``h.type(x.dtype)`` out.

    Works on a deep copy, so the fp32 network the engine uses is left alone.
    """

    def __init__(self, net: UNetModel):
        super().__init__()
        self.net = copy.deepcopy(net)
        for blocks in (self.net.input_blocks, self.net.middle_block, self.net.output_blocks):
            for module in blocks.modules():
                if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    module.weight.data = module.weight.data.half()
                    if module.bias is not None:
                        module.bias.data = module.bias.data.half()

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:  # noqa: D102
        net = self.net
        emb = net.time_embed(timestep_embedding(timesteps, net.model_channels))
        h = x.half()
        skips = []
        for module in net.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = net.middle_block(h, emb)
        for module in net.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return net.out(h.type(x.dtype))


class ReferenceLoop:
    """K vote runs of the reference's certification loop over ``draws`` noisy copies of one image."""

    def __init__(
        self,
        classifier: Classifier,
        denoiser: Denoiser,
        device: torch.device | str,
        sigma: float,
        steps: int,
        votes: int,
        batch: int,
        fp16_torso: bool = False,
    ):
        self.device = torch.device(device)
        self.classifier = copy.deepcopy(classifier).to(self.device).eval()
        self.denoiser = denoiser.to(self.device).eval()
        self.sigma = sigma
        self.steps = steps
        self.votes = votes
        self.batch = batch
        self.num_classes = int(classifier.num_classes)
        if fp16_torso and self.device.type != "cuda":
            raise ValueError("the fp16 UNet of the reference is a GPU configuration")
        # A private copy of the network: the engine converts its modules in place (channels_last,
        # torch.compile), and the reference ran plain NCHW eager modules.
        self.model: nn.Module = (Fp16TorsoUNet(denoiser.net) if fp16_torso else copy.deepcopy(denoiser.net)).to(self.device).eval()
        self.precision = "fp16 torso (use_fp16)" if fp16_torso else "fp32"
        schedule = denoiser.schedule
        self.schedule = schedule
        self.T = schedule.original_T  # _WrappedModel rescales by the training chain's length
        # _WrappedModel's map from chain index to original timestep (the identity without respacing).
        self.timestep_map = torch.tensor(schedule.timestep_map or range(schedule.T), dtype=torch.long)
        # Runner.__init__: scale = sqrt(1 / (1 + 4 sigma^2)) and t* (closed form or nearest integer).
        self.scale = start_scale(sigma)
        self.t = timestep_for_sigma(schedule, sigma, "densepure")
        self.learn_sigma = denoiser.learn_sigma
        self.sigma_small = denoiser.sigma_small
        self.rescale_timesteps = denoiser.rescale_timesteps
        self._arrays: dict[str, np.ndarray] = {}

    @property
    def forwards_per_draw(self) -> int:
        return self.votes * self.steps

    # -- core.Smooth + merge_results ------------------------------------------------------

    @torch.no_grad()
    def count(self, image: torch.Tensor, num: int, seed: int = 0, reverse_seed: int = 0) -> np.ndarray:
        """Per-class counts of the K-vote majority over ``num`` draws (K runs, then the merge)."""
        x = torch.as_tensor(image, dtype=torch.float32, device=self.device)
        per_vote = [self.sample_noise(x, num, seed, reverse_seed + k) for k in range(self.votes)]
        return self.merge(per_vote)

    def sample_noise(self, x: torch.Tensor, num: int, seed: int, reverse_seed: int) -> np.ndarray:
        """One vote run: ``Smooth._sample_noise``, returning every draw's label (saved predictions)."""
        smooth_gen = torch.Generator(device=self.device).manual_seed(seed)  # --seed: same for every vote
        reverse_gen = torch.Generator(device=self.device).manual_seed(reverse_seed)  # --reverse_seed
        predictions_all = np.array([], dtype=int)
        for _ in range(math.ceil(num / self.batch)):
            this_batch_size = min(self.batch, num)
            num -= this_batch_size
            batch = x.repeat((this_batch_size, 1, 1, 1))
            noise = self.randn(batch.shape, smooth_gen) * self.sigma
            predictions = self.base_classifier(batch + noise, reverse_gen).argmax(1)
            predictions_all = np.hstack((predictions_all, predictions.cpu().numpy()))
        return predictions_all

    def merge(self, per_vote: list[np.ndarray]) -> np.ndarray:
        """merge_results.py: per draw the most frequent label, ties to the first in vote order."""
        table = np.array(per_vote).T
        counts = np.zeros(self.num_classes, dtype=int)
        for row in table:
            labels = list(row)
            counts[max(labels, key=labels.count)] += 1
        return counts

    # -- DensePure_Certify.forward and the runner --------------------------------------------

    def base_classifier(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x_re = self.image_editing_sample((x - 0.5) * 2, gen)
        return self.classifier((x_re + 1) * 0.5)

    def image_editing_sample(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x0 = self.scale * img
        indices_t_steps = reverse_timesteps(self.t, self.steps)
        for i in range(len(indices_t_steps)):
            t = torch.tensor([len(indices_t_steps) - i - 1] * x0.shape[0], device=self.device)
            real_t = torch.tensor([indices_t_steps[i]] * x0.shape[0], device=self.device)
            out = self.p_sample(x0, t, indices_t_steps.copy(), len(indices_t_steps) - i, real_t, gen)
            x0 = out["sample"]
        return x0

    def randn(self, shape: torch.Size | tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        """``randn_like`` of the reference, from an explicit generator (tests replay noise here)."""
        return torch.randn(shape, generator=gen, device=self.device)

    # -- GaussianDiffusion.p_sample / p_mean_variance -------------------------------------------

    def _respace(self, indices_t_steps: list[int]) -> None:
        """The arrays the reference recomputes at the first step of every image_editing_sample."""
        betas = densepure_chain_betas(self.schedule, indices_t_steps)
        alphas = 1.0 - betas
        abar = np.cumprod(alphas, axis=0)
        abar_prev = np.append(1.0, abar[:-1])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        with np.errstate(divide="ignore"):
            clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:])) if len(betas) > 1 else np.log(posterior_variance)
            fixed_large = np.append(posterior_variance[1], betas[1:]) if len(betas) > 1 else betas
            self._arrays = {
                "betas": betas,
                "log_betas": np.log(betas),
                "posterior_variance": posterior_variance,
                "posterior_log_variance_clipped": clipped,
                "fixed_large": fixed_large,
                "log_fixed_large": np.log(fixed_large),
                "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
                "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
                "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
                "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1),
            }

    def p_sample(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        indices_t_steps: list[int],
        step: int,
        real_t: torch.Tensor,
        gen: torch.Generator,
    ) -> dict[str, Any]:
        if step == len(indices_t_steps):
            self._respace(indices_t_steps)
        out = self.p_mean_variance(x, t, real_t)
        noise = self.randn(x.shape, gen)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))  # no noise when t == 0
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_mean_variance(self, x: torch.Tensor, t: torch.Tensor, real_t: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self._arrays
        B, C = x.shape[:2]
        mapped = self.timestep_map.to(real_t.device)[real_t]
        scaled = mapped.float() * (1000.0 / self.T) if self.rescale_timesteps else mapped
        model_output = self.model(x, scaled)
        if self.learn_sigma:
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            min_log = _extract_into_tensor(a["posterior_log_variance_clipped"], t, x.shape)
            max_log = _extract_into_tensor(a["log_betas"], t, x.shape)
            frac = (model_var_values + 1) / 2
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if self.sigma_small:
                var, log_var = a["posterior_variance"], a["posterior_log_variance_clipped"]
            else:
                var, log_var = a["fixed_large"], a["log_fixed_large"]
            model_variance = _extract_into_tensor(var, t, x.shape)
            model_log_variance = _extract_into_tensor(log_var, t, x.shape)
        pred_xstart = (
            _extract_into_tensor(a["sqrt_recip_alphas_cumprod"], t, x.shape) * x
            - _extract_into_tensor(a["sqrt_recipm1_alphas_cumprod"], t, x.shape) * model_output
        ).clamp(-1, 1)
        model_mean = (
            _extract_into_tensor(a["posterior_mean_coef1"], t, x.shape) * pred_xstart
            + _extract_into_tensor(a["posterior_mean_coef2"], t, x.shape) * x
        )
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance, "pred_xstart": pred_xstart}
