"""Loading the two networks of the pipeline: a diffusion denoiser and an image classifier.

Both are described by a *source* string, so that a run's configuration names them in one token:

denoisers
    ``openai:PATH`` (OpenAI improved/guided-diffusion checkpoint, .pt/.pth/.safetensors, with the
    flags it was trained with), ``diffusers:DIR`` or ``diffusers:ORG/NAME[@REVISION]`` (a
    ``UNet2DModel`` with its DDPM scheduler config, or a pipeline directory with ``unet/`` and
    ``scheduler/``), ``digits`` (the bundled demo).
classifiers
    ``hf:DIR`` or ``hf:ORG/NAME[@REVISION]`` (a transformers image-classification model with its
    image processor config), ``torchscript:FILE`` (a scripted module taking [0,1] images),
    ``digits`` (the bundled demo).

PATH/DIR may be ``s3://`` (or ``file://``) URIs; ``workers.storage.fetch`` copies them locally first.
``ORG/NAME[@REVISION]`` is a Hugging Face Hub id, resolved by ``huggingface_hub.snapshot_download``
into its standard cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``; read when the model is loaded,
so a process may change them); with ``HF_HUB_OFFLINE=1`` only the cache is used. A local
directory of that name wins over the Hub. Every loader returns a module in eval mode with
gradients off, on the requested device, without printing the libraries' progress bars or advice.
Every problem the user can fix raises ``workers.errors.UserError`` with a one-line message. The
networks themselves are in ``workers/denoiser.py`` and ``workers/classifier.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from workers import storage
from workers.checkpoint import is_untrusted_pickle, untrusted_pickle_message
from workers.classifier import Classifier
from workers.denoiser import Denoiser, DiffusersEps
from workers.errors import UserError, first_line
from workers.schedule import NoiseSchedule, openai_schedule

Device = str | torch.device
_M = TypeVar("_M", bound=nn.Module)

DENOISER_SCHEMES = "use openai:PATH, diffusers:DIR, diffusers:ORG/NAME or digits"
CLASSIFIER_SCHEMES = "use hf:DIR, hf:ORG/NAME, torchscript:FILE or digits"


# --------------------------------------------------------------------------------------------
# helpers


def _split(source: str) -> tuple[str, str]:
    """'scheme:rest' -> (scheme, rest); a bare word is a scheme with no argument (e.g. 'digits')."""
    scheme, _, rest = source.partition(":")
    return scheme.strip().lower(), rest.strip()


def _local(path: str) -> str:
    """A local path for ``path``: URIs (s3://, file://) go through ``workers.storage.fetch``."""
    if "://" in path:
        return str(storage.fetch(path))
    return path


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
# Hugging Face Hub ids

# ORG/NAME as the Hub spells repository ids (letters, digits, '-', '_', '.'), then an optional
# @REVISION (branch, tag or commit; branches may hold '/'). A namespace is required so that a
# bare word is never mistaken for a Hub id.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
# Weights of other frameworks that a repository may carry beside the PyTorch ones.
_HUB_IGNORE = ["*.msgpack", "*.h5", "*.onnx", "*.ot", "*.tflite", "*.mlmodel", "flax_model*", "tf_model*", "rust_model*"]
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class HubRef:
    """A Hugging Face Hub model id ``ORG/NAME`` and the revision asked for (None: main)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(text: str) -> HubRef | None:
    """``ORG/NAME[@REVISION]`` as a HubRef; None when ``text`` is not shaped like a Hub id."""
    m = _HUB_ID.match(text.strip())
    if m is None or "--" in m["repo"] or ".." in m["repo"] or len(m["repo"]) > 96:
        return None  # the Hub's own rules (huggingface_hub.utils.validate_repo_id)
    return HubRef(m["repo"], m["rev"])


def hub_cache_dir() -> str:
    """The Hub cache this process uses now: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` (default ``~/.cache/huggingface/hub``), as huggingface_hub
    resolves it, but read at call time (huggingface_hub reads it once, at import)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.environ[name])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return os.path.join(os.path.expanduser(home), "hub")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads (read at call time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _hub_missing(scheme: str, ref: HubRef, cache: str, why: str) -> UserError:
    return UserError(
        f"{scheme}:{ref} is neither a local directory nor in the Hugging Face cache {cache} ({why}): "
        f"run `hf download {ref.repo_id}"
        + (f" --revision {ref.revision}" if ref.revision else "")
        + "` (older huggingface_hub: `huggingface-cli download`) on a machine with network "
        "and copy its cache here, or point HF_HOME at a populated cache"
    )


