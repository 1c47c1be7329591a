"""OpenAI's diffusion UNet (improved-diffusion / guided-diffusion ``UNetModel``), rebuilt from flags.

The pretrained denoisers DensePure uses are OpenAI checkpoints: plain state dicts whose key names
and shapes are fixed by the module tree of ``UNetModel`` and by the flags of the repository's
``script_util`` that built it. This module rebuilds that tree from the same flag names so that such
checkpoints load with ``strict=True``, and computes the same function in its forward pass.

Written from the published architecture (Dhariwal & Nichol 2021; Nichol & Dhariwal 2021), not
copied. Deliberate differences from the reference code, none of which change the maths:

- always built in float32 and never with gradient checkpointing (``use_fp16`` and
  ``use_checkpoint`` are accepted and ignored: they are training-time choices);
- attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (same softmax of
  q.k / sqrt(head channels), one fused kernel instead of two einsums);
- a scalar timestep is broadcast over the batch (OpenAI requires a 1-D tensor).

Flag defaults: improved-diffusion and guided-diffusion agree on every architecture default, but
differ on two diffusion ones (``rescale_timesteps`` and ``rescale_learned_sigmas``: True in
improved-diffusion, False in guided-diffusion). A flag set that names none of guided-diffusion's
additions (``num_head_channels``, ``channel_mult``, ``resblock_updown``, ``use_fp16``,
``use_new_attention_order``) is read with improved-diffusion's defaults, any other with
guided-diffusion's; see :func:`resolve_unet_flags`. This keeps the flag set of improved-diffusion's
README (which leaves ``rescale_timesteps`` at its True default) from silently feeding the CIFAR-10
model unscaled timesteps.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from abc import abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NUM_CLASSES",
    "DiffusionSettings",
    "UNetConfig",
    "UNetModel",
    "build_openai_unet",
    "diffusion_settings",
    "load_openai_checkpoint",
    "qkv_attention",
    "resolve_unet_flags",
    "timestep_embedding",
    "unet_config_from_flags",
    "unet_flags_from_json",
]

# Class-conditional OpenAI models are all ImageNet-1k models; script_util hard-codes the count.
NUM_CLASSES = 1000

# GroupNorm32 of the reference code: every normalised width must be a multiple of this.
_NORM_GROUPS = 32

# Shared by both repositories (model part), with the values both use.
_COMMON_MODEL_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "attention_resolutions": "16,8",
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
}

# Names only guided-diffusion knows; their values here equal improved-diffusion's fixed behaviour.
_GUIDED_ONLY_DEFAULTS: dict[str, Any] = {
    "num_head_channels": -1,
    "channel_mult": "",
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
}

_IMPROVED_DIFFUSION_DEFAULTS: dict[str, Any] = {
    "learn_sigma": False,
    "sigma_small": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": True,
    "rescale_learned_sigmas": True,
}

_GUIDED_DIFFUSION_DEFAULTS: dict[str, Any] = {
    **_IMPROVED_DIFFUSION_DEFAULTS,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
}

# Ours, not OpenAI's: their script_util fixes 3 input channels.
_EXTRA_DEFAULTS: dict[str, Any] = {"in_channels": 3}

_INT_FLAGS = frozenset(
    {
        "image_size",
        "num_channels",
        "num_res_blocks",
        "num_heads",
        "num_heads_upsample",
        "num_head_channels",
        "diffusion_steps",
        "in_channels",
    }
)
_BOOL_FLAGS = frozenset(
    {
        "class_cond",
        "use_checkpoint",
        "use_scale_shift_norm",
        "resblock_updown",
        "use_fp16",
        "use_new_attention_order",
        "learn_sigma",
        "sigma_small",
        "use_kl",
        "predict_xstart",
        "rescale_timesteps",
        "rescale_learned_sigmas",
    }
)
_KNOWN_FLAGS = frozenset(
    {**_COMMON_MODEL_DEFAULTS, **_GUIDED_ONLY_DEFAULTS, **_GUIDED_DIFFUSION_DEFAULTS, **_EXTRA_DEFAULTS}
)

_SUPPORTED_SCHEDULES = ("linear", "cosine")

# Default channel multipliers by image size: guided-diffusion's table plus improved-diffusion's 32.
_DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    # script_util's str2bool spellings, so that flags copied from a command line still work.
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("yes", "true", "t", "y", "1"):
            return True
        if low in ("no", "false", "f", "n", "0"):
            return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"flag {name!r} must be a boolean, got {value!r}")


def _as_int(name: str, value: Any) -> int:
    # bool is an int subclass; True as an image size is a mistake, not a 1.
    if isinstance(value, bool):
        raise ValueError(f"flag {name!r} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"flag {name!r} must be an integer, got {value!r}")


def _as_csv(name: str, value: Any) -> str:
    """Comma-separated list flags (attention_resolutions, channel_mult) as their string form."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        raise ValueError(f"flag {name!r} must be a comma-separated string, got {value!r}")
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, Iterable):
        return ",".join(str(v) for v in value)
    raise ValueError(f"flag {name!r} must be a comma-separated string, got {value!r}")


