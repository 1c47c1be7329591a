"""Evaluation datasets: a stable ``image_id`` -> (image, label) mapping.

Every dataset yields float32 arrays shaped (C, H, W) with values in [0, 1]
and an int label. ``image_id`` is the index of the image in the dataset's
full, deterministic order, so that results from different runs, machines
and resumptions refer to the same images.

Specs accepted by :func:`load_dataset`:

* ``digits`` -- the 297 scikit-learn 8x8 digits held out from the bundled demo
  models' training (a fixed seeded split, ``workers.digits.digits_split_indices``).
* ``cifar10:PATH`` -- the CIFAR-10 "python version" ``test_batch`` (or the
  folder that holds it), local or on S3. Parsed with a restricted unpickler.
* ``imagenet:PATH`` -- a folder or S3 prefix of synset subfolders (the
  ImageNet val layout); Resize(256, bicubic) + CenterCrop(256).
* ``parquet:PATH`` -- a Parquet file with ``image`` (PNG/JPEG bytes) and
  ``label`` columns and an optional ``image_id`` column that fixes the order.
"""

from __future__ import annotations

import importlib
import io
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow.fs as pafs

from workers import storage
from workers.errors import NotFoundError, UserError

SPECS_HELP = "use digits, cifar10:PATH, imagenet:PATH or parquet:PATH"

IMAGENET_SIZE = 256
# torchvision's ImageFolder extensions, so the same files are picked up.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


@runtime_checkable
class Dataset(Protocol):
    """What the pipeline needs from a dataset."""

    name: str
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        ...

    def __len__(self) -> int: ...

    def get(self, image_id: int) -> tuple[np.ndarray, int]:
        """Image (float32, (C, H, W), [0, 1]) and label of ``image_id``."""
        ...

    def label(self, image_id: int) -> int:
        """Label of ``image_id`` without decoding the image."""
        ...


def _check_id(name: str, image_id: int, n: int) -> int:
    """Validate an image id against the dataset size."""
    image_id = int(image_id)
    if not 0 <= image_id < n:
        raise UserError(f"image_id {image_id} is out of range for {name} ({n} images); use ids 0..{n - 1}")
    return image_id


# --------------------------------------------------------------------------
# In-memory arrays (digits, CIFAR-10)
# --------------------------------------------------------------------------


@dataclass
class ArrayDataset:
    """Images held in one array; ``scale`` maps stored values to [0, 1].

    CIFAR stays uint8 in memory (30 MB instead of 120 MB as float32) and is
    divided by ``scale`` per image.
    """

    name: str
    images: np.ndarray  # (N, C, H, W)
    labels: np.ndarray  # (N,) int64
    num_classes: int
    scale: float = 1.0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def get(self, image_id: int) -> tuple[np.ndarray, int]:
        i = _check_id(self.name, image_id, len(self))
        image = np.asarray(self.images[i], dtype=np.float32)
        if self.scale != 1.0:
            image = image / np.float32(self.scale)
        return np.ascontiguousarray(image, dtype=np.float32), int(self.labels[i])

    def label(self, image_id: int) -> int:
        return int(self.labels[_check_id(self.name, image_id, len(self))])


def load_digits_heldout() -> ArrayDataset:
    """The 297 held-out scikit-learn digits (see ``workers.digits``), reindexed from 0, in [0, 1].

    The split comes from the demo models' own loader so data and models cannot drift apart.
    """
    from workers.digits import load_digits_data

    _, _, x_test, y_test = load_digits_data()
    return ArrayDataset(
        name="digits",
        images=np.ascontiguousarray(x_test.numpy(), dtype=np.float32),
        labels=y_test.numpy().astype(np.int64),
        num_classes=10,
    )


# --------------------------------------------------------------------------
# CIFAR-10 (restricted unpickling)
# --------------------------------------------------------------------------


def _numpy_attr(module_candidates: tuple[str, ...], name: str) -> Any:
    """Look up a numpy internal under its numpy 2 or numpy 1 module path."""
    for module in module_candidates:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {name}")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only callables a CIFAR batch pickle may reference.

    A numpy array pickles as _reconstruct/ndarray/dtype (protocols 0-4) or
    _frombuffer/dtype (protocol 5); Python 3 protocol-2 pickles wrap bytes in
    _codecs.encode. Anything else (os.system, builtins.eval, ...) is refused.
    """
    import codecs

    reconstruct = _numpy_attr(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
    frombuffer = _numpy_attr(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{prefix}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy arrays need."""

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        target = self._allowed.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"forbidden global '{module}.{name}'")
        return target