def resolve_hub(scheme: str, ref: HubRef) -> tuple[Path, str]:
    """(local snapshot directory, commit sha) of a Hub model, downloading it unless offline.

    The snapshot lives in the standard cache (``hub_cache_dir()``); its directory name is the
    commit the revision resolved to, which is what a manifest records. Offline
    (``HF_HUB_OFFLINE=1``) only the cache is read: a branch or tag resolves through the cache's
    ``refs/``, a commit sha directly.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, offline = hub_cache_dir(), hub_offline()
    try:
        with quiet_loading():
            path = snapshot_download(
                ref.repo_id, revision=ref.revision, cache_dir=cache, local_files_only=offline,
                ignore_patterns=_HUB_IGNORE,
            )
    except GatedRepoError as exc:
        raise UserError(f"{scheme}:{ref} is gated on the Hugging Face Hub: accept its terms and log in (hf auth login)") from exc
    except RepositoryNotFoundError as exc:
        raise UserError(f"{scheme}:{ref}: no such model on the Hugging Face Hub (or it is private): check the id") from exc
    except RevisionNotFoundError as exc:
        raise UserError(f"{scheme}:{ref}: the Hub model has no revision {ref.revision!r}: check the branch, tag or commit") from exc
    except LocalEntryNotFoundError as exc:
        why = "HF_HUB_OFFLINE=1" if offline else "and the Hub is unreachable"
        raise _hub_missing(scheme, ref, cache, why) from exc
    except (HfHubHTTPError, OSError) as exc:  # network failures without a cached copy
        raise UserError(f"cannot fetch {scheme}:{ref} from the Hugging Face Hub: {first_line(exc)}") from exc
    snapshot = Path(path)
    return snapshot, snapshot.name


def _model_dir(scheme: str, rest: str) -> tuple[str, str | None]:
    """(local path, Hub commit or None) for the argument of an ``hf:``/``diffusers:`` source.

    URIs are fetched (``workers.storage.fetch``); an existing local path wins; otherwise an
    ``ORG/NAME[@REVISION]`` is resolved on the Hub. Anything else is returned as is, for the
    loader's own "not found" message.
    """
    if "://" in rest:
        return _local(rest), None
    if Path(rest).exists():
        return rest, None
    ref = parse_hub_id(rest)
    if ref is None:
        return rest, None
    snapshot, commit = resolve_hub(scheme, ref)
    return str(snapshot), commit


def pin_source(source: str | None) -> str | None:
    """The source with a Hub id's revision replaced by the commit it resolves to now.

    ``hf:ORG/NAME`` -> ``hf:ORG/NAME@<commit sha>``, so that every worker of a run loads the
    files the manifest describes even if the branch moves during the run. Every other source
    (local paths, URIs, ``openai:``, ``torchscript:``, ``digits``, None) is returned unchanged.
    """
    if source is None:
        return None
    scheme, rest = _split(source)
    if scheme not in ("hf", "diffusers") or not rest or "://" in rest or Path(rest).exists():
        return source
    ref = parse_hub_id(rest)
    if ref is None:
        return source
    _, commit = resolve_hub(scheme, ref)
    return f"{scheme}:{ref.repo_id}@{commit}"


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """For the duration: transformers, diffusers and huggingface_hub log errors only and show no
    progress bars (weight-loading bars, "install accelerate" advice); their previous settings are
    restored afterwards, so a user's own verbosity choices survive a load."""
    restore: list[Any] = []
    try:
        for name in ("transformers.utils.logging", "diffusers.utils.logging"):
            try:
                lib = __import__(name, fromlist=["get_verbosity"])
            except ImportError:
                continue
            level, bars = lib.get_verbosity(), lib.is_progress_bar_enabled()
            lib.set_verbosity(lib.ERROR)
            lib.disable_progress_bar()
            restore.append(lambda lib=lib, level=level, bars=bars: (
                lib.set_verbosity(level), lib.enable_progress_bar() if bars else None))
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if not are_progress_bars_disabled():
            disable_progress_bars()
            restore.append(enable_progress_bars)
        yield
    finally:
        for undo in reversed(restore):
            undo()


