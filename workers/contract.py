"""The contract between the driver (``pipeline/``) and the actors (``workers/``).

What travels between the two sides, and the rules both must apply the same way, defined once:
the methods and their per-method rules, the precisions and devices a run may ask for, a work
unit (what the driver asks an actor to compute), a unit record (what the actor sends back and
the run folder's unit log stores: its Parquet schema is derived from the dataclass fields, so the
two cannot drift apart), and the model spec (what an actor loads).

It lives in ``workers/`` because the driver already depends on the actor side (it loads the
models once on its CPU before any GPU time is spent), while the actor side never imports the
driver: imports between the packages go one way, ``pipeline -> workers``. This module imports
neither torch nor Ray, so planning and validating a run needs neither.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from workers.seeds import draw_seeds, sigma_label

__all__ = [
    "DEVICES",
    "METHODS",
    "PHASES",
    "PRECISIONS",
    "ModelSpec",
    "UnitRecord",
    "WorkUnit",
    "copies",
    "needs_denoiser",
    "table_steps",
    "unet_forwards_per_draw",
    "vote_counts",
]

METHODS: tuple[str, ...] = ("cohen", "dds", "densepure")
"""Base methods: plain Cohen smoothing, Carlini et al.'s one-shot denoiser (DDS), DensePure."""
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
"""Network precisions a run may ask for; ``auto`` picks one per device (``workers.engine``)."""
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
PHASES: tuple[str, ...] = ("select", "estimate")
"""CERTIFY's two independent samples: n0 selection draws, then n estimation draws."""


def needs_denoiser(method: str) -> bool:
    """Whether ``method`` purifies its noisy copies (DDS, DensePure) and so needs a denoiser."""
    return method != "cohen"


def table_steps(method: str, steps: int) -> int:
    """Reverse steps a method runs (the table's ``steps`` column): 0 Cohen, 1 DDS, b DensePure."""
    return {"cohen": 0, "dds": 1}.get(method, int(steps))


def copies(method: str, votes: int) -> int:
    """Purified copies per draw: K votes for DensePure, one otherwise."""
    return int(votes) if method == "densepure" else 1


def vote_counts(method: str, votes: list[int] | tuple[int, ...]) -> list[int]:
    """The k of the k-vote classifiers reported for ``method`` (prefixes of the max(votes) votes)."""
    return sorted({int(v) for v in votes}) if method == "densepure" else [1]


def unet_forwards_per_draw(method: str, steps: int, votes: int) -> int:
    """Network evaluations per draw: 0 Cohen, 1 DDS, 1 + K (b - 1) DensePure (votes share step 1)."""
    if method == "cohen":
        return 0
    if method == "dds":
        return 1
    return 1 + int(votes) * (int(steps) - 1)


@dataclass(frozen=True)
class WorkUnit:
    """One independent piece of work: a range of draws for one (image, sigma, method, phase)."""

    image_id: int
    label: int
    sigma: float
    method: str
    steps: int
    votes: tuple[int, ...]
    phase: str
    start: int
    num_draws: int
    seed: int

    @property
    def unit_id(self) -> str:
        return f"{self.image_id}/{sigma_label(self.sigma)}/{self.method}/{self.phase}/{self.start}"

    @property
    def max_votes(self) -> int:
        return max(self.votes)

    def draw_seeds(self) -> np.ndarray:
        """The 64-bit seeds of the unit's draws (``workers.seeds``)."""
        return draw_seeds(self.seed, self.image_id, self.sigma, self.phase, self.start, self.num_draws)

    def to_dict(self) -> dict:
        return asdict(self)


_ARROW_TYPES: dict[Any, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    list[int]: pa.list_(pa.int64()),
    list[list[int]]: pa.list_(pa.list_(pa.int64())),
}


@dataclass(frozen=True)
class UnitRecord:
    """One finished unit: what it computed (class counts per vote count) and what it cost.

    ``counts[v][c]`` is the number of the unit's draws whose ``votes[v]``-vote decision was class c.
    The run folder's unit log holds one row per record with exactly these columns
    (:meth:`arrow_schema`).
    """

    unit_id: str
    image_id: int
    label: int
    sigma: float
    method: str
    steps: int
    phase: str
    start: int
    num_draws: int
    votes: list[int]
    counts: list[list[int]]
    t_star: float
    seconds: float
    unet_forwards: int
    classifier_calls: int
    votes_computed: int
    """Vote trajectories run (one per draw for Cohen and DDS)."""
    votes_skipped: int
    """DensePure votes early majority left out (they could not change a reported decision)."""
    worker: str
    engine: str
    """The engine settings the counts depend on besides the seeds (``Engine.describe()``)."""
    finished_at: float

    @classmethod
    def arrow_schema(cls) -> pa.Schema:
        """The unit log's Parquet schema, one column per field, in field order."""
        hints = typing.get_type_hints(cls)
        return pa.schema([(f.name, _ARROW_TYPES[hints[f.name]]) for f in dataclasses.fields(cls)])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelSpec:
    """What an actor loads: model and data sources plus execution settings.

    ``model_flags`` travels as a dict (read on the driver), so its file need not exist on the
    worker nodes.
    """

    dataset: str
    classifier: str
    denoiser: str | None = None
    model_flags: dict | None = None
    device: str = "auto"
    batch_size: int | None = None
    precision: str = "auto"
    compile: bool = False
    needs_denoiser: bool = True
    early_majority: bool = True
