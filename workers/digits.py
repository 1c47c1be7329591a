"""The bundled digits demo: 8x8 scikit-learn digits, a small OpenAI-UNet denoiser and a small CNN.

Everything here runs offline: the data ship with scikit-learn and the trained weights ship in
``workers/assets/digits/`` (made by ``scripts/train_digits.py``; see the MODEL_CARD.md there).

Data split: a fixed permutation of the 1797 images of ``sklearn.datasets.load_digits()``,
``torch.randperm(1797, generator=torch.Generator().manual_seed(0))``; its first 1500 entries are
the training set, the remaining 297 the held-out set (:func:`digits_split_indices`). Shuffled
rather than cut in scikit-learn's order because that order groups writers: the last 297 images come
from writers the first 1500 never show, which costs a clean classifier about four points of
held-out accuracy (94-96% instead of 98%) without telling anything about purification.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.checkpoint import load_openai_checkpoint
from workers.unet import UNetModel
from workers.unet_flags import unet_flags_from_json

__all__ = [
    "ASSET_DIR",
    "CLASSIFIER_FILE",
    "DENOISER_FILE",
    "DENOISER_FLAGS_FILE",
    "DIGITS_UNET_FLAGS",
    "NUM_IMAGES",
    "NUM_TRAIN",
    "SPLIT_SEED",
    "DigitsCNN",
    "digits_split_indices",
    "load_digits_classifier",
    "load_digits_data",
    "load_digits_denoiser",
]

ASSET_DIR: Path = Path(__file__).resolve().parent / "assets" / "digits"
DENOISER_FILE = "denoiser.safetensors"
DENOISER_FLAGS_FILE = "denoiser_flags.json"
CLASSIFIER_FILE = "classifier.safetensors"

NUM_IMAGES = 1797
# The first NUM_TRAIN images of the split permutation train the models; the rest are held out.
NUM_TRAIN = 1500
SPLIT_SEED = 0

# OpenAI UNet for 1-channel 8x8 images, named as in script_util. Two levels (8x8, 4x4); the
# attention flag is a feature-map *resolution* as in script_util ("4" -> the 4x4 level, i.e. a
# downsampling rate of 8 // 4 = 2), so attention runs in the 4x4 blocks and the middle block.
# 32 base channels because GroupNorm uses 32 groups. Epsilon-only output on the linear schedule.
# One res block per level rather than two: it reaches the same training loss (~0.076) here, and
# its 30% cheaper forward pass matters because DensePure's reverse passes dominate the demo's time.
DIGITS_UNET_FLAGS: dict[str, Any] = {
    "image_size": 8,
    "in_channels": 1,
    "num_channels": 32,
    "channel_mult": "1,2",
    "num_res_blocks": 1,
    "attention_resolutions": "4",
    "num_heads": 4,
    "num_head_channels": 16,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_new_attention_order": False,
    "dropout": 0.0,
    "class_cond": False,
    "learn_sigma": False,
    "sigma_small": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": True,
    "rescale_learned_sigmas": False,
}


class DigitsCNN(nn.Module):
    """Small classifier for (N, 1, 8, 8) digits with values in [0, 1]; returns 10 logits.

    Two 3x3 convolutions (32 and 64 channels, same padding), one 2x2 max-pool, then a 128-unit
    hidden layer and the 10-way output.
    """

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.fc1(h.flatten(1)))
        return self.fc2(h)


def digits_split_indices() -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into scikit-learn's digits of the training (1500) and held-out (297) images.

    The fixed permutation described in the module docstring; the same on every machine.
    """
    perm = torch.randperm(NUM_IMAGES, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[:NUM_TRAIN], perm[NUM_TRAIN:]


def load_digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``.

    Images are float32 of shape (N, 1, 8, 8) scaled from 0..16 into [0, 1]; labels are int64.
    Split by :func:`digits_split_indices`: 1500 training images, 297 held out, held-out images in
    permutation order (so ``x_test[:50]`` is a fixed, class-mixed subset).
    """
    # Imported here so that importing this module stays cheap for workers that only need the
    # network definitions.
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy((np.asarray(digits.images, dtype=np.float32) / 16.0)[:, None])
    labels = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    if images.shape[0] != NUM_IMAGES:
        raise RuntimeError(f"expected {NUM_IMAGES} digits from scikit-learn, got {images.shape[0]}")
    train, test = digits_split_indices()
    return images[train], labels[train], images[test], labels[test]


def load_digits_denoiser(asset_dir: str | Path = ASSET_DIR) -> tuple[UNetModel, dict[str, Any]]:
    """The bundled denoiser (float32, eval mode) and its flags, loaded strictly."""
    asset_dir = Path(asset_dir)
    flags = unet_flags_from_json(asset_dir / DENOISER_FLAGS_FILE)
    return load_openai_checkpoint(asset_dir / DENOISER_FILE, flags), flags


def load_digits_classifier(asset_dir: str | Path = ASSET_DIR) -> DigitsCNN:
    """The bundled clean-trained classifier (float32, eval mode), loaded strictly."""
    from safetensors.torch import load_file

    path = Path(asset_dir) / CLASSIFIER_FILE
    if not path.exists():
        raise FileNotFoundError(f"digits classifier not found: {path} (run scripts/train_digits.py)")
    model = DigitsCNN()
    model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    return model.eval()