# --------------------------------------------------------------------------------------------
# denoiser


def load_denoiser(source: str, model_flags: str | dict | None = None, device: Device = "cpu") -> Denoiser:
    """Load a denoiser from ``openai:PATH`` (needs ``model_flags``), ``diffusers:DIR`` or ``digits``.

    ``model_flags``: the OpenAI script_util flags the checkpoint was trained with, as a dict or
    a JSON file (either the flags themselves or an object with a ``flags`` key; parsed by
    ``workers.unet_flags.unet_flags_from_json``). Ignored for the other schemes.
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
            raise UserError("diffusers: needs a directory or a Hub id: use diffusers:DIR or diffusers:ORG/NAME")
        return _finish(_load_diffusers(_model_dir("diffusers", rest)[0]), device)
    if scheme == "digits" and not rest:
        from workers.digits import ASSET_DIR, DENOISER_FILE, DENOISER_FLAGS_FILE

        ckpt = _digits_asset(ASSET_DIR, DENOISER_FILE)
        flags = _digits_asset(ASSET_DIR, DENOISER_FLAGS_FILE)
        return _finish(_load_openai(str(ckpt), str(flags)), device)
    raise UserError(f"unknown denoiser source {source!r}: {DENOISER_SCHEMES}")


def _wrap(exc: BaseException, path: Path | str, what: str) -> UserError:
    """A one-line UserError for ``exc`` that names ``path`` (unet.py's messages usually do already)."""
    msg = first_line(exc)
    return UserError(msg if str(path) in msg else f"{what} {path}: {msg}")


def read_model_flags(model_flags: str | dict) -> dict:
    """The OpenAI flags of ``model_flags`` (a dict, or a JSON file, local or URI) as a dict;
    UserError naming the file when it is missing or not a flags file."""
    return _openai_flags(model_flags)


def _openai_flags(model_flags: str | dict) -> dict:
    from workers.unet_flags import unet_flags_from_json

    if isinstance(model_flags, dict):
        return dict(model_flags)
    path = _require_file(_local(str(model_flags)), "model flags file")
    try:
        return unet_flags_from_json(str(path))
    except (ValueError, OSError) as exc:
        raise _wrap(exc, path, "cannot read model flags") from exc


def _load_openai(path: str, model_flags: str | dict) -> Denoiser:
    """Build the OpenAI UNet from its flags, load the checkpoint strictly, attach its schedule."""
    from workers.checkpoint import load_openai_checkpoint
    from workers.unet_flags import diffusion_settings

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
        with quiet_loading():
            scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(str(sched_path.parent)))
            unet = UNet2DModel.from_pretrained(str(root), subfolder=subfolder, local_files_only=True)
    except Exception as exc:  # corrupt weights or config: the user must fix the directory
        if is_untrusted_pickle(exc):
            raise UserError(untrusted_pickle_message(f"the weights of diffusers model {root}")) from None
        raise UserError(f"cannot load diffusers model {root}: {first_line(exc)}") from exc
    return denoiser_from_diffusers(unet, scheduler, unet_where=str(unet_dir), scheduler_where=str(sched_path))


