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

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd

from pipeline.formats import (
    TSV_GROUP,
    filter_groups,
    format_table,
    group_file_name,
    groups,
    select_group,
    to_cohen_tsv,
    to_grouped_tsv,
)
from pipeline.manifest import Manifest
from pipeline.metrics import DEFAULT_BY, average_certified_radius, best_over_sigma, certified_accuracy
from pipeline.plots import plot_certified_accuracy
from pipeline.rundir import RunDir
from workers import storage
from workers.errors import UserError, first_line

__all__ = [
    "DEFAULT_BY",
    "PartialRunWarning",
    "TSV_GROUP",
    "average_certified_radius",
    "best_over_sigma",
    "certified_accuracy",
    "check_local_output",
    "export_per_group",
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


@contextlib.contextmanager
def _reading(run: str) -> Iterator[None]:
    """Storage failures while reading ``run`` as one-line UserErrors.

    pyarrow reports an unreachable S3 endpoint (or a local permission problem) as a bare
    OSError whose text is long and names no fix; the user needs the run, the endpoint and what
    to check.
    """
    try:
        yield
    except UserError:
        raise
    except OSError as exc:
        if storage.is_s3(run):
            where = storage.s3_settings().display_endpoint
            raise UserError(
                f"cannot read run {run} from S3 at {where} ({first_line(exc, 200)}); check that the endpoint is up "
                "and reachable (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3) and the AWS credentials"
            ) from exc
        raise UserError(f"cannot read run {run} ({first_line(exc, 200)}); check the path and its permissions") from exc


def read_manifest(run: str) -> Manifest:
    """The run's manifest; UserError if ``run`` is not a run folder of this version or cannot be read."""
    rundir = RunDir(run)
    with _reading(run):
        storage.check_reachable(run)  # a dead endpoint: one line in seconds, not after every retry's backoff
        if not rundir.has_manifest():
            raise UserError(
                f"{run} has no manifest.json; pass a run folder written by densepure (a local path or s3://bucket/prefix)"
            )
        return rundir.read_manifest()


def load_units(run: str) -> pd.DataFrame:
    """The unit log ``RUN/units/part-*.parquet``, one row per unit (empty frame if none yet)."""
    with _reading(run):
        return RunDir(run).read_units()


def read_table(run: str, manifest: Manifest) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(certification table, unit log or None): the final table if complete, else rebuilt from the log."""
    from pipeline.aggregate import table_from_units

    rundir = RunDir(run)
    with _reading(run):
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
    a :class:`PartialRunWarning` says how many units are done. ``df.attrs["decided_radii"]`` holds
    the radii a sequential run's stopping rule decided (its --radii), () for fixed sampling.
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
    config = manifest.config
    df.attrs["decided_radii"] = tuple(float(r) for r in config.get("radii") or ()) \
        if config.get("sampling") == "sequential" else ()
    return df


def load_runs(runs: Sequence[str]) -> pd.DataFrame:
    """Concatenation of :func:`load_run` over ``runs``.

    ``attrs["partial"]`` is True if any run is partial,
    ``attrs["partial_runs"]`` lists those runs, and ``attrs["decided_radii"]`` maps each
    sequential run to the radii its stopping rule decided.
    """
    if isinstance(runs, str):
        runs = [runs]
    if not runs:
        raise UserError("no run given; pass at least one run folder")
    frames = [load_run(r) for r in runs]
    partial_runs = [r for r, f in zip(runs, frames) if f.attrs.get("partial")]
    decided = {r: f.attrs["decided_radii"] for r, f in zip(runs, frames) if f.attrs.get("decided_radii")}
    for f in frames:
        # concat keeps attrs only when they agree; they are recomputed below.
        f.attrs = {}
    df = pd.concat(frames, ignore_index=True)
    df.attrs["partial"] = bool(partial_runs)
    df.attrs["partial_runs"] = partial_runs
    df.attrs["decided_radii"] = decided
    return df


def check_local_output(path: str, what: str = "output file") -> Path:
    """``path`` as a local file path that can be written; UserError (one line) otherwise.

    Refused: URIs (``s3://`` included: exports and plots are small local files, copy them
    afterwards), a missing parent directory (it is not created: a typo would otherwise leave
    folders around) and an existing directory.
    """
    if storage.is_s3(path) or "://" in path:
        raise UserError(f"the {what} {path} is not a local path: write it to a local file, then copy it (e.g. aws s3 cp FILE {path})")
    target = Path(path).expanduser()
    parent = target.parent
    if not parent.is_dir():
        raise UserError(f"{parent} does not exist (the {what} {path} goes there): create it first, or pick another path")
    if target.is_dir() and what != "export directory":
        raise UserError(f"the {what} {path} is a directory: give a file name")
    return target


def _write_text(target: Path, text: str) -> None:
    """Write atomically: a hidden temp file beside ``target``, then a rename, so an interrupted
    export never leaves a truncated file that reads like a complete one."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _selection(sigma: float | None, method: str | None, votes: int | None, steps: int | None) -> dict:
    return {"sigma": sigma, "method": method, "votes": votes, "steps": steps}


def export_tsv(
    run: str,
    path: str,
    *,
    sigma: float | None = None,
    method: str | None = None,
    votes: int | None = None,
    steps: int | None = None,
    cohen_rounding: bool = False,
) -> int:
    """Write ``run``'s certificates as TSV to the local ``path``; returns the number of rows.

    With no selection key: every group in one file (``pipeline.formats.to_grouped_tsv``: the
    group columns sigma/method/votes/steps, then Cohen's columns). With any of ``sigma``,
    ``method``, ``votes``, ``steps``: the one group they pick, in Cohen's ``certify.py`` format
    (``to_cohen_tsv``; UserError listing the groups when they pick none or several). Radii are
    written at full precision unless ``cohen_rounding`` (``{:.3}``, byte-compatible with
    ``certify.py``). The file is written whole or not at all.
    """
    target = check_local_output(path, "TSV file")
    df = load_run(run)
    keys = _selection(sigma, method, votes, steps)
    if any(v is not None for v in keys.values()):
        rows = select_group(df, **keys)
        text = to_cohen_tsv(rows, cohen_rounding=cohen_rounding)
    else:
        rows = df
        text = to_grouped_tsv(df, cohen_rounding=cohen_rounding)
    _write_text(target, text)
    return len(rows)


def export_per_group(
    run: str,
    directory: str,
    *,
    sigma: float | None = None,
    method: str | None = None,
    votes: int | None = None,
    steps: int | None = None,
    cohen_rounding: bool = False,
) -> list[tuple[str, int]]:
    """One Cohen-format TSV per group of ``run`` in the local ``directory``, named by the group's
    keys (``pipeline.formats.group_file_name``, e.g. ``densepure_sigma0.5_K4_b10.tsv``); the keys
    given narrow the groups. ``directory`` is created if missing (its parent must exist).
    Returns [(path, rows), ...]; every file is written whole or not at all.
    """
    check_local_output(directory, "export directory")
    folder = Path(directory).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"the export directory {directory} is a file: give a directory")
    df = filter_groups(load_run(run), **_selection(sigma, method, votes, steps))
    folder.mkdir(exist_ok=True)
    written = []
    for key, rows in groups(df):
        target = folder / group_file_name(key)
        _write_text(target, to_cohen_tsv(rows, cohen_rounding=cohen_rounding))
        written.append((str(target), len(rows)))
    return written
