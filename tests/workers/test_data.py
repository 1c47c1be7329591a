"""workers.data: dataset specs, safe CIFAR unpickling, ImageNet preprocessing, selection."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from workers import storage
from workers.data import Dataset, load_dataset, resize_center_crop, select_indices
from workers.errors import UserError

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _random_image(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "L": 1}[mode]
    array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)


# Two synsets (created in reverse order) with two odd-sized images each.
_IMAGENET_FILES = {
    "n02000000/b.JPEG": (301, 257, "RGB", "JPEG"),
    "n02000000/a.png": (260, 511, "L", "PNG"),
    "n01000000/z.png": (513, 300, "RGB", "PNG"),
    "n01000000/y.JPEG": (257, 257, "RGB", "JPEG"),
}


def _write_imagenet(write) -> None:
    rng = np.random.default_rng(0)
    for rel, (w, h, mode, fmt) in _IMAGENET_FILES.items():
        write(rel, _png(_random_image(rng, w, h, mode), fmt))
    write("README.txt", b"not an image")


def _cifar_batch(n: int = 4, bytes_keys: bool = False) -> tuple[dict, np.ndarray, list[int]]:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, 10, size=n)]
    batch = {"batch_label": "testing batch 1 of 1", "labels": labels, "data": data,
             "filenames": [f"img_{i}.png" for i in range(n)]}
    if bytes_keys:  # how the original Python 2 pickles read back with encoding="bytes"
        batch = {k.encode(): v for k, v in batch.items()}
    return batch, data, labels


# --------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------


def test_digits_heldout_split() -> None:
    from sklearn.datasets import load_digits

    from workers.digits import digits_split_indices

    ds = load_dataset("digits")
    assert isinstance(ds, Dataset)
    assert len(ds) == 297 and ds.num_classes == 10 and ds.image_shape == (1, 8, 8)
    image, label = ds.get(0)
    assert image.dtype == np.float32 and image.shape == (1, 8, 8)
    raw = load_digits()
    _, held_out = digits_split_indices()  # the demo models' own split: never trained on
    first = int(held_out[0])
    np.testing.assert_allclose(image[0], raw.images[first] / 16.0, rtol=1e-6)
    assert label == raw.target[first] == ds.label(0)
    everything = np.stack([ds.get(i)[0] for i in range(len(ds))])
    assert everything.min() >= 0.0 and everything.max() <= 1.0
    with pytest.raises(UserError, match="out of range"):
        ds.get(297)


# --------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar_batch_loads(tmp_path, protocol: int, bytes_keys: bool) -> None:
    batch, data, labels = _cifar_batch(bytes_keys=bytes_keys)
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    ds = load_dataset(f"cifar10:{path}")
    assert len(ds) == 4 and ds.num_classes == 10 and ds.image_shape == (3, 32, 32)
    image, label = ds.get(2)
    assert image.dtype == np.float32 and label == labels[2]
    np.testing.assert_allclose(image, data[2].reshape(3, 32, 32) / 255.0, rtol=1e-6)
    # the folder holding test_batch works too (cifar-10-batches-py/)
    assert len(load_dataset(f"cifar10:{tmp_path}")) == 4


def test_cifar_from_s3(s3_bucket: str) -> None:
    batch, data, labels = _cifar_batch()
    storage.write_bytes(f"s3://{s3_bucket}/cifar-10-batches-py/test_batch", pickle.dumps(batch))
    ds = load_dataset(f"cifar10:s3://{s3_bucket}/cifar-10-batches-py")
    assert [ds.label(i) for i in range(4)] == labels


class _Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({"data": _Evil(str(marker)), "labels": [0]}))
    with pytest.raises(UserError, match="refusing to load") as info:
        load_dataset(f"cifar10:{path}")
    assert "system" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_cifar_bad_inputs(tmp_path) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UserError, match="cannot read CIFAR-10 batch"):
        load_dataset(f"cifar10:{corrupt}")
    wrong = tmp_path / "wrong"
    wrong.write_bytes(pickle.dumps({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}))
    with pytest.raises(UserError, match="does not look like CIFAR-10"):
        load_dataset(f"cifar10:{wrong}")
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(f"cifar10:{tmp_path / 'absent'}")


# --------------------------------------------------------------------------
# ImageNet-style folders
# --------------------------------------------------------------------------


def test_resize_center_crop_matches_torchvision_geometry() -> None:
    # 512x256: the short side is already 256, so only the crop applies: columns 128..383.
    columns = np.tile(np.arange(512, dtype=np.uint16)[None, :] % 256, (256, 1)).astype(np.uint8)
    image = Image.fromarray(columns, "L")
    crop = np.asarray(resize_center_crop(image))
    assert crop.shape == (256, 256)
    assert crop[0, 0] == 128 and crop[0, 255] == (383 % 256)
    # 100x150 -> 256x384 -> rows 64..319
    assert resize_center_crop(Image.new("RGB", (100, 150))).size == (256, 256)


def _check_imagenet(ds) -> list[np.ndarray]:
    assert len(ds) == 4 and ds.num_classes == 2 and ds.image_shape == (3, 256, 256)
    assert ds.classes == ["n01000000", "n02000000"]
    assert [ds.label(i) for i in range(4)] == [0, 0, 1, 1]
    assert [ds.uri(i).rsplit("/", 1)[-1] for i in range(4)] == ["y.JPEG", "z.png", "a.png", "b.JPEG"]
    images = []
    for i in range(4):
        image, label = ds.get(i)
        assert image.shape == (3, 256, 256) and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0 and label == ds.label(i)
        images.append(image)
    return images


def test_imagenet_local_and_s3_agree(tmp_path, s3_bucket: str) -> None:
    root = tmp_path / "val"

    def write_local(rel: str, data: bytes) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)

    _write_imagenet(write_local)
    local = _check_imagenet(load_dataset(f"imagenet:{root}"))

    _write_imagenet(lambda rel, data: storage.write_bytes(f"s3://{s3_bucket}/val/{rel}", data))
    remote = _check_imagenet(load_dataset(f"imagenet:s3://{s3_bucket}/val/"))
    for a, b in zip(local, remote):
        np.testing.assert_array_equal(a, b)


def test_imagenet_bad_inputs(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(f"imagenet:{tmp_path / 'absent'}")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(UserError, match="no images in class subfolders"):
        load_dataset(f"imagenet:{tmp_path / 'flat'}")
    (tmp_path / "val" / "n0").mkdir(parents=True)
    (tmp_path / "val" / "n0" / "broken.JPEG").write_bytes(b"not a jpeg")
    ds = load_dataset(f"imagenet:{tmp_path / 'val'}")
    with pytest.raises(UserError, match="cannot decode image .*broken.JPEG"):
        ds.get(0)


# --------------------------------------------------------------------------
# Parquet of encoded images
# --------------------------------------------------------------------------


def test_parquet_of_pngs(tmp_path) -> None:
    rng = np.random.default_rng(2)
    rgb = [_random_image(rng, 16, 16) for _ in range(3)]
    frame = pd.DataFrame({"image": [_png(im) for im in rgb], "label": [4, 0, 9], "image_id": [2, 0, 1]})
    path = tmp_path / "set.parquet"
    storage.write_parquet(str(path), frame)
    ds = load_dataset(f"parquet:{path}")
    assert len(ds) == 3 and ds.num_classes == 10 and ds.image_shape == (3, 16, 16)
    image, label = ds.get(2)  # the row whose image_id is 2
    assert label == 4 and ds.label(0) == 0
    np.testing.assert_allclose(image, np.asarray(rgb[0], np.float32).transpose(2, 0, 1) / 255.0)


def test_parquet_grey_images_keep_one_channel(tmp_path) -> None:
    rng = np.random.default_rng(3)
    grey = _random_image(rng, 8, 8, "L")
    path = tmp_path / "grey.parquet"
    storage.write_parquet(str(path), pd.DataFrame({"image": [_png(grey)], "label": [1]}))
    image, label = load_dataset(f"parquet:{path}").get(0)
    assert image.shape == (1, 8, 8) and label == 1
    np.testing.assert_allclose(image[0], np.asarray(grey, np.float32) / 255.0)


def test_parquet_bad_inputs(tmp_path) -> None:
    path = tmp_path / "nolabel.parquet"
    storage.write_parquet(str(path), pd.DataFrame({"image": [b"x"]}))
    with pytest.raises(UserError, match="lacks column"):
        load_dataset(f"parquet:{path}")
    path = tmp_path / "ids.parquet"
    storage.write_parquet(str(path), pd.DataFrame({"image": [b"x", b"y"], "label": [0, 1], "image_id": [0, 5]}))
    with pytest.raises(UserError, match="image_id must hold each of 0..1"):
        load_dataset(f"parquet:{path}")
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot read Parquet"):
        load_dataset(f"parquet:{path}")


# --------------------------------------------------------------------------
# specs and selection
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ("mnist", "unknown dataset 'mnist'"),
        ("cifar10", "needs a path"),
        ("imagenet:", "needs a path"),
        ("digits:/x", "takes no path"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_dataset(spec)


def test_select_indices() -> None:
    assert select_indices(5) == [0, 1, 2, 3, 4]
    assert select_indices(10000, every=20)[:3] == [0, 20, 40] and len(select_indices(10000, every=20)) == 500
    assert select_indices(50000, every=500, max_images=3) == [0, 500, 1000]
    assert select_indices(10, skip=3, every=3) == [3, 6, 9]
    assert select_indices(10, skip=2, max_images=2) == [2, 3]
    assert select_indices(10, max_images=0) == []
    assert select_indices(10, skip=20) == []
    assert select_indices(10, skip=5, every=7, indices=[9, 0]) == [9, 0]  # explicit wins


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"indices": [0, 10]}, "out of range: 10"),
        ({"indices": [-1]}, "out of range: -1"),
        ({"indices": [1, 1]}, "repeated: 1"),
        ({"every": 0}, "every must be >= 1"),
        ({"skip": -1}, "skip must be >= 0"),
        ({"max_images": -2}, "max_images must be >= 0"),
    ],
)
def test_select_indices_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        select_indices(10, **kwargs)
