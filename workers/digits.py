"""The bundled digits demo: 8x8 scikit-learn digits, a small OpenAI-UNet denoiser and a small CNN.

Everything here runs offline: the data ship with scikit-learn and the trained weights ship in
``workers/assets/digits/`` (made by ``scripts/train_digits.py``; see the MODEL_CARD.md there).

Data split: the first 1500 images of ``sklearn.datasets.load_digits()`` in the order scikit-learn
returns them are the training set, the remaining 297 the held-out set. There is no shuffling, so
the split is the same on every machine and needs no seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.unet import UNetModel, load_openai_checkpoint, unet_flags_from_json

__all__ = [
    "ASSET_DIR",
    "CLASSIFIER_FILE",
    "DENOISER_FILE",
    "DENOISER_FLAGS_FILE",
    "DIGITS_UNET_FLAGS",
    "NUM_TRAIN",
    "DigitsCNN",
    "load_digits_classifier",
    "load_digits_data",
    "load_digits_denoiser",
]

ASSET_DIR: Path = Path(__file__).resolve().parent / "assets" / "digits"
DENOISER_FILE = "denoiser.safetensors"
DENOISER_FLAGS_FILE = "denoiser_flags.json"
CLASSIFIER_FILE = "classifier.safetensors"

# Images [0, NUM_TRAIN) train the models; [NUM_TRAIN, 1797) are held out for evaluation.
NUM_TRAIN = 1500

# OpenAI UNet for 1-channel 8x8 images, named as in script_util. Two levels (8x8, 4x4); the
# attention flag is a feature-map *resolution* as in script_util ("4" -> the 4x4 level, i.e. a
# downsampling rate of 8 // 4 = 2), so attention runs in the 4x4 blocks and the middle block.
# 32 base channels because GroupNorm uses 32 groups. Epsilon-only output on the linear schedule.
DIGITS_UNET_FLAGS: dict[str, Any] = {
    "image_size": 8,
    "in_channels": 1,
    "num_channels": 32,
    "channel_mult": "1,2",
    "num_res_blocks": 2,
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


def load_digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``.

    Images are float32 of shape (N, 1, 8, 8) scaled from 0..16 into [0, 1]; labels are int64.
    Fixed split without shuffling: the first 1500 images train, the other 297 are held out.
    """
    # Imported here so that importing this module stays cheap for workers that only need the
    # network definitions.
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy((np.asarray(digits.images, dtype=np.float32) / 16.0)[:, None])
    labels = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    return images[:NUM_TRAIN], labels[:NUM_TRAIN], images[NUM_TRAIN:], labels[NUM_TRAIN:]


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
