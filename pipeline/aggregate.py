"""Aggregation: finished units -> the unit log (exactly once) -> the certification table."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from pipeline.rundir import RunDir
from pipeline.stats import certify
from workers.contract import UnitRecord

TABLE_COLUMNS = [
    "image_id", "label", "sigma", "method", "votes", "steps", "n0", "n", "alpha",
    "prediction", "count", "p_lower", "radius", "correct", "abstain",
    "t_star", "seconds", "unet_forwards", "classifier_calls",
]


class Aggregator:
    """Merges unit results into the run's unit log exactly once.

    A unit id already logged (by this run or a previous attempt of it) is ignored, so a retried
    or duplicated unit can never be counted twice. Results are buffered and written as one
    immutable part file per flush; an unflushed result lost to a crash is simply recomputed on
    resume (draws are deterministic, so it comes back identical).
    """

    def __init__(self, run: RunDir, done: set[str], flush_units: int = 64, flush_seconds: float = 5.0):
        self.run = run
        self.done = set(done)
        self.flush_units = flush_units
        self.flush_seconds = flush_seconds
        self._buffer: list[UnitRecord] = []
        self._last_flush = time.monotonic()

    def add(self, record: UnitRecord) -> bool:
        """Take one finished unit; False (and nothing recorded) if it was already counted."""
        if record.unit_id in self.done:
            return False
        self.done.add(record.unit_id)
        self._buffer.append(record)
        if len(self._buffer) >= self.flush_units or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()
        return True

    def flush(self) -> None:
        if self._buffer:
            self.run.append_units(self._buffer)
            self._buffer = []
        self._last_flush = time.monotonic()


def _sum_counts(rows: pd.DataFrame) -> np.ndarray:
    """Element-wise sum of the units' (votes, classes) count arrays."""
    return np.sum([np.array([np.asarray(c, dtype=np.int64) for c in counts]) for counts in rows["counts"]], axis=0)


def table_from_units(units: pd.DataFrame, config: dict[str, Any]) -> pd.DataFrame:
    """Certification rows for every (image, sigma, method) whose draws are all in ``units``.

    One row per (image, sigma, method, votes). Incomplete groups (a partial run) are left out;
    cost columns are the group's totals, shared by its vote rows (they come from one computation).
    """
    n0, n, alpha = int(config["n0"]), int(config["n"]), float(config["alpha"])
    rows: list[dict[str, Any]] = []
    if len(units) == 0:
        return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in TABLE_COLUMNS})
    units = units.drop_duplicates("unit_id", keep="first")
    for (image_id, sigma, method), group in units.groupby(["image_id", "sigma", "method"], sort=True):
        select = group[group["phase"] == "select"]
        estimate = group[group["phase"] == "estimate"]
        if select["num_draws"].sum() != n0 or estimate["num_draws"].sum() != n:
            continue
        counts0, counts = _sum_counts(select), _sum_counts(estimate)
        votes = list(group["votes"].iloc[0])
        for v, k in enumerate(votes):
            cert = certify(counts0[v], counts[v], n0, n, alpha, float(sigma))
            label = int(group["label"].iloc[0])
            rows.append(
                {
                    "image_id": int(image_id), "label": label, "sigma": float(sigma), "method": method,
                    "votes": int(k), "steps": int(group["steps"].iloc[0]), "n0": n0, "n": n, "alpha": alpha,
                    "prediction": cert.prediction, "count": cert.count, "p_lower": cert.p_lower,
                    "radius": cert.radius, "correct": (not cert.abstain) and cert.prediction == label,
                    "abstain": cert.abstain, "t_star": float(group["t_star"].iloc[0]),
                    "seconds": float(group["seconds"].sum()),
                    "unet_forwards": int(group["unet_forwards"].sum()),
                    "classifier_calls": int(group["classifier_calls"].sum()),
                }
            )
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    return table.astype({c: _dtype(c) for c in TABLE_COLUMNS}).sort_values(
        ["method", "sigma", "votes", "image_id"], ignore_index=True
    )


def _dtype(column: str) -> str:
    if column == "method":
        return "str"  # pandas' string dtype: the same as a Parquet round trip gives back
    if column in ("correct", "abstain"):
        return "bool"
    if column in ("sigma", "alpha", "p_lower", "radius", "t_star", "seconds"):
        return "float64"
    return "int64"

