"""Pandas API over certification tables: certified accuracy, ACR, tables, plots, run status.

A run folder (local path or ``s3://bucket/prefix``) holds ``manifest.json``, an
append-only unit log ``units/part-*.parquet`` and, once complete,
``certification.parquet`` with one row per (image_id, sigma, method, votes).
Everything here reads through :mod:`pipeline.rundir` (hence :mod:`pipeline.storage`),
so local and S3 runs behave the same, and every metric is a pure function of the table.

Conventions follow Cohen et al.'s ``analyze.py``: the "approximate certified
accuracy" at radius r is the share of images that CERTIFY classified correctly,
without abstaining, with certified radius >= r.
"""

from __future__ import annotations

import datetime
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from pipeline.errors import UserError
from pipeline.rundir import RunDir
from pipeline.stats import lower_confidence_bound

__all__ = [
    "DEFAULT_BY",
    "PartialRunWarning",
    "TSV_GROUP",
    "average_certified_radius",
    "best_over_sigma",
    "certified_accuracy",
    "export_tsv",
    "format_status",
    "format_table",
    "load_run",
    "load_runs",
    "load_units",
    "plot_certified_accuracy",
    "read_manifest",
    "run_status",
    "select_group",
    "to_cohen_tsv",
]

DEFAULT_BY: tuple[str, ...] = ("method", "sigma", "votes", "steps")
"""One smoothed classifier per group: base method, noise level, number of votes K, reverse steps b."""

TSV_GROUP: tuple[str, ...] = ("sigma", "method", "votes", "steps")
"""Keys that pick one smoothed classifier for a Cohen-format TSV (one line per image)."""

_DISPLAY_NAMES: dict[str, str] = {"votes": "K"}


class PartialRunWarning(UserWarning):
    """A run is not complete; its table was rebuilt from the unit log and covers finished images only."""


# --------------------------------------------------------------------------- loading


def read_manifest(run: str) -> dict[str, Any]:
    """The run's ``manifest.json``; UserError if ``run`` is not a run folder."""
    rundir = RunDir(run)
    if not rundir.has_manifest():
        raise UserError(
            f"{run} has no manifest.json; pass a run folder written by the pipeline (a local path or s3://bucket/prefix)"
        )
    return rundir.read_manifest()


def load_units(run: str) -> pd.DataFrame:
    """The unit log ``RUN/units/part-*.parquet``, one row per unit (empty frame if none yet)."""
    return RunDir(run).read_units()


def _table_from_unit_log(units: pd.DataFrame, config: dict[str, Any]) -> pd.DataFrame:
    # Imported here: aggregation is only needed for unfinished runs, and keeping it
    # out of module import avoids an import cycle if aggregate ever uses analysis.
    from pipeline.aggregate import table_from_units

    missing = [k for k in ("n0", "n", "alpha") if k not in config]
    if missing:
        raise UserError(f"the run's manifest config lacks {missing}; it was not written by this pipeline version")
    return table_from_units(units, config)