def _check_known(flags: Mapping[str, Any]) -> None:
    for name in flags:
        if name not in _KNOWN_FLAGS:
            raise ValueError(
                f"unknown model flag {name!r}; known flags: {', '.join(sorted(_KNOWN_FLAGS))}"
            )


def _is_guided_flag_set(flags: Mapping[str, Any]) -> bool:
    return any(name in flags for name in _GUIDED_ONLY_DEFAULTS)


def resolve_unet_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``flags`` and return the complete flag set with defaults filled in.

    Unknown names raise ``ValueError`` naming the flag. Values are normalised to the types
    script_util uses (ints, bools, strings for the comma-separated lists); strings such as
    ``"True"`` or ``"128"`` are accepted because flag files are often transcribed from command
    lines. Missing names take improved-diffusion's defaults when no guided-diffusion-only flag is
    present, guided-diffusion's otherwise (see the module docstring).
    """
    if not isinstance(flags, Mapping):
        raise ValueError(f"model flags must be a mapping of flag names to values, got {type(flags).__name__}")
    _check_known(flags)
    diffusion_defaults = (
        _GUIDED_DIFFUSION_DEFAULTS if _is_guided_flag_set(flags) else _IMPROVED_DIFFUSION_DEFAULTS
    )
    resolved: dict[str, Any] = {
        **_COMMON_MODEL_DEFAULTS,
        **_GUIDED_ONLY_DEFAULTS,
        **diffusion_defaults,
        **_EXTRA_DEFAULTS,
    }
    for name, value in flags.items():
        if name in _INT_FLAGS:
            resolved[name] = _as_int(name, value)
        elif name in _BOOL_FLAGS:
            resolved[name] = _as_bool(name, value)
        elif name in ("attention_resolutions", "channel_mult"):
            resolved[name] = _as_csv(name, value)
        elif name == "dropout":
            if isinstance(value, bool):
                raise ValueError(f"flag 'dropout' must be a number, got {value!r}")
            try:
                resolved[name] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"flag 'dropout' must be a number, got {value!r}") from None
        elif name in ("noise_schedule", "timestep_respacing"):
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise ValueError(f"flag {name!r} must be a string, got {value!r}")
            resolved[name] = str(value)
        else:  # pragma: no cover - every known name is handled above
            resolved[name] = value
    return resolved


@dataclass(frozen=True)
class UNetConfig:
    """Constructor arguments of :class:`UNetModel`, as OpenAI's ``create_model`` derives them.

    ``attention_ds`` holds downsampling rates (image_size // resolution), not resolutions.
    """

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_ds: tuple[int, ...]
    channel_mult: tuple[float, ...]
    num_classes: int | None = None
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.model_channels < 1 or self.in_channels < 1:
            raise ValueError("image_size, num_channels and in_channels must be positive")
        if self.num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if not self.channel_mult:
            raise ValueError("channel_mult must name at least one level")
        levels = len(self.channel_mult)
        if self.image_size % (2 ** (levels - 1)) != 0:
            # Otherwise the skip connections of the decoder would not line up in size.
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2^{levels - 1} "
                f"(channel_mult has {levels} levels)"
            )
        for mult in self.channel_mult:
            width = int(mult * self.model_channels)
            if width < 1 or width % _NORM_GROUPS != 0:
                raise ValueError(
                    f"channel width {width} (num_channels {self.model_channels} x channel_mult {mult}) "
                    f"must be a positive multiple of {_NORM_GROUPS}, the GroupNorm group count"
                )


def _parse_channel_mult(spec: str, image_size: int) -> tuple[float, ...]:
    if spec == "":
        try:
            return _DEFAULT_CHANNEL_MULT[image_size]
        except KeyError:
            raise ValueError(
                f"no default channel_mult for image_size {image_size} "
                f"(defaults exist for {sorted(_DEFAULT_CHANNEL_MULT)}); give channel_mult, e.g. '1,2'"
            ) from None
    try:
        mults = tuple(float(part) for part in spec.split(","))
    except ValueError:
        raise ValueError(f"channel_mult must be comma-separated numbers, got {spec!r}") from None
    # Keep integral multipliers as ints purely for a tidy repr; int(mult * ch) is unaffected.
    return tuple(int(m) if m.is_integer() else m for m in mults)


def _parse_attention_ds(spec: str, image_size: int) -> tuple[int, ...]:
    if spec == "":
        return ()
    try:
        resolutions = [int(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"attention_resolutions must be comma-separated integers, got {spec!r}"
        ) from None
    if any(res < 1 for res in resolutions):
        raise ValueError(f"attention_resolutions must be positive, got {spec!r}")
    # script_util turns feature-map resolutions into downsampling rates this way.
    return tuple(image_size // res for res in resolutions)


def unet_config_from_flags(flags: Mapping[str, Any]) -> UNetConfig:
    """The :class:`UNetConfig` that OpenAI's ``create_model`` would build for ``flags``."""
    f = resolve_unet_flags(flags)
    in_channels = f["in_channels"]
    return UNetConfig(
        image_size=f["image_size"],
        in_channels=in_channels,
        model_channels=f["num_channels"],
        out_channels=in_channels * (2 if f["learn_sigma"] else 1),
        num_res_blocks=f["num_res_blocks"],
        attention_ds=_parse_attention_ds(f["attention_resolutions"], f["image_size"]),
        channel_mult=_parse_channel_mult(f["channel_mult"], f["image_size"]),
        num_classes=NUM_CLASSES if f["class_cond"] else None,
        num_heads=f["num_heads"],
        num_head_channels=f["num_head_channels"],
        num_heads_upsample=f["num_heads_upsample"],
        use_scale_shift_norm=f["use_scale_shift_norm"],
        resblock_updown=f["resblock_updown"],
        use_new_attention_order=f["use_new_attention_order"],
        dropout=f["dropout"],
    )


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
    return GroupNorm32(_NORM_GROUPS, channels)


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


# --------------------------------------------------------------------------------------------
# Diffusion settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffusionSettings:
    """The diffusion-process half of a flag set (script_util's ``create_gaussian_diffusion`` args)."""

    diffusion_steps: int
    noise_schedule: str
    learn_sigma: bool
    rescale_timesteps: bool
    timestep_respacing: str
    sigma_small: bool
    predict_xstart: bool
    use_kl: bool
    rescale_learned_sigmas: bool


def diffusion_settings(flags: Mapping[str, Any]) -> DiffusionSettings:
    """Read the diffusion settings from ``flags``, with OpenAI's defaults for absent names.

    Raises ``ValueError`` for unknown flags, a noise schedule other than ``linear``/``cosine``,
    or ``predict_xstart`` (the pipeline only handles epsilon-predicting models).
    """
    f = resolve_unet_flags(flags)
    if f["noise_schedule"] not in _SUPPORTED_SCHEDULES:
        raise ValueError(
            f"unsupported noise_schedule {f['noise_schedule']!r}: supported schedules are "
            f"{' and '.join(repr(s) for s in _SUPPORTED_SCHEDULES)}"
        )
    if f["predict_xstart"]:
        raise ValueError(
            "predict_xstart=True is not supported: only epsilon-predicting models "
            "(predict_xstart False) are supported"
        )
    if f["diffusion_steps"] < 1:
        raise ValueError(f"diffusion_steps must be >= 1, got {f['diffusion_steps']}")
    return DiffusionSettings(
        diffusion_steps=f["diffusion_steps"],
        noise_schedule=f["noise_schedule"],
        learn_sigma=f["learn_sigma"],
        rescale_timesteps=f["rescale_timesteps"],
        timestep_respacing=f["timestep_respacing"],
        sigma_small=f["sigma_small"],
        predict_xstart=f["predict_xstart"],
        use_kl=f["use_kl"],
        rescale_learned_sigmas=f["rescale_learned_sigmas"],
    )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def unet_flags_from_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a flags JSON file: a plain ``{flag: value}`` object or a manifest with a ``"flags"`` object.

    The names are validated (unknown ones raise ``ValueError``) but defaults are not filled in,
    so the result round-trips to the file's own flag set.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"model flags file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"model flags file {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("flags"), dict):
        data = data["flags"]
    if not isinstance(data, dict):
        raise ValueError(
            f"model flags file {path} must hold a JSON object of flags (or {{\"flags\": {{...}}}})"
        )
    try:
        _check_known(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return dict(data)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"could not read checkpoint {path}: {_first_line(exc)}") from None
    elif ext in (".pt", ".pth"):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # torch's own message suggests weights_only=False: never for a file we did not make.
            raise ValueError(
                f"checkpoint {path} holds objects other than tensors and is not loaded (untrusted pickle): "
                "re-save its state_dict with torch.save or convert it to .safetensors"
            ) from None
        except (zipfile.BadZipFile, EOFError, RuntimeError, OSError, ValueError) as exc:
            raise ValueError(f"could not read checkpoint {path} (corrupt or truncated?): {_first_line(exc)}") from None
    else:
        raise ValueError(
            f"unsupported checkpoint file type {ext or '(none)'!r} for {path}: "
            "use .pt, .pth or .safetensors"
        )

    # Training scripts sometimes wrap the weights; OpenAI's released files are bare state dicts.
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()
    ):
        raise ValueError(f"checkpoint {path} does not hold a state dict (a mapping of names to tensors)")
    if raw and all(k.startswith("module.") for k in raw):
        # Saved from a DistributedDataParallel wrapper.
        raw = {k[len("module."):]: v for k, v in raw.items()}
    return raw


