"""OpenAI's diffusion flags (improved-diffusion / guided-diffusion ``script_util`` names): schema,
defaults, validation, and what they mean for the network (:class:`UNetConfig`) and for the diffusion
process (:class:`DiffusionSettings`).

Torch-free, so that a run configuration can be validated from its flags file before any model is
loaded. guided-diffusion itself keeps its flags (``script_util.py``) apart from the network
(``unet.py``); so does this package (``workers/unet.py`` builds the network, ``workers/checkpoint.py``
reads the weights).

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
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "NUM_CLASSES",
    "DiffusionSettings",
    "UNetConfig",
    "diffusion_settings",
    "resolve_unet_flags",
    "unet_config_from_flags",
    "unet_flags_from_json",
]

# Class-conditional OpenAI models are all ImageNet-1k models; script_util hard-codes the count.
NUM_CLASSES = 1000

# GroupNorm32 of the reference code: every normalised width must be a multiple of this.
NORM_GROUPS = 32

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
            if width < 1 or width % NORM_GROUPS != 0:
                raise ValueError(
                    f"channel width {width} (num_channels {self.model_channels} x channel_mult {mult}) "
                    f"must be a positive multiple of {NORM_GROUPS}, the GroupNorm group count"
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
