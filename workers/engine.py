"""The inner certification engine: noisy draws -> purified copies -> classifier votes -> counts.

One ``Engine`` holds a loaded classifier (and denoiser) and turns jobs (image, spec, draw seeds,
vote counts) into per-class counts of the smoothed classifier's base decisions, for several vote
counts k at once (the first k of K votes form a valid k-vote classifier). It knows nothing of
Ray, files or statistics: the Ray actor (``workers/worker.py``), the ``densepure purify`` command
and the ``Smooth`` API all call it.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from workers.contract import PRECISIONS
from workers.errors import UserError
from workers.noise import Streams
from workers.purify import Purifier, PurifySpec
from workers.seeds import vote_seeds
from workers.votes import majority_votes, more_votes_needed, settled_decisions

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


@dataclass
class CountJob:
    """One image's draws to count: ``seeds`` are the draws' smoothing-stream seeds
    (``workers.seeds.draw_seeds``), ``vote_counts`` the k of the k-vote classifiers to count."""

    image: torch.Tensor | np.ndarray
    spec: PurifySpec
    seeds: np.ndarray
    vote_counts: Sequence[int] | None = None


@dataclass
class CountResult:
    """Counts of one job: ``counts[v, c]`` = draws whose ``vote_counts[v]``-vote decision is class c.

    ``votes_computed`` counts the vote trajectories run (one per draw for Cohen and DDS),
    ``votes_skipped`` those early majority left out because they could not change any reported
    decision. ``seconds`` is the job's share of the call's time, in proportion to its network rows.
    """

    counts: np.ndarray
    unet_forwards: int
    classifier_calls: int
    seconds: float
    votes_computed: int = 0
    votes_skipped: int = 0


class NonFiniteError(UserError):
    """Purified images or logits that are NaN or infinite: never counted (a NaN image would be
    "certified" as whichever class argmax picks)."""


@dataclass
class _Tally:
    """Per-job accumulators while a call runs."""

    counts: torch.Tensor
    unet_forwards: int = 0
    classifier_calls: int = 0
    votes_computed: int = 0
    votes_skipped: int = 0
    rows: int = 0


class Engine:
    """Counts smoothed-classifier decisions for jobs of many draws, packed into full network batches.

    Bit-identical counts: every network call gets exactly ``batch_size`` rows (the last batch of
    a pass is padded with zeros), because floating-point kernels may compute a row differently
    at another batch size (measured on this CPU: the digits UNet in fp32 differs in the last bits
    between batches of 7 and 64 rows, not between orders of the same rows). With a fixed shape a
    row's result depends only on its own input, so it does not matter which draws of which jobs
    share a batch, in which wave a vote is computed, or how draws are split into units: counts
    depend only on the seeds, the device type, the precision and the batch size.

    Speed (see BENCHMARKS.md for the measurements behind each default):

    - everything runs under ``torch.inference_mode``; the K votes of a draw share the first
      network evaluation (``Purifier``);
    - ``count_many`` packs the draws of several jobs with the same spec (e.g. small sequential
      rounds of several images) into the same batches, so small jobs do not run half-empty batches;
    - ``early_majority`` (default on) computes K // 2 + 1 votes of each draw, then the rest only
      for draws with a reported prefix k not yet settled (``workers/votes.py``): exact, the counts
      are those of all votes;
    - ``precision`` bf16/fp16 runs the networks under autocast (GroupNorm stays fp32); ``auto``
      picks bf16 where the hardware computes it natively (``resolve_precision``); ``compile`` wraps
      both networks in ``torch.compile`` (fixed batch shapes: one compilation);
      ``channels_last`` (default: on for CUDA, off for CPU);
    - ``batch_size`` counts rows (images) per network call; when not given, the first call picks it
      (``auto_batch_size``): on CPU from the image size, on CUDA what fits in free memory.
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
        early_majority: bool = True,
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
        self.early_majority = bool(early_majority)
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

    def _ensure_batch_size(self, image_shape: Sequence[int]) -> int:
        if self.batch_size is None:
            self.batch_size = self.auto_batch_size(tuple(int(d) for d in image_shape))
        return self.batch_size

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

    # -- fixed-shape network calls ------------------------------------------------------------

    def _padded(self, rows: torch.Tensor, fn) -> list:
        """``fn`` on ``rows`` in calls of exactly ``batch_size`` rows (the last one zero-padded);
        returns the per-call outputs cut back to the real rows."""
        B = int(self.batch_size)  # type: ignore[arg-type]
        outs = []
        for lo in range(0, rows.shape[0], B):
            chunk = rows[lo : lo + B]
            real = chunk.shape[0]
            if real < B:
                chunk = torch.cat([chunk, chunk.new_zeros((B - real, *chunk.shape[1:]))])
            with self._autocast():
                out = fn(chunk)
            outs.append(tuple(o[:real] if o is not None else None for o in out) if isinstance(out, tuple) else out[:real])
        return outs

    def _net(self, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The denoiser at timestep t on any number of rows (eps, v in float32)."""
        assert self.denoiser is not None
        B = int(self.batch_size)  # type: ignore[arg-type]
        timesteps = torch.full((B,), t, device=x.device, dtype=torch.long)
        outs = self._padded(x, lambda chunk: self.denoiser(chunk, timesteps))  # type: ignore[misc]
        eps = torch.cat([o[0] for o in outs]).float()
        v = torch.cat([o[1] for o in outs]).float() if outs and outs[0][1] is not None else None
        return eps, v

    def _classify(self, images01: torch.Tensor, spec: PurifySpec) -> torch.Tensor:
        """Labels of rows of images in [0, 1]; refuses NaN/inf images or logits."""
        assert self.classifier is not None
        _check_finite(images01, spec, "purified images" if spec.method != "cohen" else "noisy images")
        logits = torch.cat(self._padded(images01, self.classifier)).float()
        _check_finite(logits, spec, "classifier logits")
        return logits.argmax(dim=1)

    # -- counting -----------------------------------------------------------------------------

    @torch.inference_mode()
    def count(self, image: torch.Tensor | np.ndarray, spec: PurifySpec, seeds: Sequence[int] | np.ndarray,
              vote_counts: Sequence[int] | None = None) -> CountResult:
        """Class counts of the smoothed classifier over the draws given by ``seeds`` (one job)."""
        return self.count_many([CountJob(image, spec, np.asarray(seeds), vote_counts)])[0]

    @torch.inference_mode()
    def count_many(self, jobs: Sequence[CountJob]) -> list[CountResult]:
        """Counts of several jobs; jobs with the same spec share network batches.

        ``vote_counts`` (default: [K]) lists the k of the k-vote classifiers to count; all must be
        <= spec.votes. Cohen and DDS have one copy per draw, so only k = 1 applies.
        """
        if self.classifier is None:
            raise ValueError("counting votes needs a classifier")
        results: list[CountResult | None] = [None] * len(jobs)
        by_spec: dict[PurifySpec, list[int]] = {}
        for i, job in enumerate(jobs):
            by_spec.setdefault(job.spec, []).append(i)
        for spec, members in by_spec.items():
            start = time.perf_counter()
            tallies = self._count_spec(spec, [jobs[i] for i in members])
            elapsed = time.perf_counter() - start
            rows = sum(t.rows for t in tallies) or 1
            for i, tally in zip(members, tallies):
                results[i] = CountResult(
                    counts=tally.counts.cpu().numpy(), unet_forwards=tally.unet_forwards,
                    classifier_calls=tally.classifier_calls, seconds=elapsed * tally.rows / rows,
                    votes_computed=tally.votes_computed, votes_skipped=tally.votes_skipped,
                )
        return results  # type: ignore[return-value]

    def _count_spec(self, spec: PurifySpec, jobs: Sequence[CountJob]) -> list[_Tally]:
        purifier = self.purifier(spec)
        K = spec.copies
        vote_lists = [list(j.vote_counts) if j.vote_counts is not None else [K] for j in jobs]
        for vc in vote_lists:
            for k in vc:
                if not 1 <= k <= K:
                    raise ValueError(f"vote count {k} is outside 1..{K}")
        images = torch.stack([torch.as_tensor(j.image, dtype=torch.float32) for j in jobs]).to(self.device)
        shape = tuple(images.shape[1:])
        B = self._ensure_batch_size(shape)
        tallies = [_Tally(torch.zeros(len(vc), self.num_classes, dtype=torch.int64, device=self.device)) for vc in vote_lists]
        owner = np.concatenate([np.full(len(j.seeds), i, dtype=np.int64) for i, j in enumerate(jobs)])
        seeds = np.concatenate([np.asarray(j.seeds, dtype=np.uint64) for j in jobs])
        # Every job counts the prefixes it asks for; the engine computes what the union needs.
        union = sorted({k for vc in vote_lists for k in vc})
        for lo in range(0, len(seeds), B):
            who = owner[lo : lo + B]
            x = images[torch.as_tensor(who, device=self.device)]
            delta = Streams(seeds[lo : lo + B], self.device).normal(shape)
            noisy = purifier.noisy(x, delta)
            if spec.method == "cohen":
                labels, computed = self._classify(noisy, spec).unsqueeze(1), torch.ones(len(who), dtype=torch.int64)
                forwards = torch.zeros(len(who), dtype=torch.int64)
            elif spec.method == "dds":
                x0 = purifier.one_shot(purifier.start(noisy), self._net)
                labels, computed = self._classify((x0 + 1.0) / 2.0, spec).unsqueeze(1), torch.ones(len(who), dtype=torch.int64)
                forwards = torch.ones(len(who), dtype=torch.int64)
            else:
                labels, computed = self._densepure_votes(purifier, purifier.start(noisy), seeds[lo : lo + B], union)
                forwards = 1 + computed * (purifier.reverse_steps - 1)
            self._tally(labels, computed.to(labels.device), forwards, who, vote_lists, tallies, K)
        return tallies

    def _densepure_votes(self, purifier: Purifier, x_t: torch.Tensor, seeds: np.ndarray,
                         vote_counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels (D, K) of the votes computed (-1 for the others) and how many each draw got.

        Votes are computed as prefixes, in at most two waves: first K // 2 + 1 (enough to settle
        every prefix if they agree), then all K for the draws still undecided. Which votes a draw
        gets depends on its own votes only, never on the draws it shares a batch with, so the
        votes computed (and the unit log's costs) are the same however draws are packed into
        calls and batches; the counts are the same as with every vote computed. Without early
        majority, one wave of all K votes.
        """
        D, K = x_t.shape[0], purifier.spec.votes
        B = int(self.batch_size)  # type: ignore[arg-type]
        shape = tuple(x_t.shape[1:])
        eps0, v0 = purifier.first_eval(x_t, self._net)
        labels = torch.full((D, K), -1, dtype=torch.int64, device=self.device)
        computed = torch.zeros(D, dtype=torch.int64, device=self.device)
        target = torch.full((D,), min(K, K // 2 + 1) if self.early_majority else K, dtype=torch.int64, device=self.device)
        while True:
            draw_idx = torch.repeat_interleave(torch.arange(D, device=self.device), target - computed)
            if draw_idx.numel() == 0:
                break
            # Vote index of each row: computed[d], computed[d] + 1, ..., target[d] - 1.
            offsets = torch.arange(draw_idx.numel(), device=self.device) - torch.repeat_interleave(
                torch.cumsum(target - computed, 0) - (target - computed), target - computed)
            vote_idx = computed[draw_idx] + offsets
            for lo in range(0, draw_idx.numel(), B):
                d, j = draw_idx[lo : lo + B], vote_idx[lo : lo + B]
                streams = Streams(vote_seeds(seeds[d.cpu().numpy()], j.cpu().numpy()), self.device)
                x0 = purifier.vote(x_t[d], eps0[d], v0[d] if v0 is not None else None, self._net,
                                   lambda: streams.normal(shape))
                labels[d, j] = self._classify((x0 + 1.0) / 2.0, purifier.spec)
            computed = target.clone()
            if not self.early_majority:
                break
            undecided = more_votes_needed(labels, computed, vote_counts, self.num_classes) > 0
            target = torch.where(undecided, torch.full_like(computed, K), computed)
        return labels, computed

    def _tally(self, labels: torch.Tensor, computed: torch.Tensor, forwards: torch.Tensor, who: np.ndarray,
               vote_lists: list[list[int]], tallies: list[_Tally], K: int) -> None:
        computed_cpu, forwards_cpu = computed.cpu(), forwards.cpu()
        for i in np.unique(who):
            rows = torch.as_tensor(np.nonzero(who == i)[0], device=labels.device)
            vc = vote_lists[i]
            if labels.shape[1] == 1:
                decisions = labels[rows, 0].unsqueeze(0).expand(len(vc), -1)
            else:
                decisions = settled_decisions(labels[rows], computed[rows], vc, self.num_classes)
                if (decisions < 0).any():  # pragma: no cover - the waves run until all are settled
                    raise RuntimeError("early majority left a reported prefix undecided")
            t = tallies[i]
            t.counts += torch.nn.functional.one_hot(decisions, self.num_classes).sum(dim=1)
            n_votes = int(computed_cpu[rows.cpu()].sum())
            t.votes_computed += n_votes
            t.votes_skipped += len(rows) * K - n_votes
            t.classifier_calls += n_votes
            t.unet_forwards += int(forwards_cpu[rows.cpu()].sum())
            t.rows += n_votes + int(forwards_cpu[rows.cpu()].sum())

    # -- purification only --------------------------------------------------------------------

    @torch.inference_mode()
    def purify(self, image: torch.Tensor | np.ndarray, spec: PurifySpec, seeds: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Purified copies of one image, one draw per seed, every vote: (len(seeds), copies, C, H, W)
        in [0, 1] (Cohen: the noisy images themselves)."""
        x = torch.as_tensor(image, dtype=torch.float32, device=self.device)
        purifier = self.purifier(spec)
        shape = tuple(x.shape)
        B = self._ensure_batch_size(shape)
        seeds = np.asarray(seeds, dtype=np.uint64)
        outs = []
        for lo in range(0, len(seeds), B):
            chunk = seeds[lo : lo + B]
            noisy = purifier.noisy(x.expand(len(chunk), *shape), Streams(chunk, self.device).normal(shape))
            if spec.method == "cohen":
                outs.append(noisy.unsqueeze(1))
                continue
            x_t = purifier.start(noisy)
            if spec.method == "dds":
                x0 = purifier.one_shot(x_t, self._net).unsqueeze(1)
            else:
                eps0, v0 = purifier.first_eval(x_t, self._net)
                K = spec.votes
                d = torch.arange(len(chunk), device=self.device).repeat_interleave(K)
                j = torch.arange(K, device=self.device).repeat(len(chunk))
                streams = Streams(vote_seeds(chunk[d.cpu().numpy()], j.cpu().numpy()), self.device)
                x0 = purifier.vote(x_t[d], eps0[d], v0[d] if v0 is not None else None, self._net,
                                   lambda: streams.normal(shape)).reshape(len(chunk), K, *shape)
            _check_finite(x0, spec, "purified images")
            outs.append((x0 + 1.0) / 2.0)
        return torch.cat(outs)


def _check_finite(values: torch.Tensor, spec: PurifySpec, what: str) -> None:
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteError(
            f"{what} of {spec.describe()} are not finite (NaN or inf), so nothing was counted: the denoiser "
            "or these settings break the sampler; check that --model-flags belong to the checkpoint and try "
            "another --steps or sigma"
        )
