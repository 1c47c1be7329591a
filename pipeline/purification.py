"""``densepure purify``: what purification does to one image, as numbers and as a picture."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stats import validate_sigma
from workers import storage
from workers.errors import UserError
from workers.purify import PurifySpec
from workers.seeds import draw_seeds


_NPY_MAGIC = b"\x93NUMPY"
# Pillow modes of single-channel images: they stay one channel (as the Parquet datasets read them).
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
GRID_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
"""The grid's file format, from its suffix."""


def load_image(path: str) -> np.ndarray:
    """A (C, H, W) float32 image in [0, 1] from a ``.npy`` array or an image file (PNG, JPEG, any
    format Pillow reads); the format is told by the file's content, not its name. Grey images
    stay one channel, others become RGB. UserError (one line) for anything else.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"input image not found: {path} (give a .npy (C,H,W) array in [0,1] or a PNG/JPEG image)")
    with open(p, "rb") as fh:
        head = fh.read(len(_NPY_MAGIC))
    if head == _NPY_MAGIC:
        try:
            image = np.load(p, allow_pickle=False)
        except Exception as exc:  # object arrays, truncated files: say what to write instead
            raise UserError(f"cannot read {path} as a .npy array of numbers: save a float (C,H,W) array with numpy.save") from exc
    else:
        image = _read_picture(p)
    if image.ndim != 3 or not np.issubdtype(image.dtype, np.floating):
        raise UserError(f"{path} has shape {image.shape} and dtype {image.dtype}: expected a (C,H,W) float array in [0,1]")
    if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise UserError(f"{path} has values outside [0,1]: scale the image into [0,1] first")
    return image.astype(np.float32)


def _read_picture(p: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as picture:
            picture.load()
            picture = picture.convert("L" if picture.mode in _GREY_MODES else "RGB")
            array = np.asarray(picture, dtype=np.float32) / np.float32(255.0)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(
            f"cannot read {p} as a .npy array or an image: save it with numpy.save ((C,H,W) floats in [0,1]) or as PNG/JPEG"
        ) from exc
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def check_grid_path(path: str) -> str:
    """The grid's format ("png" or "jpeg") from the suffix of a writable local ``path``; UserError otherwise."""
    from pipeline.analysis import check_local_output

    fmt = GRID_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"the grid {path} must be a .png, .jpg or .jpeg file (its suffix sets the format)")
    check_local_output(path, "grid image")
    return fmt


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def write_grid(path: str, images: list[np.ndarray], titles: list[str]) -> None:
    """A one-row picture of (C,H,W) images in [0,1] with titles, as PNG or JPEG by ``path``'s suffix.

    Rendered on a standalone matplotlib Figure (Agg canvas: no display, the caller's pyplot
    state untouched) and written atomically (temp file, then rename).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fmt = check_grid_path(path)
    fig = Figure(figsize=(1.6 * len(images), 1.9))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(images), squeeze=False)
    for ax, img, title in zip(axes[0], images, titles):
        arr = np.clip(img, 0, 1).transpose(1, 2, 0)
        ax.imshow(arr[..., 0] if arr.shape[2] == 1 else arr, cmap="gray" if arr.shape[2] == 1 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        fig.savefig(tmp, dpi=120, format=fmt)
        tmp.replace(target)
    finally:
        if tmp.exists():
            tmp.unlink()


def run_purify(
    denoiser: str, model_flags: str | None, sigma: float, steps: int, samples: int, seed: int,
    input_path: str, output_path: str, grid_path: str | None, device: str = "auto", classifier: str | None = None,
) -> str:
    """Purify ``samples`` noisy copies of one image; write them (and a grid); return a summary.

    Everything the user gives is checked (values, files, the grid's path and format, the
    image against the denoiser's channels and size) before a network runs. With
    ``classifier``, the input, the noisy copy and every sample are labelled by it, in the grid
    and in the summary.
    """
    from workers.engine import Engine
    from workers.models import load_classifier, load_denoiser
    from workers.worker import resolve_device

    validate_sigma(sigma)
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if samples < 1:
        raise UserError(f"--samples must be >= 1, got {samples}")
    if grid_path:
        check_grid_path(grid_path)
    image = load_image(input_path)
    model = load_denoiser(denoiser, model_flags, device="cpu")
    _check_fits(input_path, image.shape, model.in_channels, model.image_size)
    clf = load_classifier(classifier, device="cpu", input_shape=tuple(image.shape)) if classifier else None
    dev = resolve_device(device)
    spec = PurifySpec("dds" if steps == 1 else "densepure", sigma, steps, 1)
    seeds = draw_seeds(seed, 0, sigma, "purify", 0, samples)
    engine = Engine(clf, model, device=dev)
    out = engine.purify(image, spec, seeds)[:, 0].cpu().numpy().astype(np.float32)
    noisy = engine.purify(image, PurifySpec("cohen", sigma), seeds[:1])[0, 0].cpu().numpy()

    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(output_path, _npy_bytes(out))
    shown = min(8, samples)
    titles = ["input", f"noisy s={sigma:g}"] + [f"sample {i}" for i in range(shown)]
    names: list[str] = []
    if clf is not None:
        names = _labels(engine, np.concatenate([image[None], np.clip(noisy, 0, 1)[None], out]))
        titles = [f"{t}: {n}" for t, n in zip(titles, names)]
    if grid_path:
        write_grid(grid_path, [image, noisy] + list(out[:shown]), titles)
    t_star = engine.purifier(spec).t_star
    lines = [
        f"{spec.method} sigma={sigma:g} steps={steps} t*={t_star:.2f} samples={samples} -> {output_path}",
        f"PSNR to input: noisy {_psnr(np.clip(noisy, 0, 1), image):.2f} dB, purified mean {np.mean([_psnr(o, image) for o in out]):.2f} dB",
        f"purified mean abs diff to input {float(np.abs(out - image).mean()):.4f}; between samples (std) {float(out.std(axis=0).mean()):.4f}",
    ]
    if names:
        lines.append(f"classifier {classifier}: input {names[0]}, noisy {names[1]}, samples {', '.join(names[2:])}")
    if grid_path:
        lines.append(f"grid: {grid_path}")
    return "\n".join(lines)


def _check_fits(path: str, shape: tuple[int, ...], channels: int, size: int) -> None:
    """The image must have the denoiser's channels (said first: resizing cannot fix them) and size."""
    if shape[0] != channels:
        fix = "convert it to RGB" if channels == 3 else ("convert it to grey" if channels == 1 else f"give {channels} channels")
        raise UserError(
            f"{path} has {shape[0]} channel{'s' if shape[0] != 1 else ''} but the denoiser takes {channels}: "
            f"{fix}, or pick a denoiser trained on such images"
        )
    if tuple(shape[1:]) != (size, size):
        raise UserError(
            f"{path} has shape {tuple(shape)} but the denoiser takes {(channels, size, size)}: resize it to "
            f"{size}x{size} or pick the matching denoiser"
        )


def _labels(engine: "Any", images: np.ndarray) -> list[str]:
    """The engine's classifier's label (index, and name when known) of each (C,H,W) image."""
    import torch

    with torch.inference_mode():
        logits = engine.classifier(torch.as_tensor(images, device=engine.device))
    return [engine.classifier.label_name(int(i)) for i in logits.float().argmax(dim=1).tolist()]


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()

