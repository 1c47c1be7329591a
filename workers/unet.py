"""OpenAI's diffusion UNet (improved-diffusion / guided-diffusion ``UNetModel``), rebuilt from flags.

The pretrained denoisers DensePure uses are OpenAI checkpoints: plain state dicts whose key names
and shapes are fixed by the module tree of ``UNetModel`` and by the flags of the repository's
``script_util`` that built it (``workers/unet_flags.py``). This module rebuilds that tree from the
same flag names so that such checkpoints load with ``strict=True`` (``workers/checkpoint.py``), and
computes the same function in its forward pass.

Written from the published architecture (Dhariwal & Nichol 2021; Nichol & Dhariwal 2021), not
copied. Deliberate differences from the reference code, none of which change the maths:

- always built in float32 and never with gradient checkpointing (``use_fp16`` and
  ``use_checkpoint`` are accepted and ignored: they are training-time choices);
- attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (same softmax of
  q.k / sqrt(head channels), one fused kernel instead of two einsums);
- a scalar timestep is broadcast over the batch (OpenAI requires a 1-D tensor).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.unet_flags import NORM_GROUPS, UNetConfig, unet_config_from_flags

__all__ = ["UNetModel", "build_openai_unet", "qkv_attention", "timestep_embedding"]


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape ``[N, dim]``.

    Frequencies are ``max_period ** (-i / half)`` for i < half = dim // 2; the first half of the
    output holds the cosines, the second the sines, and an odd ``dim`` gets a zero last column.
    Computed in float32 whatever the input dtype, as the reference does.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def _zeroed(module: nn.Module) -> nn.Module:
    # The reference zero-initialises every layer that closes a residual branch, so a fresh
    # network starts as (nearly) the identity; kept so that training from scratch behaves alike.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and returned in the input dtype (fp16/bf16 safety)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        device_type = x.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            # Autocast would otherwise be free to run the norm itself in low precision.
            with torch.autocast(device_type=device_type, enabled=False):
                out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        else:
            out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(NORM_GROUPS, channels)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the module to ``x`` conditioned on ``emb``."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential container that hands the embedding to the children that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution or, without one, 2x2 average pooling (key ``op``)."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.channels = channels
        self.op: nn.Module = (
            nn.Conv2d(channels, channels, 3, stride=2, padding=1)
            if use_conv
            else nn.AvgPool2d(kernel_size=2, stride=2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling (up/down).

    Submodule names and Sequential indices match the reference so that checkpoint keys line up:
    ``in_layers`` (norm, SiLU, conv), ``emb_layers`` (SiLU, linear), ``out_layers`` (norm, SiLU,
    dropout, conv), ``skip_connection``.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            _norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        # Scale-shift (FiLM) conditioning needs a scale and a shift per channel.
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            _norm(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zeroed(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.updown:
            # Resample between the activation and the convolution, on both paths.
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[2](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def qkv_attention(qkv: torch.Tensor, num_heads: int, legacy_order: bool) -> torch.Tensor:
    """Multi-head self-attention over a packed ``[N, 3*H*C, T]`` tensor; returns ``[N, H*C, T]``.

    ``legacy_order`` (improved-diffusion, and guided-diffusion without
    ``use_new_attention_order``) packs channels head-major: per head its q, k and v blocks.
    The new order packs q for all heads, then k, then v. Both compute
    softmax(q^T k / sqrt(C)) applied to v for each head.
    """
    batch, width, length = qkv.shape
    if width % (3 * num_heads) != 0:
        raise ValueError(f"qkv width {width} is not divisible by 3 x {num_heads} heads")
    ch = width // (3 * num_heads)
    if legacy_order:
        q, k, v = qkv.reshape(batch, num_heads, 3 * ch, length).split(ch, dim=2)
    else:
        q, k, v = (part.reshape(batch, num_heads, ch, length) for part in qkv.chunk(3, dim=1))
    # SDPA wants [N, H, T, C]; its default scale 1/sqrt(C) is the reference's scale^2.
    out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    return out.transpose(-1, -2).reshape(batch, num_heads * ch, length)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection (keys ``norm``, ``qkv``, ``proj_out``)."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            if num_heads < 1 or channels % num_heads != 0:
                raise ValueError(f"{channels} attention channels cannot be split into {num_heads} heads")
            self.num_heads = num_heads
        else:
            if num_head_channels < 1 or channels % num_head_channels != 0:
                raise ValueError(
                    f"{channels} attention channels are not divisible by "
                    f"num_head_channels {num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.legacy_order = not use_new_attention_order
        self.norm = _norm(channels)
        # 1-D convolutions (kernel 1), not Linear layers: the checkpoint shapes are [out, in, 1].
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.legacy_order)
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class UNetModel(nn.Module):
    """OpenAI's diffusion UNet; ``forward(x, timesteps, y=None)`` returns eps (and v if learned sigma).

    Module layout, and therefore state-dict keys: ``time_embed``, ``label_emb`` (class-conditional
    only), ``input_blocks``, ``middle_block``, ``output_blocks``, ``out``.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        self.image_size = cfg.image_size
        self.in_channels = cfg.in_channels
        self.model_channels = cfg.model_channels
        self.out_channels = cfg.out_channels
        self.num_classes = cfg.num_classes
        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample

        emb_dim = 4 * cfg.model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(cfg.model_channels, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)

        def res_block(cin: int, cout: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(cin, emb_dim, cfg.dropout, cout, cfg.use_scale_shift_norm, up=up, down=down)

        def attention(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, cfg.num_head_channels, cfg.use_new_attention_order)

        ch = first_ch = int(cfg.channel_mult[0] * cfg.model_channels)
        stem = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(stem)])
        # Widths of every encoder output, consumed in reverse by the decoder's skip connections.
        skip_widths = [ch]
        ds = 1
        last_level = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                width = int(mult * cfg.model_channels)
                layers: list[nn.Module] = [res_block(ch, width)]
                ch = width
                if ds in cfg.attention_ds:
                    layers.append(attention(ch, cfg.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_widths.append(ch)
            if level != last_level:
                down = res_block(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, True)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_widths.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch),
            attention(ch, cfg.num_heads),
            res_block(ch, ch),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                width = int(mult * cfg.model_channels)
                layers = [res_block(ch + skip_widths.pop(), width)]
                ch = width
                if ds in cfg.attention_ds:
                    layers.append(attention(ch, heads_up))
                if level and i == cfg.num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            _norm(ch),
            nn.SiLU(),
            _zeroed(nn.Conv2d(first_ch, cfg.out_channels, 3, padding=1)),
        )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float | int,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from ``x`` ([N, in_channels, H, W]) at ``timesteps`` (shape [N] or scalar).

        ``timesteps`` are fed exactly as given (the caller applies any 1000 / T rescaling).
        ``y`` ([N] class indices) is required for, and only for, class-conditional models.
        Returns [N, out_channels, H, W]: eps, followed by the variance interpolation v when the
        model was built with ``learn_sigma``.
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y (class labels) if and only if the model is class-conditional")
        t = torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if self.num_classes is not None:
            assert y is not None
            emb = emb + self.label_emb(y)

        torso_dtype = self.time_embed[0].weight.dtype
        h = x.to(torso_dtype)
        skips: list[torch.Tensor] = []
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def build_openai_unet(flags: Mapping[str, Any]) -> UNetModel:
    """Build OpenAI's ``UNetModel`` for script_util-style ``flags`` (plus our ``in_channels``).

    Float32, no gradient checkpointing, in eval mode (dropout layers exist only so that keys and
    indices match the checkpoints). Honours the ambient default device, so
    ``with torch.device("meta"): build_openai_unet(flags)`` builds without allocating weights.
    Raises ``ValueError`` for unknown flag names or unusable values.
    """
    model = UNetModel(unet_config_from_flags(flags))
    return model.eval()

