"""Aggregation: finished units -> the unit log (exactly once) -> the certification table."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import pandas as pd

from pipeline.config import RunConfig
from pipeline.plan import GroupState, group_key, looks_of, sequential_plan
from pipeline.rundir import RunDir
from pipeline.sequential import radius_status, sequential_certify
from pipeline.stats import Certificate, certify
from workers.contract import UnitRecord

__all__ = ["TABLE_COLUMNS", "Aggregator", "group_certificates", "table_from_units"]

TABLE_COLUMNS = [
    "image_id", "label", "sigma", "method", "votes", "steps", "n0", "n", "alpha", "sampling", "n_used",
    "prediction", "count", "p_lower", "alpha_bound", "radius", "correct", "abstain", "radii_certified",
    "t_star", "seconds", "unet_forwards", "classifier_calls", "votes_computed", "votes_skipped", "engine",
]
"""One row per (image, sigma, method, votes). ``n_used``: estimation draws the row's certificate
rests on (n for fixed sampling); ``alpha_bound``: the level of its Clopper-Pearson bound (alpha,
or alpha / L for sequential sampling's L looks); ``radii_certified``: the requested radii of a
sequential run it certifies ("0.25,0.5"); cost columns are the group's totals."""


class Aggregator:
    """Merges unit results into the run's unit log exactly once.

    A unit id already logged (by this run or a previous attempt of it) is ignored, so a retried
    or duplicated unit can never be counted twice. Results are buffered and written as one
    immutable part file per flush; an unflushed result lost to a crash is simply recomputed on
    resume (draws are deterministic, so it comes back identical).
    """

    def __init__(self, run: RunDir, done: set[str], flush_units: int = 1024, flush_seconds: float = 5.0,
                 before_write: Callable[[], None] | None = None):
        self.run = run
        # Raises when this driver may no longer write the folder (its lease was taken over).
        self.before_write = before_write
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
            if self.before_write is not None:
                self.before_write()
            self.run.append_units(self._buffer)
            self._buffer = []
            # Keeps the unit log at O(hundreds) of parts however long the run (cheap when not due).
            self.run.maybe_compact()
        self._last_flush = time.monotonic()


def group_certificates(group: GroupState) -> list[tuple[int, Certificate, tuple[float, ...]]]:
    """(K, certificate, requested radii certified) per vote count of a finished group.

    Fixed sampling: Cohen's CERTIFY on all n estimation draws. Sequential: the bound at the
    stopping look at level alpha / L (``pipeline.sequential.sequential_certify``); the radii
    certified are those of the requested radii whose threshold the bound reaches.
    """
    assert group.finished and group.counts0 is not None
    config = group.config
    counts = group.estimate_counts(group.n_used)
    assert counts is not None
    out = []
    for v, k in enumerate(group.votes):
        if group.plan is None:
            out.append((k, certify(group.counts0[v], counts[v], config.n0, config.n, config.alpha, group.sigma), ()))
            continue
        cert = sequential_certify(group.counts0[v], counts[v], config.n0, group.n_used, group.plan)
        status = radius_status(cert.count, group.n_used, group.plan) if not cert.abstain else ()
        certified = tuple(r for r, s in zip(group.plan.radii, status) if s == "certified")
        out.append((k, cert, certified))
    return out


def table_from_units(units: pd.DataFrame, config: dict[str, Any] | RunConfig) -> pd.DataFrame:
    """Certification rows of every finished (image, sigma, method) group in ``units``.

    One row per (image, sigma, method, votes). Groups whose draws are not all logged (a partial
    run) are left out; the stopping looks of sequential groups are replayed from the logged
    counts (``GroupState``). Cost columns are the group's totals, shared by its vote rows (they
    come from one computation).
    """
    cfg = config if isinstance(config, RunConfig) else RunConfig.from_dict(dict(config))
    if len(units) == 0:
        return _typed(pd.DataFrame(columns=TABLE_COLUMNS))
    units = units.drop_duplicates("unit_id", keep="first").reset_index(drop=True)
    looks = looks_of(cfg)
    # Columns as plain arrays once: per-group pandas indexing costs ~10 ms a group, which is
    # minutes of a resume at 10^5 units; this loop is a few seconds.
    col = {c: units[c].to_numpy() for c in ("unit_id", "phase", "start", "num_draws", "label", "t_star", "seconds",
                                            "unet_forwards", "classifier_calls", "votes_computed", "votes_skipped")}
    engines = units["engine"].astype(str).to_numpy()
    counts = units["counts"].tolist()
    rows: list[dict[str, Any]] = []
    for (image_id, sigma, method), idx in sorted(units.groupby(["image_id", "sigma", "method"]).indices.items()):
        group = GroupState(cfg, int(image_id), int(col["label"][idx[0]]), float(sigma), str(method), looks,
                           sequential_plan(cfg, float(sigma)))
        for i in idx:
            group.add(col["unit_id"][i], col["phase"][i], int(col["start"][i]), int(col["num_draws"][i]), counts[i])
        group.advance()
        if not group.finished:
            continue
        # The units the certificate rests on: selection, and estimation up to the stopping look.
        used = idx[(col["phase"][idx] == "select") | (col["start"][idx] < group.n_used)]
        total = {c: col[c][used].sum() for c in ("seconds", "unet_forwards", "classifier_calls", "votes_computed",
                                                  "votes_skipped")}
        for k, cert, certified in group_certificates(group):
            rows.append({
                "image_id": group.image_id, "label": group.label, "sigma": group.sigma, "method": group.method,
                "votes": int(k), "steps": group.steps, "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha,
                "sampling": cfg.sampling, "n_used": group.n_used,
                "prediction": cert.prediction, "count": cert.count, "p_lower": cert.p_lower,
                "alpha_bound": cfg.alpha if group.plan is None else group.plan.alpha_per_look, "radius": cert.radius,
                "correct": (not cert.abstain) and cert.prediction == group.label, "abstain": cert.abstain,
                "radii_certified": ",".join(f"{r:g}" for r in certified), "t_star": float(col["t_star"][used[0]]),
                "seconds": float(total["seconds"]), "unet_forwards": int(total["unet_forwards"]),
                "classifier_calls": int(total["classifier_calls"]),
                "votes_computed": int(total["votes_computed"]), "votes_skipped": int(total["votes_skipped"]),
                "engine": "; ".join(sorted(set(engines[used]))),
            })
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    return _typed(table).sort_values(["method", "sigma", "votes", "image_id"], ignore_index=True)


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    return table.astype({c: _dtype(c) for c in TABLE_COLUMNS})


def _dtype(column: str) -> str:
    if column in ("method", "sampling", "radii_certified", "engine"):
        return "str"  # pandas' string dtype: the same as a Parquet round trip gives back
    if column in ("correct", "abstain"):
        return "bool"
    if column in ("sigma", "alpha", "p_lower", "alpha_bound", "radius", "t_star", "seconds"):
        return "float64"
    return "int64"