def restricted_unpickle(data: bytes) -> Any:
    """Unpickle data that may hold plain containers and numpy arrays only."""
    # encoding="bytes" reads the original Python 2 CIFAR files.
    return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _cifar_batch_uri(path: str) -> str:
    """Accept the test_batch file itself or the folder (cifar-10-batches-py) holding it."""
    fs, local = storage.resolve(path)
    info = fs.get_file_info(local)
    if info.type == pafs.FileType.Directory:
        return storage.join(path, "test_batch")
    if info.type == pafs.FileType.NotFound:
        raise NotFoundError(f"CIFAR-10 batch {path} does not exist; pass the python-version test_batch file")
    return path


def load_cifar10(path: str) -> ArrayDataset:
    """CIFAR-10 test batch -> uint8 (N, 3, 32, 32) images (divided by 255 on access)."""
    uri = _cifar_batch_uri(path)
    raw = storage.read_bytes(uri)
    try:
        batch = restricted_unpickle(raw)
    except pickle.UnpicklingError as exc:
        if "forbidden global" in str(exc):
            raise UserError(
                f"refusing to load {uri}: the pickle references {str(exc).split(' ', 2)[-1]}, which a "
                "CIFAR-10 batch never does; use the official python-version test_batch"
            ) from exc
        raise UserError(f"cannot read CIFAR-10 batch {uri} ({exc}); use the official python-version test_batch") from exc
    except Exception as exc:  # corrupt pickles raise many types (EOFError, ValueError, ...)
        raise UserError(
            f"cannot read CIFAR-10 batch {uri} ({type(exc).__name__}); use the official python-version test_batch"
        ) from exc
    if not isinstance(batch, dict):
        raise UserError(f"{uri} is not a CIFAR-10 batch (no dict inside); use the python-version test_batch")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise UserError(f"{uri} lacks 'data'/'labels' entries; use the python-version CIFAR-10 test_batch")
    labels_arr = np.asarray(labels)
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
        or labels_arr.shape != (data.shape[0],)
        or labels_arr.dtype.kind not in "iu"
    ):
        raise UserError(
            f"{uri} does not look like CIFAR-10 (data {data.dtype} {data.shape}, {labels_arr.shape[0] if labels_arr.ndim else 0} labels); "
            "expected uint8 (N, 3072) data and N int labels"
        )
    images = data.reshape(-1, 3, 32, 32)
    return ArrayDataset(name="cifar10", images=images, labels=labels_arr.astype(np.int64), num_classes=10, scale=255.0)


# --------------------------------------------------------------------------
# Image decoding shared by ImageNet folders and Parquet
# --------------------------------------------------------------------------


def _decode(data: bytes, source: str) -> Any:
    """Open encoded image bytes with Pillow; UserError naming the source when corrupt."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError...
        raise UserError(f"cannot decode image {source} ({type(exc).__name__}); replace or remove the file") from exc
    return image


def _to_array(image: Any) -> np.ndarray:
    """PIL image -> float32 (C, H, W) in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def resize_center_crop(image: Any, size: int = IMAGENET_SIZE) -> Any:
    """torchvision's Resize(size, BICUBIC) + CenterCrop(size) for PIL images.

    The shorter side becomes ``size`` (the longer one ``int(size * long / short)``)
    and the crop offsets are rounded the way torchvision rounds them, so the
    pixels match the DensePure ImageNet preprocessing.
    """
    from PIL import Image

    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


# --------------------------------------------------------------------------
# ImageNet-style folders
# --------------------------------------------------------------------------


