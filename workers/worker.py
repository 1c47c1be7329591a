"""The actor side of a run: load the models and the data once, then turn work units into counts.

``CertifyWorker`` is a plain class; ``pipeline/pool.py`` wraps it with ``ray.remote`` (one per GPU),
and tests or a single-process run can use it directly. ``run_units`` is the pure step both use.
Nothing here imports the driver package (``pipeline``), click or Ray.
"""

from __future__ import annotations

import math
import os
import socket
import time
from typing import Any, Callable, Sequence

import torch

from workers.contract import ModelSpec, UnitRecord, WorkUnit
from workers.engine import CountJob, Engine
from workers.errors import UserError
from workers.purify import PurifySpec


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when this process sees a GPU, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        # In a GPU actor: the node advertises GPUs to Ray but CUDA sees none, a driver or
        # CUDA_VISIBLE_DEVICES problem of the node that no retry would fix.
        import socket

        raise UserError(f"--device cuda, but no CUDA device is visible on {socket.gethostname()}; check the "
                        "NVIDIA driver and CUDA_VISIBLE_DEVICES there, or pass --device cpu")
    return device


def build_engine(spec: ModelSpec, image_shape: tuple[int, int, int] | None = None) -> Engine:
    """Load the classifier (and denoiser) described by ``spec`` into an Engine.

    ``image_shape`` (C,H,W) of the data lets a TorchScript classifier report its class count.
    """
    from workers.models import load_classifier, load_denoiser

    device = resolve_device(spec.device)
    classifier = load_classifier(spec.classifier, device=device, input_shape=image_shape)
    denoiser = load_denoiser(spec.denoiser, spec.model_flags, device=device) if spec.needs_denoiser and spec.denoiser else None
    return Engine(classifier, denoiser, device=device, batch_size=spec.batch_size, precision=spec.precision,
                  compile=spec.compile, early_majority=spec.early_majority)


def purify_spec(unit: WorkUnit) -> PurifySpec:
    """What the engine does for a unit's draws."""
    return PurifySpec(unit.method, unit.sigma, max(unit.steps, 1), unit.max_votes)


def run_units(engine: Engine, image_of: Callable[[int], Any], units: Sequence[WorkUnit], worker: str = "local") -> list[UnitRecord]:
    """Compute units together (draws of units with the same spec share network batches) and
    return their unit-log records, in the order of ``units``."""
    jobs = [CountJob(image_of(u.image_id), purify_spec(u), u.draw_seeds(), u.votes) for u in units]
    results = engine.count_many(jobs)
    finished = time.time()
    records = []
    for unit, result in zip(units, results):
        t_star = engine.purifier(purify_spec(unit)).t_star
        records.append(UnitRecord(
            unit_id=unit.unit_id, image_id=unit.image_id, label=unit.label, sigma=unit.sigma, method=unit.method,
            steps=unit.steps, phase=unit.phase, start=unit.start, num_draws=unit.num_draws, votes=list(unit.votes),
            counts=result.counts.tolist(), t_star=math.nan if t_star is None else float(t_star),
            seconds=result.seconds, unet_forwards=result.unet_forwards, classifier_calls=result.classifier_calls,
            votes_computed=result.votes_computed, votes_skipped=result.votes_skipped,
            worker=worker, engine=engine.describe(), finished_at=finished,
        ))
    return records


class CertifyWorker:
    """Loads the models and the dataset once, then runs work units (one instance per GPU)."""

    def __init__(self, spec: ModelSpec):
        from workers.data import load_dataset

        torch.set_grad_enabled(False)
        self.spec = spec
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        # A problem the user can fix (a path this node cannot see, a model it cannot load) is
        # reported by the first call, as that call's error, so that the driver stops the run
        # with its one-line message instead of replacing a worker that would die the same way.
        self._init_error: UserError | None = None
        try:
            self.dataset = load_dataset(spec.dataset)
            self.engine = build_engine(spec, tuple(self.dataset.image_shape))
        except UserError as exc:
            self._init_error = exc

    def ready(self) -> str:
        """Returns once the models are loaded (actor construction is asynchronous in Ray)."""
        if self._init_error is not None:
            raise self._init_error
        return self.name

    def run(self, units: Sequence[WorkUnit]) -> list[UnitRecord]:
        if self._init_error is not None:
            raise UserError(f"worker {self.name}: {self._init_error}")
        return run_units(self.engine, lambda i: self.dataset.get(i)[0], units, self.name)
