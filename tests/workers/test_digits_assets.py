"""Sanity checks of the bundled digits demo models in workers/assets/digits/."""

from __future__ import annotations

import json

import pytest
import torch

from workers.digits import (
    ASSET_DIR,
    CLASSIFIER_FILE,
    DENOISER_FILE,
    DENOISER_FLAGS_FILE,
    DIGITS_UNET_FLAGS,
    DigitsCNN,
    digits_split_indices,
    load_digits_classifier,
    load_digits_data,
    load_digits_denoiser,
)
from workers.schedule import NoiseSchedule
from workers.unet_flags import unet_flags_from_json
from workers.checkpoint import load_openai_checkpoint


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    _, _, x_test, y_test = load_digits_data()
    return x_test, y_test


def test_split_is_fixed_and_disjoint() -> None:
    train, test = digits_split_indices()
    assert len(train) == 1500 and len(test) == 297
    assert not set(train.tolist()) & set(test.tolist())
    # Pins the permutation: if torch ever changed randperm's stream, the held-out set (and every
    # number in MODEL_CARD.md) would silently change with it.
    assert test[:8].tolist() == [1643, 1304, 1095, 1659, 395, 289, 878, 168]
    x_train, y_train, x_test, y_test = load_digits_data()
    assert x_train.shape == (1500, 1, 8, 8) and x_test.shape == (297, 1, 8, 8)
    assert x_train.dtype == torch.float32 and 0.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0
    assert y_train.dtype == torch.int64 and set(y_test.tolist()) == set(range(10))


def test_assets_exist_and_are_small() -> None:
    names = (DENOISER_FILE, DENOISER_FLAGS_FILE, CLASSIFIER_FILE, "MODEL_CARD.md")
    for name in names:
        assert (ASSET_DIR / name).is_file(), f"missing {ASSET_DIR / name}: run scripts/train_digits.py"
    assert sum((ASSET_DIR / name).stat().st_size for name in names) < 5_000_000


def test_denoiser_loads_strictly_with_its_flags() -> None:
    flags = unet_flags_from_json(ASSET_DIR / DENOISER_FLAGS_FILE)
    assert flags == DIGITS_UNET_FLAGS
    model = load_openai_checkpoint(ASSET_DIR / DENOISER_FILE, flags)
    assert not model.training
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 8, 8), torch.tensor([10.0, 500.0]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    assert json.loads((ASSET_DIR / DENOISER_FLAGS_FILE).read_text()) == DIGITS_UNET_FLAGS


def test_classifier_loads_strictly_and_is_accurate(held_out: tuple[torch.Tensor, torch.Tensor]) -> None:
    from safetensors.torch import load_file

    model = DigitsCNN()
    model.load_state_dict(load_file(str(ASSET_DIR / CLASSIFIER_FILE)), strict=True)
    x_test, y_test = held_out
    with torch.no_grad():
        accuracy = (load_digits_classifier()(x_test).argmax(dim=1) == y_test).float().mean().item()
    assert accuracy >= 0.95


def test_one_shot_denoising_beats_noisy_inputs(held_out: tuple[torch.Tensor, torch.Tensor]) -> None:
    """At sigma 0.5 the clean classifier on one-shot-denoised inputs must beat it on noisy ones."""
    x, y = held_out
    unet, _ = load_digits_denoiser()
    classifier = load_digits_classifier()
    abar = torch.tensor(NoiseSchedule.from_name("linear", 1000).alphas_cumprod, dtype=torch.float64)
    sigma = 0.5
    t = int((((1 - abar) / abar).sqrt() - 2 * sigma).abs().argmin())
    a = abar[t].float()
    delta = sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x_t = a.sqrt() * (2 * (x + delta) - 1)
        eps = unet(x_t, torch.full((x.shape[0],), float(t)))
        x0 = ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        denoised = (classifier((x0 + 1) / 2).argmax(dim=1) == y).float().mean().item()
        noisy = (classifier(x + delta).argmax(dim=1) == y).float().mean().item()
    assert denoised > noisy + 0.05
