"""The inner certification engine: noisy draws -> purified copies -> classifier votes -> counts.

One ``Engine`` holds a loaded classifier (and denoiser) and turns (image, method, draw seeds)
into per-class counts of the smoothed classifier's base decisions, for several vote counts K at
once (the first k of K votes form a valid k-vote classifier). It knows nothing of Ray, files or
statistics: the Ray actor in ``workers/worker.py`` and the ``densepure purify`` command both call it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from workers.purify import Purifier, PurifySpec, draw_generators

if TYPE_CHECKING:
    from workers.models import Classifier, Denoiser

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


class Engine:
    """Counts smoothed-classifier decisions for one image at a time, in batches of draws."""

    def __init__(
        self,
        classifier: "Classifier | None",
        denoiser: "Denoiser | None" = None,
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
        precision: str = "fp32",
        compile: bool = False,
        channels_last: bool | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        # A classifier is needed to count votes, not to purify (``densepure purify``).
        self.classifier = classifier.to(self.device).eval() if classifier is not None else None
        self.denoiser = denoiser.to(self.device).eval() if denoiser is not None else None
        self.num_classes = int(classifier.num_classes) if classifier is not None else 0
        self.precision = precision
        if channels_last is None:
            channels_last = self.device.type == "cuda"
        for name in ("classifier", "denoiser"):
            module = getattr(self, name)
            if module is None:
                continue
            if channels_last:
                module.to(memory_format=torch.channels_last)
            if compile:
                setattr(self, name, torch.compile(module))
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 128)
        self._purifiers: dict[PurifySpec, Purifier] = {}

    def purifier(self, spec: PurifySpec) -> Purifier:
        if spec not in self._purifiers:
            self._purifiers[spec] = Purifier(spec, self.denoiser)
        return self._purifiers[spec]

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def draws_per_batch(self, spec: PurifySpec) -> int:
        """Draws per forward batch, so that draws x copies stays within ``batch_size`` images."""
        return max(1, self.batch_size // spec.copies)

    @torch.inference_mode()
    def purify(self, image: torch.Tensor | np.ndarray, spec: PurifySpec, seeds: Sequence[int]) -> torch.Tensor:
        """Purified copies of one image, one draw per seed: (len(seeds), copies, C, H, W)."""
        x = torch.as_tensor(image, dtype=torch.float32, device=self.device)
        purifier = self.purifier(spec)
        step = self.draws_per_batch(spec)
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
        step = self.draws_per_batch(spec)
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
