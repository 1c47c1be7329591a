"""The pandas API over runs: load certification tables, then compute, format and plot.

A run folder (local path or ``s3://bucket/prefix``) holds ``manifest.json``, an append-only unit
log ``units/part-*.parquet`` and, once complete, ``certification.parquet`` with one row per
(image_id, sigma, method, votes). This module loads them (through :mod:`pipeline.rundir`, so local
and S3 runs behave the same) and gathers, for notebook users, the functions of the table they
need next: metrics (:mod:`pipeline.metrics`), text formats (:mod:`pipeline.formats`) and plots
(:mod:`pipeline.plots`). Run progress is :mod:`pipeline.status`.

    from pipeline.analysis import load_run, certified_accuracy
    df = load_run("s3://bucket/runs/imagenet-sigma05")
    certified_accuracy(df, radii=[0, 0.25, 0.5])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pandas as pd

from pipeline.formats import TSV_GROUP, format_table, select_group, to_cohen_tsv
from pipeline.manifest import Manifest
from pipeline.metrics import DEFAULT_BY, average_certified_radius, best_over_sigma, certified_accuracy
from pipeline.plots import plot_certified_accuracy
from pipeline.rundir import RunDir
from workers.errors import UserError

__all__ = [
    "DEFAULT_BY",
    "PartialRunWarning",
    "TSV_GROUP",
    "average_certified_radius",
    "best_over_sigma",
    "certified_accuracy",
    "export_tsv",
    "format_table",
    "load_run",
    "load_runs",
    "load_units",
    "plot_certified_accuracy",
    "read_manifest",
    "read_table",
    "select_group",
    "to_cohen_tsv",
]


class PartialRunWarning(UserWarning):
    """A run is not complete; its table was rebuilt from the unit log and covers finished images only."""


def read_manifest(run: str) -> Manifest:
    """The run's manifest; UserError if ``run`` is not a run folder of this version."""
    rundir = RunDir(run)
    if not rundir.has_manifest():
        raise UserError(
            f"{run} has no manifest.json; pass a run folder written by densepure (a local path or s3://bucket/prefix)"
        )
    return rundir.read_manifest()


def load_units(run: str) -> pd.DataFrame:
    """The unit log ``RUN/units/part-*.parquet``, one row per unit (empty frame if none yet)."""
    return RunDir(run).read_units()


def read_table(run: str, manifest: Manifest) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(certification table, unit log or None): the final table if complete, else rebuilt from the log."""
    from pipeline.aggregate import table_from_units

    rundir = RunDir(run)
    if manifest.status == "complete" and rundir.has_table():
        return rundir.read_table(), None
    units = rundir.read_units()
    return table_from_units(units, manifest.config), units


def load_run(run: str) -> pd.DataFrame:
    """The certification table of one run, with a ``run`` column holding ``run``.

    A complete run returns ``certification.parquet``. Any other run (running,
    failed, or complete without its final table) is rebuilt from the unit log with
    ``pipeline.aggregate.table_from_units``; it then only holds the (image, sigma,
    method) triples whose draws are all logged, ``df.attrs["partial"]`` is True and
    a :class:`PartialRunWarning` says how many units are done.
    """
    manifest = read_manifest(run)
    df, units = read_table(run, manifest)
    partial = units is not None
    if partial:
        done = int(units["unit_id"].nunique()) if len(units) else 0
        images = int(df["image_id"].nunique()) if len(df) else 0
        reason = f"status {manifest.status}" if manifest.status != "complete" else "certification.parquet missing"
        error = f"; error: {manifest.error}" if manifest.error else ""
        warnings.warn(
            f"run {run} is partial ({reason}): {done}/{manifest.units_total} units done, "
            f"{images} images with at least one finished certificate{error}",
            PartialRunWarning,
            stacklevel=2,
        )
    df = df.copy()
    if "run" in df.columns:
        df = df.drop(columns="run")
    df.insert(0, "run", run)
    df.attrs["partial"] = partial
    return df


def load_runs(runs: Sequence[str]) -> pd.DataFrame:
    """Concatenation of :func:`load_run` over ``runs``.

    ``attrs["partial"]`` is True if any run is partial, and
    ``attrs["partial_runs"]`` lists those runs.
    """
    if isinstance(runs, str):
        runs = [runs]
    if not runs:
        raise UserError("no run given; pass at least one run folder")
    frames = [load_run(r) for r in runs]
    partial_runs = [r for r, f in zip(runs, frames) if f.attrs.get("partial")]
    for f in frames:
        # concat keeps attrs only when they agree; they are recomputed below.
        f.attrs = {}
    df = pd.concat(frames, ignore_index=True)
    df.attrs["partial"] = bool(partial_runs)
    df.attrs["partial_runs"] = partial_runs
    return df


def export_tsv(
    run: str,
    path: str,
    *,
    sigma: float | None = None,
    method: str | None = None,
    votes: int | None = None,
    steps: int | None = None,
) -> int:
    """Write one group of ``run`` as a Cohen-format TSV to the local ``path``; returns the image count."""
    df = load_run(run)
    rows = select_group(df, sigma=sigma, method=method, votes=votes, steps=steps)
    text = to_cohen_tsv(rows)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    return len(rows)