def denoiser_from_diffusers(unet: nn.Module, scheduler: Any, *, unet_where: str = "the UNet",
                            scheduler_where: str = "the scheduler") -> Denoiser:
    """A ``Denoiser`` around an in-memory diffusers ``UNet2DModel`` and the ``DDPMScheduler`` it
    was trained with (the same checks and settings as ``diffusers:DIR``).

    UserError (naming ``unet_where``/``scheduler_where``) for what the sampler cannot run:
    class-conditional UNets, predictions other than epsilon, unknown variance types, or an
    output width that does not match the scheduler's variance type.
    """
    cfg = scheduler.config
    if cfg.prediction_type != "epsilon":
        raise UserError(
            f"{scheduler_where} has prediction_type={cfg.prediction_type!r}: only 'epsilon' models are supported"
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
            f"{scheduler_where} has variance_type={variance!r}: use learned_range, fixed_small or fixed_large"
        )
    ucfg = unet.config
    if ucfg.num_class_embeds is not None or ucfg.class_embed_type is not None:
        raise UserError(f"{unet_where} is class-conditional: only unconditional UNets are supported")
    want_out = ucfg.in_channels * (2 if learn_sigma else 1)
    if ucfg.out_channels != want_out:
        raise UserError(
            f"{unet_where} has out_channels={ucfg.out_channels} but variance_type={variance!r} "
            f"needs {want_out}: the scheduler config does not belong to this UNet"
        )
    name, betas = _exact_betas(cfg, scheduler.betas.double().numpy())
    size = ucfg.sample_size
    return Denoiser(
        DiffusersEps(unet),
        NoiseSchedule(name, betas),
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        rescale_timesteps=False,  # diffusers UNets are trained on the integer timesteps themselves
        in_channels=ucfg.in_channels,
        image_size=size if isinstance(size, int) else size[0],
    )


def denoiser_from_openai(net: nn.Module, model_flags: str | dict) -> Denoiser:
    """A ``Denoiser`` around an in-memory OpenAI ``workers.unet.UNetModel`` and the flags it was
    trained with (a dict or a JSON file, as ``--model-flags``): the sampling chain and variance
    settings come from the flags exactly as for ``openai:PATH``. UserError for bad flags or a
    class-conditional network."""
    from workers.unet_flags import diffusion_settings

    flags = _openai_flags(model_flags)
    try:
        settings = diffusion_settings(flags)
        schedule = openai_schedule(settings.noise_schedule, settings.diffusion_steps, settings.timestep_respacing)
    except ValueError as exc:
        raise UserError(f"bad model flags: {first_line(exc)}") from exc
    if getattr(net, "num_classes", None) is not None:
        raise UserError("the UNet is class-conditional (class_cond): only unconditional models are supported")
    return Denoiser.from_openai(net, settings, schedule)


# --------------------------------------------------------------------------------------------
# classifier


def load_classifier(
    source: str,
    device: Device = "cpu",
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
) -> Classifier:
    """Load a classifier from ``hf:DIR``, ``hf:ORG/NAME[@REVISION]``, ``torchscript:FILE`` or ``digits``.

    TorchScript modules take [0,1] images directly, so the scripted module must include its own
    resize and normalisation. Their number of classes is their integer ``num_classes``
    attribute, else ``num_classes`` when given, else the width of one probe forward pass on
    zeros of ``input_shape`` (C, H, W).
    """
    scheme, rest = _split(source)
    if scheme == "hf":
        if not rest:
            raise UserError("hf: needs a directory or a Hub id: use hf:DIR or hf:ORG/NAME")
        return _finish(_load_hf(_model_dir("hf", rest)[0]), device)
    if scheme == "torchscript":
        if not rest:
            raise UserError("torchscript: needs a file: use torchscript:FILE")
        return _finish(_load_torchscript(_local(rest), input_shape, num_classes), device)
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
        with quiet_loading():
            model = AutoModelForImageClassification.from_pretrained(str(root), local_files_only=True)
            proc = AutoImageProcessor.from_pretrained(str(root), local_files_only=True)
    except Exception as exc:  # corrupt weights, unknown architecture, bad JSON
        if is_untrusted_pickle(exc):
            raise UserError(untrusted_pickle_message(f"the weights of Hugging Face classifier {root}")) from None
        raise UserError(f"cannot load Hugging Face classifier {root}: {first_line(exc)}") from exc
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
        labels=_hf_labels(model.config),
    )