@dataclass
class ImageFolderDataset:
    """Synset subfolders under a local folder or S3 prefix.

    Classes are the sorted folder names; image_ids follow (class, path) order.
    The listing happens on first use and images are read on demand, so an S3
    dataset costs one paginated LIST plus one GET per image actually used.
    """

    root: str
    name: str = "imagenet"
    size: int = IMAGENET_SIZE

    @cached_property
    def _index(self) -> tuple[list[str], list[tuple[str, int]]]:
        root = self.root.rstrip("/") or self.root
        found: dict[str, list[str]] = {}
        for uri in storage.list_files(root, recursive=True):
            rel = uri[len(root):].lstrip("/")
            parts = rel.split("/")
            if len(parts) < 2 or not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
                continue  # files beside the synset folders (e.g. a README) are not images
            found.setdefault(parts[0], []).append(uri)
        classes = sorted(found)
        if not classes:
            raise UserError(
                f"no images in class subfolders under {self.root}; expected ROOT/<synset>/<image>.JPEG"
            )
        entries = [(uri, label) for label, cls in enumerate(classes) for uri in sorted(found[cls])]
        return classes, entries

    @property
    def classes(self) -> list[str]:
        """Folder names, in class-id order."""
        return self._index[0]

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def __len__(self) -> int:
        return len(self._index[1])

    def uri(self, image_id: int) -> str:
        """Where the image with this id is stored."""
        return self._index[1][_check_id(self.name, image_id, len(self))][0]

    def label(self, image_id: int) -> int:
        return self._index[1][_check_id(self.name, image_id, len(self))][1]

    def get(self, image_id: int) -> tuple[np.ndarray, int]:
        uri, label = self._index[1][_check_id(self.name, image_id, len(self))]
        image = _decode(storage.read_bytes(uri), uri).convert("RGB")
        return _to_array(resize_center_crop(image, self.size)), label


# --------------------------------------------------------------------------
# Parquet of encoded images
# --------------------------------------------------------------------------


