"""Loading the two networks of the pipeline: a diffusion denoiser and an image classifier.

Both are described by a *source* string, so that a run's configuration names them in one token:

denoisers
    ``openai:PATH`` (OpenAI improved/guided-diffusion checkpoint, .pt/.pth/.safetensors, with the
    flags it was trained with), ``diffusers:DIR`` (a ``UNet2DModel`` with its DDPM scheduler config,
    or a pipeline directory with ``unet/`` and ``scheduler/``), ``digits`` (the bundled demo).
classifiers
    ``hf:DIR`` (a transformers image-classification model with its image processor config),
    ``torchscript:FILE`` (a scripted module taking [0,1] images), ``digits`` (the bundled demo).

PATH/DIR may be ``s3://`` (or ``file://``) URIs; ``pipeline.storage.fetch`` copies them locally first.
Every loader returns a module in eval mode with gradients off, on the requested device. Every
problem the user can fix raises ``pipeline.errors.UserError`` with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import UserError
from workers.schedule import NoiseSchedule, openai_schedule

Device = str | torch.device
_M = TypeVar("_M", bound=nn.Module)

DENOISER_SCHEMES = "use openai:PATH, diffusers:DIR or digits"
CLASSIFIER_SCHEMES = "use hf:DIR, torchscript:FILE or digits"


# --------------------------------------------------------------------------------------------
# helpers


def _split(source: str) -> tuple[str, str]:
    """'scheme:rest' -> (scheme, rest); a bare word is a scheme with no argument (e.g. 'digits')."""
    scheme, _, rest = source.partition(":")
    return scheme.strip().lower(), rest.strip()


def _local(path: str) -> str:
    """A local path for ``path``: URIs (s3://, file://) go through ``pipeline.storage.fetch``.

    Imported lazily because storage pulls in pyarrow/pandas, which plain local loads do not need.
    """
    if "://" in path:
        from pipeline.storage import fetch

        return str(fetch(path))
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _finish(module: _M, device: Device) -> _M:
    """Inference mode for a loaded module: eval (dropout off), no grads, on ``device``."""
    module.eval().requires_grad_(False)
    return module.to(device)


def _require_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {path} (check the path)")
    return p


def _digits_asset(asset_dir: str | Path, name: str) -> Path:
    path = Path(asset_dir) / name
    if not path.is_file():
        raise UserError(
            f"the bundled digits model file {path} is missing: train the demo models (python scripts/train_digits.py)"
        )
    return path


def _require_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{what} directory not found: {path} (check the path)")
    return p


# --------------------------------------------------------------------------------------------
# denoiser


class Denoiser(nn.Module):
    """A noise-prediction network with the diffusion settings it was trained with.

    Attributes: ``schedule`` (the sampling chain, betas of length T; for OpenAI flags the
    ``SpacedDiffusion`` chain of ``timestep_respacing``, with its ``timestep_map``), ``learn_sigma``
    (the output has 2C channels: eps and the variance interpolation v in [-1, 1]), ``sigma_small``
    (for fixed variance: True = posterior variance, False = betas, "fixed large"),
    ``rescale_timesteps`` (the network is fed t * 1000 / original T), ``in_channels``, ``image_size``.

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
        (``workers.unet.diffusion_settings``); ``schedule`` defaults to their
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


class _DiffusersEps(nn.Module):
    """Adapts a diffusers ``UNet2DModel`` to the ``net(x, t) -> Tensor`` call of ``Denoiser``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t, return_dict=False)[0]


def load_denoiser(source: str, model_flags: str | dict | None = None, device: Device = "cpu") -> Denoiser:
    """Load a denoiser from ``openai:PATH`` (needs ``model_flags``), ``diffusers:DIR`` or ``digits``.

    ``model_flags``: the OpenAI script_util flags the checkpoint was trained with, as a dict or
    a JSON file (either the flags themselves or an object with a ``flags`` key; parsed by
    ``workers.unet.unet_flags_from_json``). Ignored for the other schemes.
    """
    scheme, rest = _split(source)
    if scheme == "openai":
        if not rest:
            raise UserError("openai: needs a checkpoint path: use openai:PATH")
        if model_flags is None:
            raise UserError(
                f"openai:{rest} needs --model-flags FILE.json (the flags the checkpoint was trained with)"
            )
        return _finish(_load_openai(_local(rest), model_flags), device)
    if scheme == "diffusers":
        if not rest:
            raise UserError("diffusers: needs a directory: use diffusers:DIR")
        return _finish(_load_diffusers(_local(rest)), device)
    if scheme == "digits" and not rest:
        from workers.digits import ASSET_DIR, DENOISER_FILE, DENOISER_FLAGS_FILE

        ckpt = _digits_asset(ASSET_DIR, DENOISER_FILE)
        flags = _digits_asset(ASSET_DIR, DENOISER_FLAGS_FILE)
        return _finish(_load_openai(str(ckpt), str(flags)), device)
    raise UserError(f"unknown denoiser source {source!r}: {DENOISER_SCHEMES}")


def _wrap(exc: BaseException, path: Path | str, what: str) -> UserError:
    """A one-line UserError for ``exc`` that names ``path`` (unet.py's messages usually do already)."""
    msg = _first_line(exc)
    return UserError(msg if str(path) in msg else f"{what} {path}: {msg}")


def _openai_flags(model_flags: str | dict) -> dict:
    from workers.unet import unet_flags_from_json

    if isinstance(model_flags, dict):
        return dict(model_flags)
    path = _require_file(_local(str(model_flags)), "model flags file")
    try:
        return unet_flags_from_json(str(path))
    except (ValueError, OSError) as exc:
        raise _wrap(exc, path, "cannot read model flags") from exc


def _load_openai(path: str, model_flags: str | dict) -> Denoiser:
    """Build the OpenAI UNet from its flags, load the checkpoint strictly, attach its schedule."""
    from workers.unet import diffusion_settings, load_openai_checkpoint

    ckpt = _require_file(path, "checkpoint")
    flags = _openai_flags(model_flags)
    try:
        settings = diffusion_settings(flags)  # also refuses predict_xstart and unknown schedules
        # The sampling chain as create_gaussian_diffusion builds it: timestep_respacing is honoured
        # (SpacedDiffusion), and a bad respacing string is a flags error.
        schedule = openai_schedule(settings.noise_schedule, settings.diffusion_steps, settings.timestep_respacing)
    except ValueError as exc:
        raise _wrap(exc, ckpt, "bad model flags for") from exc
    try:
        net = load_openai_checkpoint(str(ckpt), flags)
    except Exception as exc:  # corrupt file, wrong flags, unreadable pickle: all fixable by the user
        raise _wrap(exc, ckpt, "cannot load") from exc
    if net.num_classes is not None:
        raise UserError(f"{ckpt} is class-conditional (class_cond): only unconditional models are supported")
    return Denoiser.from_openai(net, settings, schedule)


def _scheduler_config_path(root: Path) -> Path | None:
    for candidate in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"):
        if candidate.is_file():
            return candidate
    return None


def _exact_betas(config: Any, approx: np.ndarray) -> tuple[str, np.ndarray]:
    """Name and float64 betas of a diffusers schedule.

    diffusers stores betas in float32; for the two schedules we know in closed form we recompute
    them in float64 (as OpenAI does), but only when they agree with diffusers' own values, so any
    config option we do not model (zero-SNR rescaling, trained betas, ...) falls back to diffusers.
    """
    T = len(approx)
    kind = config.beta_schedule
    if kind == "squaredcos_cap_v2":
        name, exact = "cosine", NoiseSchedule.from_name("cosine", T).betas
    elif kind == "linear":
        name, exact = "linear", np.linspace(config.beta_start, config.beta_end, T, dtype=np.float64)
    else:
        return "custom", approx
    if config.trained_betas is None and np.allclose(exact, approx, rtol=1e-5, atol=1e-9):
        return name, exact
    return "custom", approx


def _load_diffusers(path: str) -> Denoiser:
    """A diffusers ``UNet2DModel`` plus the DDPM scheduler config that defines its training chain."""
    from diffusers import DDPMScheduler, UNet2DModel

    root = _require_dir(path, "diffusers model")
    subfolder = "unet" if (root / "unet" / "config.json").is_file() else None
    unet_dir = root / subfolder if subfolder else root
    if not (unet_dir / "config.json").is_file():
        raise UserError(f"{root} has no config.json or unet/config.json: save the UNet with save_pretrained(DIR)")
    class_name = json.loads((unet_dir / "config.json").read_text()).get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise UserError(f"{unet_dir} holds a {class_name}: only unconditional diffusers UNet2DModel is supported")
    sched_path = _scheduler_config_path(root)
    if sched_path is None:
        raise UserError(
            f"{root} has no scheduler/scheduler_config.json or scheduler_config.json: "
            "save the DDPM scheduler it was trained with beside the UNet"
        )
    try:
        scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(str(sched_path.parent)))
        unet = UNet2DModel.from_pretrained(str(root), subfolder=subfolder, local_files_only=True)
    except Exception as exc:  # corrupt weights or config: the user must fix the directory
        raise UserError(f"cannot load diffusers model {root}: {_first_line(exc)}") from exc

    cfg = scheduler.config
    if cfg.prediction_type != "epsilon":
        raise UserError(
            f"{sched_path} has prediction_type={cfg.prediction_type!r}: only 'epsilon' models are supported"
        )
    variance = cfg.variance_type
    if variance == "learned_range":
        learn_sigma, sigma_small = True, False
    elif variance in ("fixed_small", "fixed_small_log"):
        learn_sigma, sigma_small = False, True
    elif variance in ("fixed_large", "fixed_large_log"):
        learn_sigma, sigma_small = False, False
    else:
        raise UserError(
            f"{sched_path} has variance_type={variance!r}: use learned_range, fixed_small or fixed_large"
        )
    ucfg = unet.config
    if ucfg.num_class_embeds is not None or ucfg.class_embed_type is not None:
        raise UserError(f"{unet_dir} is class-conditional: only unconditional UNets are supported")
    want_out = ucfg.in_channels * (2 if learn_sigma else 1)
    if ucfg.out_channels != want_out:
        raise UserError(
            f"{unet_dir} has out_channels={ucfg.out_channels} but variance_type={variance!r} "
            f"needs {want_out}: the scheduler config does not belong to this UNet"
        )
    name, betas = _exact_betas(cfg, scheduler.betas.double().numpy())
    size = ucfg.sample_size
    return Denoiser(
        _DiffusersEps(unet),
        NoiseSchedule(name, betas),
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        rescale_timesteps=False,  # diffusers UNets are trained on the integer timesteps themselves
        in_channels=ucfg.in_channels,
        image_size=size if isinstance(size, int) else size[0],
    )


# --------------------------------------------------------------------------------------------
# classifier


class Classifier(nn.Module):
    """Maps images in [0,1] at data resolution (N,C,H,W) to logits (N, num_classes).

    Owns the preprocessing the wrapped network expects, in this order: grey-to-RGB channel
    repeat, bicubic resize (to ``size`` = (H, W), or shortest edge ``size`` = int), center crop
    to ``crop``, then ``(x - mean) / std``. Each step is skipped when its setting is None.

    The resize uses ``antialias=True``: with it torch's bicubic is PIL's bicubic (cubic
    coefficient -0.5, filter widened when downsizing), which is how Hugging Face image processors
    and timm prepared the classifiers' training data. This matters when *upsizing* too
    (32 -> 224, 256 -> 512): antialias=False switches to the -0.75 kernel and moves pixels by up
    to ~0.09 on random images.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        *,
        size: tuple[int, int] | int | None = None,
        crop: tuple[int, int] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        in_channels: int | None = None,
        hf_output: bool = False,
        antialias: bool = True,
    ):
        super().__init__()
        self.net = net
        self.num_classes = int(num_classes)
        self.size = size
        self.crop = crop
        self.in_channels = in_channels
        self.hf_output = hf_output
        self.antialias = antialias
        # Buffers follow .to(device/dtype) with the module; non-persistent: not part of any weights.
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def _target_size(self, h: int, w: int) -> tuple[int, int]:
        if isinstance(self.size, int):
            # Shortest edge to `size`, aspect kept, long side truncated as transformers does.
            short, long = (h, w) if h <= w else (w, h)
            new_long = int(self.size * long / short)
            return (self.size, new_long) if h <= w else (new_long, self.size)
        return tuple(self.size)  # type: ignore[arg-type]

    def preprocess(self, x01: Tensor) -> Tensor:
        """The network input for images in [0,1]."""
        x = x01
        if self.in_channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.size is not None:
            target = self._target_size(x.shape[-2], x.shape[-1])
            if tuple(x.shape[-2:]) != target:
                x = F.interpolate(x, size=target, mode="bicubic", align_corners=False, antialias=self.antialias)
        if self.crop is not None:
            ch, cw = self.crop
            top = (x.shape[-2] - ch) // 2
            left = (x.shape[-1] - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        if self.mean is not None:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x

    def forward(self, x01: Tensor) -> Tensor:
        x = self.preprocess(x01)
        if self.hf_output:
            return self.net(pixel_values=x).logits
        return self.net(x)


def load_classifier(
    source: str, device: Device = "cpu", input_shape: tuple[int, int, int] | None = None
) -> Classifier:
    """Load a classifier from ``hf:DIR``, ``torchscript:FILE`` or ``digits``.

    ``input_shape`` (C, H, W) is only used for TorchScript modules without an integer
    ``num_classes`` attribute: the number of classes is then read off one probe forward pass
    on zeros of that shape. TorchScript modules take [0,1] images directly, so the scripted
    module must include its own resize and normalisation.
    """
    scheme, rest = _split(source)
    if scheme == "hf":
        if not rest:
            raise UserError("hf: needs a directory: use hf:DIR")
        return _finish(_load_hf(_local(rest)), device)
    if scheme == "torchscript":
        if not rest:
            raise UserError("torchscript: needs a file: use torchscript:FILE")
        return _finish(_load_torchscript(_local(rest), input_shape), device)
    if scheme == "digits" and not rest:
        return _finish(_load_digits_classifier(), device)
    raise UserError(f"unknown classifier source {source!r}: {CLASSIFIER_SCHEMES}")


def _field(obj: Any, key: str) -> Any:
    """A field of a processor size spec: a plain dict (older transformers) or a SizeDict."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _hf_geometry(proc: Any, path: Path) -> tuple[tuple[int, int] | int | None, tuple[int, int] | None]:
    """(resize size, center crop) from an image processor, in the forms ``Classifier`` takes."""
    size: tuple[int, int] | int | None = None
    if getattr(proc, "do_resize", True):
        spec = getattr(proc, "size", None)
        if isinstance(spec, int):
            size = (spec, spec)
        elif _field(spec, "height") is not None and _field(spec, "width") is not None:
            size = (int(_field(spec, "height")), int(_field(spec, "width")))
        elif _field(spec, "shortest_edge") is not None:
            size = int(_field(spec, "shortest_edge"))
        else:
            raise UserError(
                f"{path}/preprocessor_config.json: unsupported size {spec!r}: use height/width or shortest_edge"
            )
    crop = None
    if getattr(proc, "do_center_crop", False):
        spec = getattr(proc, "crop_size", None)
        if isinstance(spec, int):
            crop = (spec, spec)
        elif _field(spec, "height") is not None:
            crop = (int(_field(spec, "height")), int(_field(spec, "width")))
    return size, crop


def _load_hf(path: str) -> Classifier:
    """A transformers image-classification model, preprocessed as its image processor says."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    root = _require_dir(path, "Hugging Face model")
    if not (root / "config.json").is_file():
        raise UserError(f"{root} has no config.json: save the model there with save_pretrained(DIR)")
    if not (root / "preprocessor_config.json").is_file():
        raise UserError(
            f"{root} has no preprocessor_config.json: save the model's image processor there "
            "(processor.save_pretrained(DIR)) so that its input size, mean and std are known"
        )
    try:
        model = AutoModelForImageClassification.from_pretrained(str(root), local_files_only=True)
        proc = AutoImageProcessor.from_pretrained(str(root), local_files_only=True)
    except Exception as exc:  # corrupt weights, unknown architecture, bad JSON
        raise UserError(f"cannot load Hugging Face classifier {root}: {_first_line(exc)}") from exc
    size, crop = _hf_geometry(proc, root)
    mean = std = None
    if getattr(proc, "do_normalize", True):
        mean = tuple(float(m) for m in proc.image_mean)
        std = tuple(float(s) for s in proc.image_std)
    return Classifier(
        model,
        model.config.num_labels,
        size=size,
        crop=crop,
        mean=mean,
        std=std,
        in_channels=getattr(model.config, "num_channels", None),
        hf_output=True,
    )


def _load_torchscript(path: str, input_shape: tuple[int, int, int] | None) -> Classifier:
    """A scripted module taking [0,1] images; num_classes from its attribute or a probe pass."""
    file = _require_file(path, "TorchScript file")
    try:
        net = torch.jit.load(str(file), map_location="cpu")
    except Exception as exc:  # not a TorchScript archive
        raise UserError(f"cannot load TorchScript file {file}: {_first_line(exc)}") from exc
    num_classes = getattr(net, "num_classes", None)
    if not isinstance(num_classes, int):
        if input_shape is None:
            raise UserError(
                f"{file}: cannot tell the number of classes: give the scripted module an int "
                "attribute num_classes, or pass the data's image shape (input_shape)"
            )
        net.eval()
        with torch.no_grad():
            num_classes = int(net(torch.zeros(1, *input_shape)).shape[-1])
    return Classifier(net, num_classes)


def _load_digits_classifier() -> Classifier:
    """The bundled 8x8 digits CNN (input (N,1,8,8) in [0,1], no preprocessing)."""
    from workers.digits import ASSET_DIR, CLASSIFIER_FILE, load_digits_classifier

    file = _digits_asset(ASSET_DIR, CLASSIFIER_FILE)
    try:
        net = load_digits_classifier(ASSET_DIR)  # strict safetensors load
    except Exception as exc:  # corrupt or stale asset: retraining fixes it
        raise _wrap(exc, file, "cannot load") from exc
    return Classifier(net, 10)


# --------------------------------------------------------------------------------------------
# provenance


def _sha256(path: Path) -> str:
    try:
        from pipeline.storage import sha256_file
    except ImportError:
        sha256_file = None
    if sha256_file is not None:
        return sha256_file(str(path))
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hash_tree(path: Path) -> dict[str, str]:
    """{relative path: sha256} for a file (its name) or every file under a directory."""
    if path.is_file():
        return {path.name: _sha256(path)}
    if path.is_dir():
        return {f.relative_to(path).as_posix(): _sha256(f) for f in sorted(path.rglob("*")) if f.is_file()}
    raise UserError(f"model file or directory not found: {path} (check the path)")


def describe_source(source: str, model_flags: str | dict | None = None) -> dict:
    """Provenance of a model source for the run manifest: {"source", "files": {relpath: sha256}}.

    ``model_flags`` (openai only) adds the flags file's hash, or the flags themselves when given
    as a dict. S3 sources are hashed from their local copy (``pipeline.storage.fetch``).
    """
    scheme, rest = _split(source)
    out: dict[str, Any] = {"source": source}
    if scheme == "digits" and not rest:
        from workers.digits import ASSET_DIR

        out["files"] = _hash_tree(Path(ASSET_DIR))
        return out
    if scheme not in ("openai", "diffusers", "hf", "torchscript") or not rest:
        raise UserError(f"unknown model source {source!r}: {DENOISER_SCHEMES}; {CLASSIFIER_SCHEMES}")
    out["files"] = _hash_tree(Path(_local(rest)))
    if scheme == "openai" and model_flags is not None:
        if isinstance(model_flags, dict):
            out["model_flags"] = dict(model_flags)
        else:
            out["files"].update(_hash_tree(Path(_local(str(model_flags)))))
    return out


__all__ = [
    "Classifier",
    "Denoiser",
    "describe_source",
    "load_classifier",
    "load_denoiser",
]