def _hf_labels(config: Any) -> tuple[str, ...] | None:
    """Class names from ``id2label``, unless they are transformers' placeholders (LABEL_0, ...)."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(int(config.num_labels))]
    if not any(names) or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return tuple(names)


def _load_torchscript(path: str, input_shape: tuple[int, int, int] | None, num_classes: int | None = None) -> Classifier:
    """A scripted module taking [0,1] images; num_classes from its attribute, the caller or a probe pass."""
    file = _require_file(path, "TorchScript file")
    try:
        net = torch.jit.load(str(file), map_location="cpu")
    except Exception as exc:  # not a TorchScript archive
        raise UserError(f"cannot load TorchScript file {file}: {first_line(exc)}") from exc
    attribute = getattr(net, "num_classes", None)
    if isinstance(attribute, int):
        num_classes = attribute
    elif num_classes is None:
        if input_shape is None:
            raise UserError(
                f"{file}: cannot tell the number of classes: give the scripted module an int "
                "attribute num_classes, or pass the data's image shape (input_shape) or num_classes"
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


def _hash_tree(path: Path) -> dict[str, str]:
    """{relative path: sha256} for a file (its name) or every file under a directory."""
    if path.is_file():
        return {path.name: storage.sha256_file(str(path))}
    if path.is_dir():
        return {f.relative_to(path).as_posix(): storage.sha256_file(str(f)) for f in sorted(path.rglob("*")) if f.is_file()}
    raise UserError(f"model file or directory not found: {path} (check the path)")


def describe_source(source: str, model_flags: str | dict | None = None) -> dict:
    """Provenance of a model source for the run manifest: {"source", "files": {relpath: sha256}}.

    Hub ids (``hf:ORG/NAME[@REVISION]``, ``diffusers:...``) add ``"revision"``: the commit sha the
    id resolved to, whose snapshot the files are hashed from. ``model_flags`` (openai only) adds
    the flags file's hash, or the flags themselves when given as a dict. S3 sources are hashed
    from their local copy (``workers.storage.fetch``).
    """
    scheme, rest = _split(source)
    out: dict[str, Any] = {"source": source}
    if scheme == "digits" and not rest:
        from workers.digits import ASSET_DIR

        out["files"] = _hash_tree(Path(ASSET_DIR))
        return out
    if scheme not in ("openai", "diffusers", "hf", "torchscript") or not rest:
        raise UserError(f"unknown model source {source!r}: {DENOISER_SCHEMES}; {CLASSIFIER_SCHEMES}")
    if scheme in ("hf", "diffusers"):
        path, commit = _model_dir(scheme, rest)
        if commit is not None:
            out["revision"] = commit
    else:
        path = _local(rest)
    out["files"] = _hash_tree(Path(path))
    if scheme == "openai" and model_flags is not None:
        if isinstance(model_flags, dict):
            out["model_flags"] = dict(model_flags)
        else:
            out["files"].update(_hash_tree(Path(_local(str(model_flags)))))
    return out


__all__ = [
    "Classifier",
    "Denoiser",
    "HubRef",
    "denoiser_from_diffusers",
    "denoiser_from_openai",
    "describe_source",
    "hub_cache_dir",
    "hub_offline",
    "load_classifier",
    "load_denoiser",
    "parse_hub_id",
    "pin_source",
    "quiet_loading",
    "read_model_flags",
    "resolve_hub",
]