def _image_bytes(value: Any, source: str) -> bytes:
    """Raw bytes from a cell: bytes, or a Hugging Face style {'bytes': ...} struct."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise UserError(f"{source} holds {type(value).__name__}, not encoded image bytes; store PNG/JPEG bytes in 'image'")


@dataclass
class ParquetImageDataset:
    """Encoded images in a Parquet file, decoded on access (grey stays 1 channel)."""

    path: str
    images: list[bytes]
    labels: np.ndarray
    num_classes: int
    name: str = "parquet"
    _shape: tuple[int, int, int] | None = field(default=None, repr=False)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self._shape is None:
            self._shape = self.get(0)[0].shape  # type: ignore[assignment]
        return self._shape  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.images)

    def label(self, image_id: int) -> int:
        return int(self.labels[_check_id(self.name, image_id, len(self))])

    def get(self, image_id: int) -> tuple[np.ndarray, int]:
        i = _check_id(self.name, image_id, len(self))
        image = _decode(self.images[i], f"{self.path} row image_id={i}")
        image = image.convert("L" if image.mode in _GREY_MODES else "RGB")
        return _to_array(image), int(self.labels[i])


def load_parquet_images(path: str) -> ParquetImageDataset:
    """Read ``image``/``label`` (and optional ``image_id``) columns from a Parquet file."""
    frame = storage.read_parquet(path)
    missing = [c for c in ("image", "label") if c not in frame.columns]
    if missing:
        raise UserError(
            f"{path} lacks column(s) {', '.join(missing)} (has {', '.join(map(str, frame.columns))}); "
            "write 'image' (PNG/JPEG bytes) and 'label' (int)"
        )
    if len(frame) == 0:
        raise UserError(f"{path} has no rows; write at least one image")
    if "image_id" in frame.columns:
        ids = frame["image_id"].to_numpy()
        # image_id is the position in the full order, so it must be 0..N-1 exactly.
        if ids.dtype.kind not in "iu" or not np.array_equal(np.sort(ids), np.arange(len(frame))):
            raise UserError(
                f"{path}: column image_id must hold each of 0..{len(frame) - 1} once; renumber it or drop the column"
            )
        frame = frame.iloc[np.argsort(ids, kind="stable")].reset_index(drop=True)
    labels = frame["label"].to_numpy()
    if labels.dtype.kind not in "iu" or (labels < 0).any():
        raise UserError(f"{path}: column label must hold non-negative integers; fix the labels")
    images = [_image_bytes(v, f"{path} row {i}") for i, v in enumerate(frame["image"])]
    return ParquetImageDataset(
        path=path, images=images, labels=labels.astype(np.int64), num_classes=int(labels.max()) + 1
    )


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def load_dataset(spec: str) -> Dataset:
    """Load a dataset from its spec (see the module docstring); UserError on bad input."""
    kind, sep, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "digits":
        if sep:
            raise UserError(f"dataset 'digits' takes no path (got '{spec}'); use plain 'digits'")
        return load_digits_heldout()
    if kind not in ("cifar10", "imagenet", "parquet"):
        raise UserError(f"unknown dataset '{spec}'; {SPECS_HELP}")
    if not path:
        raise UserError(f"dataset '{kind}' needs a path, e.g. {kind}:/data/{kind} or {kind}:s3://bucket/{kind}")
    if kind == "cifar10":
        return load_cifar10(path)
    if not storage.exists(path):
        raise NotFoundError(f"{path} does not exist; check the {kind} dataset path")
    if kind == "imagenet":
        dataset = ImageFolderDataset(root=path)
        len(dataset)  # list now so an empty or malformed folder fails before any model is loaded
        return dataset
    return load_parquet_images(path)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def check_images(dataset: Dataset, image_ids: list[int] | range, workers: int = 8) -> tuple[int, int, int]:
    """Decode every selected image and check that they all have one shape; return it (C, H, W).

    Meant for the driver's preflight, before any GPU time: a corrupt image or one of another size
    deep in the selection would otherwise fail a worker hours into a run. Raises one UserError
    naming the first bad ``image_id`` (in ``image_ids`` order) and what is wrong with it.
    Encoded or remote datasets (image folders, Parquet) are decoded by ``workers`` threads (Pillow
    and S3 reads release the GIL); in-memory arrays need no decoding and are only range-checked.
    For a Parquet dataset the checked shape also becomes its ``image_shape``, so that the model
    checks use the selected images' shape rather than image 0's.
    """
    ids = [int(i) for i in image_ids]
    if not ids:
        raise UserError(f"no images selected from {dataset.name}; select at least one image")
    if isinstance(dataset, ArrayDataset):
        for i in ids:
            _check_id(dataset.name, i, len(dataset))
        return dataset.image_shape

    def probe(image_id: int) -> tuple[int, ...]:
        image, _ = dataset.get(image_id)
        return tuple(int(d) for d in image.shape)

    def bad(image_id: int, problem: str) -> UserError:
        return UserError(f"image_id {image_id} of dataset {dataset.name}: {problem}")

    reference: tuple[int, ...] | None = None
    first_id = ids[0]
    parallel = workers > 1 and len(ids) > 1 and isinstance(dataset, (ImageFolderDataset, ParquetImageDataset))
    pool = ThreadPoolExecutor(max_workers=min(workers, len(ids)), thread_name_prefix="check-images") if parallel else None
    try:
        # Submitted in bounded batches so a huge selection does not queue a future per image at once.
        batch = max(workers * 16, 1)
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            futures = [pool.submit(probe, i) for i in chunk] if pool is not None else None
            for k, image_id in enumerate(chunk):
                try:
                    shape = futures[k].result() if futures is not None else probe(image_id)
                except UserError as exc:
                    raise bad(image_id, str(exc)) from exc
                if len(shape) != 3:
                    raise bad(image_id, f"decodes to an array of shape {shape}, not (C, H, W); store RGB or greyscale images")
                if reference is None:
                    reference = shape
                elif shape != reference:
                    raise bad(
                        image_id,
                        f"is {_shape_text(shape)} but image_id {first_id} is {_shape_text(reference)}; every image "
                        "must have the same size and channels: resize or convert them to one shape",
                    )
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    assert reference is not None
    if isinstance(dataset, ParquetImageDataset):
        dataset._shape = reference  # type: ignore[assignment]
    elif tuple(dataset.image_shape) != reference:
        raise bad(first_id, f"is {_shape_text(reference)} but the dataset declares {_shape_text(tuple(dataset.image_shape))}")
    return reference  # type: ignore[return-value]


def select_indices(
    n_total: int,
    skip: int = 0,
    max_images: int | None = None,
    every: int = 1,
    indices: list[int] | None = None,
) -> list[int]:
    """Image ids to certify.

    Explicit ``indices`` win (validated, order kept); otherwise
    ``range(skip, n_total, every)[:max_images]``. The paper protocol is every
    20th CIFAR-10 test image and every 500th ImageNet val image.
    """
    if indices is not None:
        chosen = [int(i) for i in indices]
        bad = [i for i in chosen if not 0 <= i < n_total]
        if bad:
            shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
            raise UserError(f"image indices out of range: {shown}; the dataset has {n_total} images (ids 0..{n_total - 1})")
        if len(set(chosen)) != len(chosen):
            dupes = sorted({i for i in chosen if chosen.count(i) > 1})
            raise UserError(f"image indices repeated: {', '.join(map(str, dupes[:5]))}; list each image once")
        return chosen
    if every < 1:
        raise UserError(f"every must be >= 1 (got {every}); use 1 for all images, 20 for the CIFAR-10 paper protocol")
    if skip < 0:
        raise UserError(f"skip must be >= 0 (got {skip}); pass the number of leading images to leave out")
    if max_images is not None and max_images < 0:
        raise UserError(f"max_images must be >= 0 (got {max_images}); omit it to take all selected images")
    return list(range(skip, n_total, every))[:max_images]