def _examples(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (", ..." if len(items) > limit else "")


def _mismatch_message(path: str, state: Mapping[str, torch.Tensor], model: nn.Module) -> str | None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: ckpt {list(state[k].shape)} vs model {list(shape)}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {_examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {_examples(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {_examples(shapes, 2)})")
    return (
        f"checkpoint {path} does not match --model-flags: {', '.join(parts)}; "
        "check that the flags file belongs to this checkpoint"
    )


def load_openai_checkpoint(path: str | os.PathLike[str], flags: Mapping[str, Any]) -> UNetModel:
    """Build the UNet for ``flags`` and load the weights at ``path`` strictly, in float32, eval mode.

    ``.pt``/``.pth`` files are read with ``torch.load(..., weights_only=True)``, ``.safetensors``
    with safetensors. Raises ``FileNotFoundError`` for a missing file and a one-line
    ``ValueError`` for an unreadable file or one whose keys or shapes do not fit the flags.
    """
    path = os.fspath(path)
    state = _read_state_dict(path)
    # Built on the meta device and then handed the checkpoint's tensors, so that large models
    # (550M parameters for ImageNet) are not first initialised at random only to be overwritten.
    with torch.device("meta"):
        model = build_openai_unet(flags)
    problem = _mismatch_message(path, state, model)
    if problem is not None:
        raise ValueError(problem)
    state = {
        k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v).contiguous()
        for k, v in state.items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
