"""One-line errors for inputs that used to surface library text: pickled weights that
``weights_only`` loading refuses, and images of a dataset that are corrupt or of another size
(``workers.data.check_images``, run in preflight)."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from tests.fixtures.models import TINY
from workers import data as data_mod
from workers.data import check_images, load_dataset
from workers.errors import UserError
from workers.models import load_classifier, load_denoiser
from workers.unet import build_openai_unet


class Payload:
    """A class instance inside a checkpoint: weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.note = "not a tensor"


def _assert_refused_cleanly(message: str) -> None:
    assert "\n" not in message
    assert "holds objects other than tensors" in message
    assert "re-save its state_dict" in message and ".safetensors" in message
    assert "weights_only" not in message and "if you trust" not in message and "\x1b" not in message


# --------------------------------------------------------------------------
# weights_only refusals
# --------------------------------------------------------------------------


def test_openai_checkpoint_with_a_pickled_object(tmp_path: Path) -> None:
    torch.manual_seed(0)
    flags = {**TINY, "learn_sigma": False}
    state = build_openai_unet(flags).state_dict()
    state["extra"] = Payload()
    ckpt = tmp_path / "model.pt"
    torch.save(state, ckpt)
    flags_file = tmp_path / "flags.json"
    flags_file.write_text(json.dumps(flags))
    with pytest.raises(UserError) as info:
        load_denoiser(f"openai:{ckpt}", str(flags_file))
    _assert_refused_cleanly(str(info.value))
    assert str(ckpt) in str(info.value)


def test_hf_classifier_with_pickled_weights(tmp_path: Path) -> None:
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    model = ResNetForImageClassification(
        ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=10)
    )
    root = tmp_path / "hf"
    model.save_pretrained(root, safe_serialization=False)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root)
    state = model.state_dict()
    state["extra"] = Payload()
    for name in ("model.safetensors", "pytorch_model.bin"):
        (root / name).unlink(missing_ok=True)
    torch.save(state, root / "pytorch_model.bin")
    with pytest.raises(UserError) as info:
        load_classifier(f"hf:{root}")
    _assert_refused_cleanly(str(info.value))


# --------------------------------------------------------------------------
# check_images
# --------------------------------------------------------------------------


def _png(size: tuple[int, int], mode: str = "RGB", value: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def _parquet(tmp_path: Path, images: list[bytes]) -> str:
    path = tmp_path / "images.parquet"
    pd.DataFrame({"image": images, "label": [i % 3 for i in range(len(images))]}).to_parquet(path)
    return f"parquet:{path}"


def test_check_images_accepts_a_clean_parquet(tmp_path: Path) -> None:
    dataset = load_dataset(_parquet(tmp_path, [_png((16, 12)) for _ in range(40)]))
    assert check_images(dataset, range(40)) == (3, 12, 16)


def test_check_images_names_the_first_image_of_another_size(tmp_path: Path) -> None:
    images = [_png((16, 16)) for _ in range(30)]
    images[17] = _png((20, 16))
    images[25] = _png((8, 8))
    dataset = load_dataset(_parquet(tmp_path, images))
    with pytest.raises(UserError) as info:
        check_images(dataset, list(range(30)))
    message = str(info.value)
    assert message.startswith("image_id 17 of dataset parquet: is 3x16x20 but image_id 0 is 3x16x16")
    assert "resize or convert them to one shape" in message and "\n" not in message
    # Not selected, not checked:
    assert check_images(dataset, [0, 1, 2]) == (3, 16, 16)


def test_check_images_channels_differ(tmp_path: Path) -> None:
    images = [_png((8, 8), "L") for _ in range(5)] + [_png((8, 8), "RGB")]
    with pytest.raises(UserError, match=r"image_id 5 of dataset parquet: is 3x8x8 but image_id 0 is 1x8x8"):
        check_images(load_dataset(_parquet(tmp_path, images)), range(6))


def test_check_images_names_a_corrupt_image_other_than_the_first(tmp_path: Path) -> None:
    images = [_png((8, 8)) for _ in range(20)]
    images[13] = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40  # a PNG signature and nothing usable
    dataset = load_dataset(_parquet(tmp_path, images))
    with pytest.raises(UserError) as info:
        check_images(dataset, range(20))
    message = str(info.value)
    assert message.startswith("image_id 13 of dataset parquet: cannot decode image") and "\n" not in message


def test_check_images_image_folder_in_parallel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "imagenet"
    for cls in ("n01", "n02"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            (root / cls / f"{i}.png").write_bytes(_png((300, 280)))
    (root / "n02" / "3.png").write_bytes(b"not an image")  # image_id 6 + 3 = 9
    dataset = load_dataset(f"imagenet:{root}")
    threads: set[str] = set()
    real = data_mod.ImageFolderDataset.get

    def recording(self, image_id: int):
        threads.add(threading.current_thread().name)
        return real(self, image_id)

    monkeypatch.setattr(data_mod.ImageFolderDataset, "get", recording)
    with pytest.raises(UserError, match=r"^image_id 9 of dataset imagenet: cannot decode image .*n02/3.png"):
        check_images(dataset, range(12), workers=4)
    assert check_images(dataset, range(9), workers=4) == (3, 256, 256)
    assert len(threads) > 1 and all(name.startswith("check-images") for name in threads)


def test_check_images_arrays_are_only_range_checked() -> None:
    dataset = load_dataset("digits")
    assert check_images(dataset, range(10)) == (1, 8, 8)
    with pytest.raises(UserError, match="out of range"):
        check_images(dataset, [0, 10_000])
    with pytest.raises(UserError, match="no images selected"):
        check_images(dataset, [])