def _read_table(run: str, manifest: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(certification table, unit log or None): the final table if complete, else rebuilt from the log."""
    rundir = RunDir(run)
    if manifest.get("status") == "complete" and rundir.has_table():
        return rundir.read_table(), None
    units = rundir.read_units()
    return _table_from_unit_log(units, manifest.get("config") or {}), units


def load_run(run: str) -> pd.DataFrame:
    """The certification table of one run, with a ``run`` column holding ``run``.

    A complete run returns ``certification.parquet``. Any other run (running,
    failed, or complete without its final table) is rebuilt from the unit log with
    ``pipeline.aggregate.table_from_units``; it then only holds the (image, sigma,
    method) triples whose draws are all logged, ``df.attrs["partial"]`` is True and
    a :class:`PartialRunWarning` says how many units are done.
    """
    manifest = read_manifest(run)
    status = manifest.get("status", "unknown")
    df, units = _read_table(run, manifest)
    partial = units is not None
    if partial:
        done = int(units["unit_id"].nunique()) if len(units) else 0
        total = manifest.get("units_total", "?")
        images = int(df["image_id"].nunique()) if len(df) else 0
        reason = f"status {status}" if status != "complete" else "certification.parquet missing"
        error = f"; error: {manifest['error']}" if manifest.get("error") else ""
        warnings.warn(
            f"run {run} is partial ({reason}): {done}/{total} units done, "
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


# --------------------------------------------------------------------------- metrics


def _check_radii(radii: Sequence[float] | float) -> list[float]:
    if isinstance(radii, (int, float, np.floating, np.integer)):
        radii = [radii]
    out = [float(r) for r in radii]
    if not out:
        raise UserError("--radii needs at least one radius, e.g. --radii 0 0.25 0.5")
    bad = [r for r in out if not math.isfinite(r) or r < 0]
    if bad:
        raise UserError(f"--radii must be finite and >= 0 (got {bad}), e.g. --radii 0 0.25 0.5")
    return out


def _check_columns(df: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"certification table lacks columns {missing}; is it a table written by this pipeline?")


def _certified(df: pd.DataFrame) -> pd.Series:
    """Correct and not abstaining (abstentions count as wrong, as in Cohen's analysis)."""
    return df["correct"].astype(bool) & ~df["abstain"].astype(bool)


def _grouper(df: pd.DataFrame, by: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """(frame, keys) such that ``frame.groupby(keys)`` works even for ``by=()`` (one group "all")."""
    keys = list(by)
    if keys:
        return df, keys
    return df.assign(group="all"), ["group"]


def certified_accuracy(
    df: pd.DataFrame,
    radii: Sequence[float],
    by: Sequence[str] = DEFAULT_BY,
    confidence: float | None = None,
) -> pd.DataFrame:
    """Approximate certified accuracy per group at each radius (Cohen et al., Sec. 4).

    Value at radius r: share of rows (images) with ``correct & ~abstain & radius >= r``.
    At r = 0 this is the clean accuracy of the smoothed classifier under CERTIFY.
    Returns one row per group (index = ``by``) and one column per radius.

    ``confidence`` (e.g. 0.999): return instead the one-sided Clopper-Pearson lower
    bound, at that confidence, on the probability that a fresh image from the data
    distribution is certified correctly at radius r, treating the m images of the
    group as an i.i.d. sample (k certified out of m, bound = alpha quantile of
    Beta(k, m - k + 1) with alpha = 1 - confidence). This accounts for the finite
    test set only; each certificate itself still holds with probability 1 - alpha
    of the run (``alpha`` column), which this bound does not add in.
    """
    radii = _check_radii(radii)
    _check_columns(df, list(by) + ["correct", "abstain", "radius"])
    if confidence is not None and not (0.0 < confidence < 1.0):
        raise UserError(f"--confidence must lie strictly between 0 and 1 (got {confidence}), e.g. --confidence 0.999")
    frame, keys = _grouper(df, by)
    certified = _certified(frame)
    hits = pd.DataFrame(
        {i: (certified & (frame["radius"] >= r)).astype(np.int64) for i, r in enumerate(radii)}, index=frame.index
    )
    grouped = hits.groupby([frame[k] for k in keys], sort=True, dropna=False)
    counts = grouped.sum()
    sizes = grouped.size()
    if confidence is None:
        out = counts.div(sizes, axis=0).astype(float)
    else:
        alpha = 1.0 - confidence
        out = pd.DataFrame(
            [[lower_confidence_bound(int(k), int(m), alpha) for k in row] for row, m in zip(counts.to_numpy(), sizes)],
            index=counts.index,
            columns=counts.columns,
            dtype=float,
        )
    # Columns were positions so that equal radii given twice stay distinct; now name them by radius.
    out.columns = pd.Index(radii, dtype=float, name="radius")
    out.attrs = {"confidence": confidence, "images": {k: int(v) for k, v in sizes.items()}}
    return out


def _envelope(acc: pd.DataFrame) -> pd.DataFrame:
    """Max over the ``sigma`` index level of a certified-accuracy frame, per remaining key."""
    names = list(acc.index.names)
    if "sigma" not in names:
        raise ValueError("accuracy frame has no sigma level to take the envelope over")
    rest = [n for n in names if n != "sigma"]
    if not rest:
        best = acc.max(axis=0).to_frame().T
        best.index = pd.Index(["all"], name="group")
        return best
    return acc.groupby(level=rest, sort=True, dropna=False).max()


def best_over_sigma(
    df: pd.DataFrame,
    radii: Sequence[float],
    by: Sequence[str] = ("method", "votes", "steps"),
    confidence: float | None = None,
) -> pd.DataFrame:
    """Envelope over sigma: for each radius, the best certified accuracy among the sigmas.

    This is the "best over sigma" row of Cohen et al.'s and Carlini et al.'s tables.
    Choosing sigma after seeing the results makes it optimistic by a multiple-testing
    margin (small for 3 sigmas); report it as such.
    """
    if "sigma" in by:
        raise ValueError("by must not contain sigma: the envelope is taken over it")
    acc = certified_accuracy(df, radii, by=tuple(by) + ("sigma",), confidence=confidence)
    out = _envelope(acc)
    out.columns = pd.Index(acc.columns, dtype=float, name="radius")
    return out


def average_certified_radius(df: pd.DataFrame, by: Sequence[str] = DEFAULT_BY) -> pd.Series:
    """Average certified radius (ACR): mean over images of radius if certified correct, else 0."""
    _check_columns(df, list(by) + ["correct", "abstain", "radius"])
    frame, keys = _grouper(df, by)
    value = frame["radius"].where(_certified(frame), 0.0).astype(float)
    return value.groupby([frame[k] for k in keys], sort=True, dropna=False).mean().rename("acr")


# --------------------------------------------------------------------------- Cohen TSV


def _group_label(key: tuple[Any, ...], names: Sequence[str]) -> str:
    return " ".join(f"--{n} {_fmt_key(n, v)}" for n, v in zip(names, key))


def _fmt_key(name: str, value: Any) -> str:
    if name == "sigma":
        return f"{float(value):g}"
    return str(value)


def select_group(
    df: pd.DataFrame,
    *,
    sigma: float | None = None,
    method: str | None = None,
    votes: int | None = None,
    steps: int | None = None,
) -> pd.DataFrame:
    """Rows of the one smoothed classifier matching the given keys.

    UserError (listing the available groups) if nothing matches or if the keys
    still leave several (sigma, method, votes, steps) groups.
    """
    _check_columns(df, TSV_GROUP)
    mask = pd.Series(True, index=df.index)
    if sigma is not None:
        mask &= np.isclose(df["sigma"].astype(float), float(sigma), rtol=0, atol=1e-9)
    if method is not None:
        mask &= df["method"] == method
    if votes is not None:
        mask &= df["votes"] == int(votes)
    if steps is not None:
        mask &= df["steps"] == int(steps)
    chosen = df[mask]
    groups = sorted(chosen.groupby(list(TSV_GROUP), sort=True).groups.keys()) if len(chosen) else []
    if len(groups) == 1:
        return chosen
    available = sorted(df.groupby(list(TSV_GROUP), sort=True).groups.keys()) if len(df) else []
    listing = "; ".join(_group_label(g, TSV_GROUP) for g in available) or "none (the table is empty)"
    if not groups:
        raise UserError(f"no rows match the selection; available groups: {listing}")
    listing = "; ".join(_group_label(g, TSV_GROUP) for g in groups)
    raise UserError(f"{len(groups)} groups match; pick one with --sigma/--method/--votes/--steps: {listing}")


def to_cohen_tsv(df: pd.DataFrame) -> str:
    """Cohen et al.'s ``certify.py`` output for one smoothed classifier.

    Header ``idx label predict radius correct time``, tab separated, one line per
    image sorted by idx; radius printed with ``{:.3}`` and time as
    ``str(datetime.timedelta(seconds=...))`` exactly as the reference script does,
    so Cohen's ``analyze.py`` reads it unchanged. ``df`` must hold one group
    (UserError listing the groups otherwise; see :func:`select_group`).
    """
    _check_columns(df, ["image_id", "label", "prediction", "radius", "correct", "seconds"])
    rows = select_group(df)
    if rows["image_id"].duplicated().any():
        raise UserError("the table holds several rows per image for this group (several runs?); export one run at a time")
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    for r in rows.sort_values("image_id").itertuples(index=False):
        elapsed = str(datetime.timedelta(seconds=float(r.seconds)))
        lines.append(
            f"{int(r.image_id)}\t{int(r.label)}\t{int(r.prediction)}\t{float(r.radius):.3}\t{int(bool(r.correct))}\t{elapsed}"
        )
    return "\n".join(lines) + "\n"


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


# --------------------------------------------------------------------------- tables


def _index_frame(acc: pd.DataFrame) -> pd.DataFrame:
    """The index of ``acc`` as columns (handles a flat index)."""
    return acc.index.to_frame(index=False)


def _table_rows(acc: pd.DataFrame) -> tuple[list[str], list[tuple[list[Any], list[float], bool]]]:
    """Label names and rows (labels, values, is_best) ordered group by group, with a best-over-sigma row.

    The best row is added after the sigmas of each (all keys but sigma) group when
    that group has more than one sigma; its sigma label is "best".
    """
    names = [str(n) for n in acc.index.names]
    keys = _index_frame(acc)
    values = acc.to_numpy(dtype=float)
    rows: list[tuple[list[Any], list[float], bool]] = []
    if "sigma" not in names:
        for i in range(len(acc)):
            rows.append((list(keys.iloc[i]), list(values[i]), False))
        return names, rows
    rest = [n for n in names if n != "sigma"]
    group_of = [tuple(keys.iloc[i][rest]) for i in range(len(acc))] if rest else [()] * len(acc)
    order: dict[tuple[Any, ...], list[int]] = {}
    for i, g in enumerate(group_of):
        order.setdefault(g, []).append(i)
    for g in sorted(order, key=lambda t: tuple(str(x) if isinstance(x, str) else x for x in t)):
        members = sorted(order[g], key=lambda i: float(keys.iloc[i]["sigma"]))
        for i in members:
            rows.append((list(keys.iloc[i]), list(values[i]), False))
        if len(members) > 1:
            label = list(keys.iloc[members[0]])
            label[names.index("sigma")] = "best"
            rows.append((label, list(np.nanmax(values[members], axis=0)), True))
    return names, rows


def _fmt_label(name: str, value: Any) -> str:
    if name == "sigma" and not isinstance(value, str):
        return f"{float(value):g}"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _radius_header(r: float) -> str:
    return f"r={r:g}"


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)


def format_table(
    acc_df: pd.DataFrame,
    fmt: Literal["markdown", "latex", "csv"] = "markdown",
    digits: int = 3,
) -> str:
    """Render a :func:`certified_accuracy` frame as markdown, LaTeX (booktabs) or CSV.

    Rows are the groups (method, sigma, K, steps, ...), columns the radii; after the
    sigmas of each method/K/steps group comes a best-over-sigma row (sigma "best").
    Markdown and LaTeX show ``digits`` decimals; CSV keeps full precision and uses
    the bare radius as column header so it reads back as numbers.
    """
    names, rows = _table_rows(acc_df)
    radii = [float(r) for r in acc_df.columns]
    heads = [_DISPLAY_NAMES.get(n, n) for n in names]

    def cell(v: float) -> str:
        return "" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"

    if fmt == "csv":
        out = [",".join(heads + [f"{r:g}" for r in radii])]
        for labels, vals, _ in rows:
            lab = [_csv_quote(_fmt_label(n, v)) for n, v in zip(names, labels)]
            out.append(",".join(lab + ["" if not np.isfinite(v) else repr(float(v)) for v in vals]))
        return "\n".join(out) + "\n"
    if fmt == "markdown":
        header = heads + [_radius_header(r) for r in radii]
        align = [":--" if n in ("method", "run", "group") else "--:" for n in names] + ["--:"] * len(radii)
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
        for labels, vals, _ in rows:
            lab = [_fmt_label(n, v).replace("|", r"\|") for n, v in zip(names, labels)]
            lines.append("| " + " | ".join(lab + [cell(v) for v in vals]) + " |")
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        latex_heads = {"sigma": r"$\sigma$", "K": "$K$"}
        header = [latex_heads.get(h, _latex_escape(h)) for h in heads] + [f"${_radius_header(r)}$" for r in radii]
        spec = "".join("l" if n in ("method", "run", "group") else "r" for n in names) + "r" * len(radii)
        lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
        for i, (labels, vals, is_best) in enumerate(rows):
            lab = [_latex_escape(_fmt_label(n, v)) for n, v in zip(names, labels)]
            lines.append(" & ".join(lab + [cell(v) for v in vals]) + r" \\")
            # A rule after each best row separates the method/K groups.
            if is_best and i < len(rows) - 1:
                lines.append(r"\midrule")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
    raise UserError(f"--format must be markdown, latex or csv (got {fmt!r})")


def _csv_quote(text: str) -> str:
    if any(ch in text for ch in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


# --------------------------------------------------------------------------- plot


def _curve_label(names: Sequence[str], key: tuple[Any, ...]) -> str:
    parts = []
    for n, v in zip(names, key):
        if n == "method":
            parts.append(str(v))
        elif n == "sigma":
            parts.append(f"σ={float(v):g}")
        elif n == "votes":
            parts.append(f"K={v}")
        elif n == "steps":
            parts.append(f"b={v}")
        else:
            parts.append(f"{v}")
    return " ".join(parts)


def plot_certified_accuracy(
    df: pd.DataFrame,
    path: str,
    radii_max: float | None = None,
    by: Sequence[str] = DEFAULT_BY,
    title: str | None = None,
) -> str:
    """Save certified-accuracy curves (one line per group) as a PNG at the local ``path``.

    x: radius on a 1001-point grid from 0 to ``radii_max`` (default: 5% beyond the
    largest certified radius); y: approximate certified accuracy. The figure is
    800x500 pixels. Rendering uses matplotlib's Agg canvas on a standalone Figure
    rather than pyplot, so no display is needed and the caller's backend is untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_columns(df, list(by) + ["correct", "abstain", "radius"])
    certified = _certified(df)
    if radii_max is None:
        top = float(df.loc[certified, "radius"].max()) if certified.any() else 0.0
        radii_max = top * 1.05 if top > 0 else 1.0
    if not (radii_max > 0 and math.isfinite(radii_max)):
        raise UserError(f"radii_max must be a positive number (got {radii_max})")
    grid = np.linspace(0.0, float(radii_max), 1001)

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    frame, keys = _grouper(df, by)
    for key, g in frame.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        radii = np.sort(g.loc[_certified(g), "radius"].to_numpy(dtype=float))
        # Images certified at r are those with radius >= r: a suffix of the sorted radii.
        acc = (len(radii) - np.searchsorted(radii, grid, side="left")) / len(g)
        ax.plot(grid, acc, label=_curve_label(keys, key))
    ax.set_xlim(0.0, float(radii_max))
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("radius (L2)")
    ax.set_ylabel("certified accuracy")
    ax.set_title(title or "Approximate certified accuracy")
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(loc="upper right", fontsize="small")
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------- status


def _expected_pairs(config: dict[str, Any]) -> int | None:
    """Number of (sigma, method) certifications per image, if the config says."""
    sigmas, methods = config.get("sigmas"), config.get("methods")
    if isinstance(sigmas, (list, tuple)) and isinstance(methods, (list, tuple)) and sigmas and methods:
        return len(sigmas) * len(methods)
    return None


def _images_finished(table: pd.DataFrame, config: dict[str, Any]) -> int:
    """Images whose every (sigma, method) certificate is done."""
    if table.empty:
        return 0
    pairs = table[["image_id", "sigma", "method"]].drop_duplicates()
    per_image = pairs.groupby("image_id").size()
    need = _expected_pairs(config) or int(len(pairs[["sigma", "method"]].drop_duplicates()))
    return int((per_image >= need).sum())


def _as_int(x: Any) -> int | None:
    try:
        return None if x is None else int(x)
    except (TypeError, ValueError):
        return None


def run_status(run: str) -> dict[str, Any]:
    """Progress, cost and throughput of a run, from its manifest and unit log.

    * ``units_done``: distinct unit ids in the log (the log is the source of truth;
      the manifest's own counter, which may lag, is ``units_done_manifest``).
    * ``gpu_seconds``, ``unet_forwards``, ``classifier_calls``: sums over the log
      (the manifest's ``cost`` when there is no log).
    * ``draws_per_second``: draws of logged units divided by the wall span from
      the start of the earliest unit (``finished_at - seconds``) to the last
      ``finished_at``. It is the whole cluster's throughput, so it already counts
      parallel workers; ``draws_per_gpu_second`` (draws / summed unit seconds) is the
      per-worker speed. Pauses inside the span (a resumed run) lower the rate.
    * ``eta_seconds``: remaining draws / draws_per_second, with total draws =
      images x sigmas x methods x (n0 + n) from the config; falls back to the
      remaining-unit share of elapsed wall time when the config lacks those keys.
    * ``engines``: the distinct engine settings (device, precision, batch size) of the logged
      units; more than one means the counts are valid but not reproducible bit for bit.
    * ``accuracy_r0``: certified accuracy at radius 0 on finished images, per group.
    """
    manifest = read_manifest(run)
    config = manifest.get("config") or {}
    status = manifest.get("status", "unknown")
    table, units = _read_table(run, manifest)
    partial = units is not None
    if units is None:
        # Complete run: the log is still there for throughput figures.
        units = load_units(run)

    cost = manifest.get("cost") or {}
    has_log = not units.empty
    units_done = int(units["unit_id"].nunique()) if has_log else _as_int(manifest.get("units_done")) or 0
    units_total = _as_int(manifest.get("units_total"))

    def total(col: str, fallback: str) -> float:
        if has_log and col in units.columns:
            return float(units[col].sum())
        return float(cost.get(fallback) or 0)

    gpu_seconds = total("seconds", "gpu_seconds")
    unet_forwards = int(total("unet_forwards", "unet_forwards"))
    classifier_calls = int(total("classifier_calls", "classifier_calls"))
    draws_done = int(units["num_draws"].sum()) if has_log and "num_draws" in units.columns else _as_int(cost.get("draws")) or 0

    wall = None
    workers = 0
    if has_log and {"finished_at", "seconds"} <= set(units.columns):
        start = float((units["finished_at"] - units["seconds"]).min())
        end = float(units["finished_at"].max())
        wall = max(end - start, 0.0)
        workers = int(units["worker"].nunique()) if "worker" in units.columns else 0
    engines = sorted(units["engine"].dropna().unique().tolist()) if has_log and "engine" in units.columns else []
    draws_per_second = draws_done / wall if wall and draws_done else None
    draws_per_gpu_second = draws_done / gpu_seconds if gpu_seconds > 0 and draws_done else None

    images_total = _as_int(manifest.get("images_total"))
    pairs = _expected_pairs(config)
    n0, n = _as_int(config.get("n0")), _as_int(config.get("n"))
    draws_total = images_total * pairs * (n0 + n) if None not in (images_total, pairs, n0, n) else None

    eta = None
    if status == "complete":
        eta = 0.0
    elif draws_total is not None and draws_per_second:
        eta = max(draws_total - draws_done, 0) / draws_per_second
    elif units_total and units_done and wall:
        eta = max(units_total - units_done, 0) * wall / units_done

    accuracy_r0: list[dict[str, Any]] = []
    if not table.empty and set(DEFAULT_BY) <= set(table.columns):
        acc = certified_accuracy(table, [0.0])
        images = acc.attrs["images"]
        for key, value in acc[0.0].items():
            row = dict(zip(DEFAULT_BY, key))
            row["sigma"] = float(row["sigma"])
            row["votes"], row["steps"] = int(row["votes"]), int(row["steps"])
            row.update(accuracy=float(value), images=int(images[key]))
            accuracy_r0.append(row)

    return {
        "run": run,
        "run_id": manifest.get("run_id"),
        "status": status,
        "error": manifest.get("error"),
        "created_at": manifest.get("created_at"),
        "updated_at": manifest.get("updated_at"),
        "partial": partial,
        "units_done": units_done,
        "units_done_manifest": _as_int(manifest.get("units_done")),
        "units_total": units_total,
        "images_done": _images_finished(table, config),
        "images_total": images_total,
        "draws_done": draws_done,
        "draws_total": draws_total,
        "gpu_seconds": gpu_seconds,
        "unet_forwards": unet_forwards,
        "classifier_calls": classifier_calls,
        "wall_seconds": wall,
        "workers": workers,
        "engines": engines,
        "draws_per_second": draws_per_second,
        "draws_per_gpu_second": draws_per_gpu_second,
        "eta_seconds": eta,
        "accuracy_r0": accuracy_r0,
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return str(datetime.timedelta(seconds=round(float(seconds))))


def _of(done: Any, total: Any) -> str:
    if total:
        return f"{done:,}/{total:,} ({100.0 * done / total:.1f}%)"
    return f"{done:,}/?"


def format_status(status: dict[str, Any]) -> str:
    """Human-readable, multi-line rendering of :func:`run_status`."""
    s = status
    head = f"run {s['run']}"
    if s.get("run_id"):
        head += f" (id {s['run_id']})"
    lines = [f"{head}: {s['status']}"]
    if s.get("error"):
        lines.append(f"  error:      {s['error']}")
    lines.append(f"  units:      {_of(s['units_done'], s['units_total'])}")
    lines.append(f"  images:     {_of(s['images_done'], s['images_total'])} finished")
    lines.append(f"  draws:      {_of(s['draws_done'], s['draws_total'])}")
    # Worker time is GPU time unless every logged unit ran on a CPU (the demo, tests).
    engines = s.get("engines") or []
    kind = "CPU" if engines and all(e.startswith("cpu") for e in engines) else "GPU"
    lines.append(
        f"  cost:       {s['gpu_seconds'] / 3600:.2f} {kind}-hours ({s['gpu_seconds']:.0f} s), "
        f"{s['unet_forwards']:,} UNet forwards, {s['classifier_calls']:,} classifier calls"
    )
    if s.get("draws_per_second"):
        per_gpu = f", {s['draws_per_gpu_second']:.1f} per {kind}-second" if s.get("draws_per_gpu_second") else ""
        lines.append(
            f"  throughput: {s['draws_per_second']:.1f} draws/s over {_duration(s['wall_seconds'])} wall "
            f"with {s['workers']} workers{per_gpu}"
        )
    else:
        lines.append("  throughput: unknown (no finished units yet)")
    if len(engines) == 1:
        lines.append(f"  engine:     {engines[0]}")
    elif engines:
        # Counts stay valid, but a rerun on one setting would not reproduce them bit for bit.
        lines.append(f"  engine:     MIXED settings across units: {'; '.join(engines)}")
    lines.append(f"  ETA:        {_duration(s['eta_seconds'])}")
    if s.get("updated_at"):
        lines.append(f"  updated:    {s['updated_at']}")
    if s["accuracy_r0"]:
        note = " (finished images only)" if s.get("partial") else ""
        lines.append(f"  certified accuracy at r=0{note}:")
        for row in s["accuracy_r0"]:
            lines.append(
                f"    {row['method']} sigma={row['sigma']:g} K={row['votes']} steps={row['steps']}: "
                f"{row['accuracy']:.3f} ({row['images']} images)"
            )
    return "\n".join(lines)
