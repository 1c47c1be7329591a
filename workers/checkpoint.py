"""Reading OpenAI checkpoints: state dicts from ``.pt``/``.pth`` (``weights_only=True``) or
``.safetensors`` files, checked key by key and shape by shape against the network the flags build.

Nothing here ever unpickles code: ``.pt`` files go through ``torch.load(..., weights_only=True)``,
and a file that needs more than tensors is refused (re-save its state_dict or convert it to
safetensors) instead of being loaded with ``weights_only=False``.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from workers.errors import first_line
from workers.unet import UNetModel, build_openai_unet

__all__ = ["is_untrusted_pickle", "load_openai_checkpoint", "read_state_dict", "untrusted_pickle_message"]


def is_untrusted_pickle(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is torch refusing a ``weights_only``
    load: the file pickles objects other than tensors. transformers and diffusers re-raise it
    with torch's text, whose advice (``weights_only=False``) must never reach a user."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def untrusted_pickle_message(what: str) -> str:
    """The one line for a weights file refused by ``weights_only`` loading."""
    return (
        f"{what} holds objects other than tensors and is not loaded (untrusted pickle): "
        "re-save its state_dict with torch.save or convert it to .safetensors"
    )


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"could not read checkpoint {path}: {first_line(exc)}") from None
    elif ext in (".pt", ".pth"):
        try:
            with warnings.catch_warnings():
                # e.g. "Detected pickle protocol 4": noise on stderr next to the one-line error.
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # torch's own message suggests weights_only=False: never for a file we did not make.
            raise ValueError(untrusted_pickle_message(f"checkpoint {path}")) from None
        except (zipfile.BadZipFile, EOFError, RuntimeError, OSError, ValueError) as exc:
            raise ValueError(f"could not read checkpoint {path} (corrupt or truncated?): {first_line(exc)}") from None
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
    state = read_state_dict(path)
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

