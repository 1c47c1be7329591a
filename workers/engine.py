"""The inner certification engine: noisy draws -> purified copies -> classifier votes -> counts.

One ``Engine`` holds a loaded classifier (and denoiser) and turns (image, method, draw seeds)
into per-class counts of the smoothed classifier's base decisions, for several vote counts K at
once (the first k of K votes form a valid k-vote classifier). It knows nothing of Ray, files or
statistics: the Ray actor in ``workers/worker.py`` and the ``densepure purify`` command both call it.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from workers.contract import PRECISIONS
from workers.purify import Purifier, PurifySpec, draw_generators

if TYPE_CHECKING:
    from workers.classifier import Classifier
    from workers.denoiser import Denoiser

# The autocast dtype of each precision of ``workers.contract.PRECISIONS`` but "auto", which
# ``resolve_precision`` turns into one of these per device.
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Images per network batch on CPU when none is given, from the image's pixel count:
# 16 x (1024 / pixels) ** 1.25, i.e. 16 CIFAR-10 images (32x32), 512 digits (8x8), 1 ImageNet
# image (then K copies of one draw). Measured on a 2-core EPYC (BENCHMARKS.md, "CPU batch
# size"): the CIFAR-10 UNet ran fastest at 16 images (its activations stay in cache: 19.1
# images/s in bf16 and 10.7 in fp32 at 16, 12.3 and 7.5 at 128), while the tiny digits UNet
# needs hundreds of images per call to amortise its per-layer overhead.
CPU_BATCH_AT_32X32 = 16
CPU_BATCH_EXPONENT = 1.25
CPU_MAX_BATCH = 1024
# The automatic CUDA batch size: probe batch sizes, share of the free memory used, upper bound.
_PROBE_BATCHES = (2, 6)
_MEMORY_FRACTION = 0.8
_MAX_AUTO_BATCH = 2048


@dataclass
class CountResult:
    """Counts of one batch of draws: ``counts[v, c]`` = draws whose k_v-vote decision is class c."""

    counts: np.ndarray
    unet_forwards: int
    classifier_calls: int
    seconds: float


def majority_votes(labels: torch.Tensor, vote_counts: Sequence[int], num_classes: int) -> torch.Tensor:
    """Base decisions of the k-vote classifiers for each k in ``vote_counts``.

    labels: (B, K) classifier labels of the K votes of each draw, in vote order. Returns
    (len(vote_counts), B): the most frequent label among the first k votes; ties go to the
    label seen first in vote order, as in the reference implementation's merge.
    """
    B, K = labels.shape
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(torch.int64)  # (B, K, C)
    position = torch.arange(K, device=labels.device).view(1, K, 1)
    # First vote index at which each class appears (K if never): the tie-breaker.
    first_seen = torch.where(onehot.bool(), position, torch.full_like(position, K)).amin(dim=1)
    cumulative = onehot.cumsum(dim=1)
    out = []
    for k in vote_counts:
        if not 1 <= k <= K:
            raise ValueError(f"vote count {k} is outside 1..{K}")
        counts_k = cumulative[:, k - 1, :]
        first_k = torch.where(first_seen < k, first_seen, torch.full_like(first_seen, K))
        score = counts_k * (K + 1) - first_k
        out.append(score.argmax(dim=1))
    return torch.stack(out)


def _compiled(module: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` for one of the engine's networks.

    A ``Denoiser`` is rebuilt around its compiled UNet (sharing the weights) instead of being
    compiled whole: its forward reads the numpy schedule (``schedule.T``), which dynamo turns
    into a guarded tensor that then fails under inference_mode ("Guard failed on the same frame
    it was created", torch 2.13), so ``compile=True`` used to crash on the first batch.
    """
    from workers.denoiser import Denoiser

    if isinstance(module, Denoiser):
        return module.with_net(torch.compile(module.net))
    return torch.compile(module)


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this x86 CPU has bf16 arithmetic in hardware (AVX512-BF16 or AMX-BF16 flags).

    Without them oneDNN emulates bf16 and autocast is slower than fp32, so ``auto`` keeps fp32.
    Read from /proc/cpuinfo (Linux); elsewhere the answer is no.
    """
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision the networks run in: ``auto`` is the fastest one measured to decide as fp32.

    ``auto``: bf16 autocast on CUDA (fp16 on GPUs without bf16) and on CPUs with native bf16;
    fp32 elsewhere. On the digits demo bf16 and fp32 took the same base decision on 1000 of 1000
    draws (tests/test_fast_path.py), and on a 2-core EPYC with AVX512-BF16 bf16 ran the engine
    1.4x (digits) to 1.6x (CIFAR-10 UNet) faster than fp32 (BENCHMARKS.md).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def cpu_batch_size(image_shape: Sequence[int]) -> int:
    """The CPU default for (C, H, W) images: 16 x (1024 / (H W)) ** 1.25, in [1, CPU_MAX_BATCH]."""
    pixels = max(int(image_shape[-1]) * int(image_shape[-2]), 1)
    return max(1, min(CPU_MAX_BATCH, round(CPU_BATCH_AT_32X32 * (1024 / pixels) ** CPU_BATCH_EXPONENT)))


def fit_batch(probes: Sequence[tuple[int, float]], free_bytes: float,
              fraction: float = _MEMORY_FRACTION, cap: int = _MAX_AUTO_BATCH) -> int:
    """Images per batch that fit in ``fraction`` of ``free_bytes``, from two probe passes.

    ``probes`` = [(images, peak bytes), (images, peak bytes)]: the peak is modelled as
    constant + slope x images (the constant holds workspaces and autocast's weight copies, which
    a single probe would wrongly charge to every image). The result is in [1, cap].
    """
    (n1, p1), (n2, p2) = probes
    slope = (p2 - p1) / (n2 - n1)
    if slope <= 0:  # allocator rounding swallowed the difference: charge the whole peak per image
        slope = p2 / n2
    constant = max(0.0, p2 - slope * n2)
    fit = int((free_bytes * fraction - constant) / max(slope, 1.0))
    return max(1, min(fit, cap))


class Engine:
    """Counts smoothed-classifier decisions for one image at a time, in batches of draws.

    Speed (see BENCHMARKS.md for the measurements behind each default):

    - everything runs under ``torch.inference_mode``; the K votes of a draw share the first
      network evaluation (``Purifier``), and draws x votes go through the UNet as one batch;
    - the scheduler's coefficients are Python floats per step (one timestep per batch), so the
      schedule never needs a host-to-device copy: only the noise, the images and the counts
      live on the device, and the counts come back once per ``count`` call;
    - ``precision`` bf16/fp16 runs the networks under autocast (GroupNorm stays fp32); the
      default ``auto`` picks bf16 where the hardware computes it natively (``resolve_precision``);
      ``compile`` wraps both networks in ``torch.compile``; ``channels_last`` (default: on for
      CUDA; off for CPU, where it changed the CIFAR-10 UNet little at the default batch, +7% in
      fp32 and -2% in bf16, and slowed the digits UNet down);
    - ``batch_size`` counts images per network batch (draws x copies); when not given, the
      first call picks it (``auto_batch_size``): on CPU from the image size (cache-sized
      batches measured fastest), on CUDA what fits in free memory according to a probe.

    Results depend only on the draw seeds, the precision and the batch size: the random numbers
    of a draw come from its own generator in a fixed order whatever the batching (see purify.py).
    """

    def __init__(
        self,
        classifier: "Classifier | None",
        denoiser: "Denoiser | None" = None,
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
        precision: str = "auto",
        compile: bool = False,
        channels_last: bool | None = None,
    ):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        # A classifier is needed to count votes, not to purify (``densepure purify``).
        self.classifier = classifier.to(self.device).eval() if classifier is not None else None
        self.denoiser = denoiser.to(self.device).eval() if denoiser is not None else None
        self.num_classes = int(classifier.num_classes) if classifier is not None else 0
        self.precision = resolve_precision(precision, self.device)
        if channels_last is None:
            channels_last = self.device.type == "cuda"
        self.channels_last = bool(channels_last)
        self.compiled = bool(compile)
        # The eager modules, kept for the memory probe: probing a compiled module would compile
        # it for a batch size that is never used again.
        self._eager: dict[str, torch.nn.Module] = {}
        for name in ("classifier", "denoiser"):
            module = getattr(self, name)
            if module is None:
                continue
            if channels_last:
                module.to(memory_format=torch.channels_last)
            self._eager[name] = module
            if compile:
                setattr(self, name, _compiled(module))
        # None until the first call tells the image shape (see ``auto_batch_size``).
        self.batch_size: int | None = batch_size
        self._purifiers: dict[PurifySpec, Purifier] = {}

    def describe(self) -> str:
        """The settings a count depends on besides the seeds, e.g. ``cpu bf16 batch 512``."""
        batch = "auto" if self.batch_size is None else str(self.batch_size)
        return f"{self.device.type} {self.precision} batch {batch}" + (" compiled" if self.compiled else "")

    def purifier(self, spec: PurifySpec) -> Purifier:
        if spec not in self._purifiers:
            self._purifiers[spec] = Purifier(spec, self.denoiser)
        return self._purifiers[spec]

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def draws_per_batch(self, spec: PurifySpec, image_shape: Sequence[int] | None = None) -> int:
        """Draws per forward batch, so that draws x copies stays within ``batch_size`` images.

        Without a given batch size, the first call picks one (``auto_batch_size``) for
        ``image_shape`` (C, H, W), which is needed then unless the denoiser tells it.
        """
        if self.batch_size is None:
            if image_shape is None and self.denoiser is not None:
                image_shape = (self.denoiser.in_channels, self.denoiser.image_size, self.denoiser.image_size)
            if image_shape is None:
                raise ValueError("the automatic batch size needs the image shape")
            self.batch_size = self.auto_batch_size(tuple(image_shape))
        return max(1, self.batch_size // spec.copies)

    def auto_batch_size(self, image_shape: tuple[int, ...]) -> int:
        """Images per network batch for images of ``image_shape`` (C, H, W) on this device.

        CPU: ``cpu_batch_size``. CUDA: what fits in the free memory. Two probe passes
        (denoiser, then classifier, as in ``count``) at ``_PROBE_BATCHES`` images give the peak
        memory as constant + slope x images; the batch is what fits in ``_MEMORY_FRACTION`` of
        the free memory (plus what PyTorch's allocator holds cached), capped at
        ``_MAX_AUTO_BATCH`` (see ``fit_batch``).
        """
        if self.device.type != "cuda":
            return cpu_batch_size(image_shape)
        probes = [(n, self._probe_peak(n, image_shape)) for n in _PROBE_BATCHES]
        free, _ = torch.cuda.mem_get_info(self.device)
        # What PyTorch's caching allocator holds but does not use is free for our tensors too.
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return fit_batch(probes, free)

    @torch.inference_mode()
    def _probe_peak(self, n: int, image_shape: tuple[int, ...]) -> float:
        """Peak bytes above the current allocation of one denoiser + classifier pass on n images."""
        dev = self.device
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        x = torch.rand(n, *image_shape, device=dev)
        with self._autocast():
            denoiser = self._eager.get("denoiser")
            if denoiser is not None:
                t = torch.full((n,), denoiser.schedule.T // 2, device=dev, dtype=torch.long)
                denoiser(2.0 * x - 1.0, t)
            classifier = self._eager.get("classifier")
            if classifier is not None:
                classifier(x)
        torch.cuda.synchronize(dev)
        return float(torch.cuda.max_memory_allocated(dev) - base)

    @torch.inference_mode()
    def purify(self, image: torch.Tensor | np.ndarray, spec: PurifySpec, seeds: Sequence[int]) -> torch.Tensor:
        """Purified copies of one image, one draw per seed: (len(seeds), copies, C, H, W)."""
        x = torch.as_tensor(image, dtype=torch.float32, device=self.device)
        purifier = self.purifier(spec)
        step = self.draws_per_batch(spec, tuple(x.shape))
        outs = []
        for lo in range(0, len(seeds), step):
            chunk = seeds[lo : lo + step]
            batch = x.unsqueeze(0).expand(len(chunk), *x.shape)
            with self._autocast():
                outs.append(purifier(batch, draw_generators(chunk, self.device)).float())
        return torch.cat(outs)

    @torch.inference_mode()
    def count(
        self,
        image: torch.Tensor | np.ndarray,
        spec: PurifySpec,
        seeds: Sequence[int],
        vote_counts: Sequence[int] | None = None,
    ) -> CountResult:
        """Class counts of the smoothed classifier over the draws given by ``seeds``.

        ``vote_counts`` (default: [K]) lists the k of the k-vote classifiers to count; all must
        be <= spec.votes. Cohen and DDS have one copy per draw, so only k = 1 applies.
        """
        if self.classifier is None:
            raise ValueError("counting votes needs a classifier")
        start = time.perf_counter()
        vote_counts = list(vote_counts) if vote_counts is not None else [spec.copies]
        x = torch.as_tensor(image, dtype=torch.float32, device=self.device)
        purifier = self.purifier(spec)
        counts = torch.zeros(len(vote_counts), self.num_classes, dtype=torch.int64, device=self.device)
        step = self.draws_per_batch(spec, tuple(x.shape))
        classifier_calls = 0
        for lo in range(0, len(seeds), step):
            chunk = seeds[lo : lo + step]
            batch = x.unsqueeze(0).expand(len(chunk), *x.shape)
            with self._autocast():
                copies = purifier(batch, draw_generators(chunk, self.device))
                B, K = copies.shape[:2]
                logits = self.classifier(copies.reshape(B * K, *copies.shape[2:]))
            labels = logits.float().argmax(dim=1).reshape(B, K)
            classifier_calls += B * K
            decisions = majority_votes(labels, vote_counts, self.num_classes)
            counts += torch.nn.functional.one_hot(decisions, self.num_classes).sum(dim=1)
        return CountResult(
            counts=counts.cpu().numpy(),
            unet_forwards=spec.unet_forwards_per_draw() * len(seeds),
            classifier_calls=classifier_calls,
            seconds=time.perf_counter() - start,
        )
