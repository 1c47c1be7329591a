"""``densepure purify``: what purification does to one image, as numbers and as a picture."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.stats import validate_sigma
from workers import storage
from workers.errors import UserError
from workers.purify import PurifySpec
from workers.seeds import draw_seeds


def _load_image(path: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"input image not found: {path} (pass a .npy file of shape (C,H,W))")
    try:
        image = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise UserError(f"cannot read {path} as a .npy array ({str(exc).splitlines()[0]}): save it with numpy.save") from None
    if image.ndim != 3 or not np.issubdtype(image.dtype, np.floating):
        raise UserError(f"{path} has shape {image.shape} and dtype {image.dtype}: expected a (C,H,W) float array in [0,1]")
    if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise UserError(f"{path} has values outside [0,1]: scale the image into [0,1] first")
    return image.astype(np.float32)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def write_grid(path: str, images: list[np.ndarray], titles: list[str]) -> None:
    """A one-row PNG of (C,H,W) images in [0,1] with titles (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(1.6 * len(images), 1.9), squeeze=False)
    for ax, img, title in zip(axes[0], images, titles):
        arr = np.clip(img, 0, 1).transpose(1, 2, 0)
        ax.imshow(arr[..., 0] if arr.shape[2] == 1 else arr, cmap="gray" if arr.shape[2] == 1 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def run_purify(
    denoiser: str, model_flags: str | None, sigma: float, steps: int, samples: int, seed: int,
    input_path: str, output_path: str, grid_path: str | None, device: str = "auto",
) -> str:
    """Purify ``samples`` noisy copies of one image; write them (and a grid); return a summary."""
    from workers.engine import Engine
    from workers.models import load_denoiser
    from workers.worker import resolve_device

    validate_sigma(sigma)
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if samples < 1:
        raise UserError(f"--samples must be >= 1, got {samples}")
    image = _load_image(input_path)
    model = load_denoiser(denoiser, model_flags, device="cpu")
    expected = (model.in_channels, model.image_size, model.image_size)
    if image.shape != expected:
        raise UserError(f"{input_path} has shape {image.shape} but the denoiser takes {expected}: resize or pick the matching denoiser")
    dev = resolve_device(device)
    spec = PurifySpec("dds" if steps == 1 else "densepure", sigma, steps, 1)
    seeds = draw_seeds(seed, 0, sigma, "purify", 0, samples)
    engine = Engine(None, model, device=dev)
    out = engine.purify(image, spec, seeds)[:, 0].cpu().numpy().astype(np.float32)
    noisy = engine.purify(image, PurifySpec("cohen", sigma), seeds[:1])[0, 0].cpu().numpy()

    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(output_path, _npy_bytes(out))
    if grid_path:
        write_grid(grid_path, [image, noisy] + list(out[:8]), ["input", f"noisy s={sigma:g}"] + [f"sample {i}" for i in range(min(8, samples))])
    t_star = engine.purifier(spec).t_star
    lines = [
        f"{spec.method} sigma={sigma:g} steps={steps} t*={t_star:.2f} samples={samples} -> {output_path}",
        f"PSNR to input: noisy {_psnr(np.clip(noisy, 0, 1), image):.2f} dB, purified mean {np.mean([_psnr(o, image) for o in out]):.2f} dB",
        f"purified mean abs diff to input {float(np.abs(out - image).mean()):.4f}; between samples (std) {float(out.std(axis=0).mean()):.4f}",
    ]
    if grid_path:
        lines.append(f"grid: {grid_path}")
    return "\n".join(lines)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()

