"""Certification results as text: certified-accuracy tables (markdown, LaTeX, CSV) and Cohen et
al.'s ``certify.py`` TSV, one line per image, which their ``analyze.py`` reads unchanged (one file
per smoothed classifier, or every classifier of a run in one file with its group columns)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from pipeline.metrics import BEST, check_columns
from workers.errors import UserError

__all__ = ["COHEN_COLUMNS", "TSV_GROUP", "filter_groups", "format_table", "group_file_name", "groups", "select_group",
           "to_cohen_tsv", "to_grouped_tsv"]

TSV_GROUP: tuple[str, ...] = ("sigma", "method", "votes", "steps")
"""Keys that pick one smoothed classifier for a Cohen-format TSV (one line per image)."""

COHEN_COLUMNS: tuple[str, ...] = ("idx", "label", "predict", "radius", "correct", "time")
"""The columns of Cohen et al.'s ``certify.py`` output, in its order."""

_DISPLAY_NAMES: dict[str, str] = {"votes": "K"}


def _group_label(key: tuple[Any, ...], names: Sequence[str]) -> str:
    return " ".join(f"--{n} {_fmt_key(n, v)}" for n, v in zip(names, key))


def _fmt_key(name: str, value: Any) -> str:
    if name == "sigma":
        return f"{float(value):g}"
    return str(value)


def _listing(df: pd.DataFrame) -> str:
    available = sorted(df.groupby(list(TSV_GROUP), sort=True).groups.keys()) if len(df) else []
    return "; ".join(_group_label(g, TSV_GROUP) for g in available) or "none (the table is empty)"


def filter_groups(
    df: pd.DataFrame,
    *,
    sigma: float | None = None,
    method: str | None = None,
    votes: int | None = None,
    steps: int | None = None,
) -> pd.DataFrame:
    """Rows of the smoothed classifiers matching the given keys (all rows when none is given).

    UserError (listing the available groups) if nothing matches.
    """
    check_columns(df, TSV_GROUP)
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
    if len(chosen) == 0:
        raise UserError(f"no rows match the selection; available groups: {_listing(df)}")
    return chosen


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
    chosen = filter_groups(df, sigma=sigma, method=method, votes=votes, steps=steps)
    found = sorted(chosen.groupby(list(TSV_GROUP), sort=True).groups.keys())
    if len(found) == 1:
        return chosen
    listing = "; ".join(_group_label(g, TSV_GROUP) for g in found)
    raise UserError(f"{len(found)} groups match; pick one with --sigma/--method/--votes/--steps: {listing}")


def groups(df: pd.DataFrame) -> list[tuple[tuple[Any, ...], pd.DataFrame]]:
    """[((sigma, method, votes, steps), rows), ...], one entry per smoothed classifier, sorted by key."""
    check_columns(df, TSV_GROUP)
    return [(tuple(k), g) for k, g in df.groupby(list(TSV_GROUP), sort=True)]


def group_file_name(key: tuple[Any, ...]) -> str:
    """A file name that says which classifier a per-group TSV holds, e.g. ``densepure_sigma0.5_K4_b10.tsv``."""
    sigma, method, votes, steps = key
    return f"{method}_sigma{float(sigma):g}_K{int(votes)}_b{int(steps)}.tsv"


def _radius_text(radius: float, cohen_rounding: bool) -> str:
    # repr is the shortest text that reads back as the same float: full precision, no noise digits.
    return f"{radius:.3}" if cohen_rounding else repr(float(radius))


def _cohen_fields(r: Any, cohen_rounding: bool) -> str:
    elapsed = str(datetime.timedelta(seconds=float(r.seconds)))
    return (f"{int(r.image_id)}\t{int(r.label)}\t{int(r.prediction)}\t{_radius_text(float(r.radius), cohen_rounding)}"
            f"\t{int(bool(r.correct))}\t{elapsed}")


def _check_one_row_per_image(rows: pd.DataFrame, keys: Sequence[str]) -> None:
    if rows.duplicated(subset=[*keys, "image_id"]).any():
        raise UserError("the table holds several rows per image for this group (several runs?); export one run at a time")


def to_cohen_tsv(df: pd.DataFrame, *, cohen_rounding: bool = False) -> str:
    """Cohen et al.'s ``certify.py`` output for one smoothed classifier.

    Header ``idx label predict radius correct time``, tab separated, one line per image sorted
    by idx, time as ``str(datetime.timedelta(seconds=...))`` as the reference script writes it,
    so Cohen's ``analyze.py`` reads it unchanged. The radius is written at full precision (the
    shortest text that reads back as the same float); ``cohen_rounding=True`` writes it with
    ``{:.3}`` as ``certify.py`` does, for byte-identical files. ``df`` must hold one group
    (UserError listing the groups otherwise; see :func:`select_group`).
    """
    check_columns(df, ["image_id", "label", "prediction", "radius", "correct", "seconds"])
    rows = select_group(df)
    _check_one_row_per_image(rows, ())
    lines = ["\t".join(COHEN_COLUMNS)]
    lines += [_cohen_fields(r, cohen_rounding) for r in rows.sort_values("image_id").itertuples(index=False)]
    return "\n".join(lines) + "\n"


def to_grouped_tsv(df: pd.DataFrame, *, cohen_rounding: bool = False) -> str:
    """Every smoothed classifier of ``df`` in one TSV: the group columns ``sigma method votes
    steps`` and then Cohen's columns (:func:`to_cohen_tsv`), sorted by group and idx.

    ``pandas.read_csv(path, sep="\t")`` reads it back; each group's rows, without the group
    columns, are that group's Cohen-format file.
    """
    check_columns(df, [*TSV_GROUP, "image_id", "label", "prediction", "radius", "correct", "seconds"])
    _check_one_row_per_image(df, TSV_GROUP)
    lines = ["\t".join([*TSV_GROUP, *COHEN_COLUMNS])]
    for key, rows in groups(df):
        prefix = "\t".join(_fmt_key(n, v) for n, v in zip(TSV_GROUP, key))
        lines += [f"{prefix}\t{_cohen_fields(r, cohen_rounding)}" for r in rows.sort_values("image_id").itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _index_frame(acc: pd.DataFrame) -> pd.DataFrame:
    """The index of ``acc`` as columns (handles a flat index)."""
    return acc.index.to_frame(index=False)


def _table_rows(acc: pd.DataFrame, values: np.ndarray, best: pd.DataFrame | None = None,
                best_values: np.ndarray | None = None) -> tuple[list[str], list[tuple[list[Any], list[float], bool]]]:
    """Label names and rows (labels, values, is_best) in the order of ``acc``'s groups, each row of
    ``best`` (envelope rows, "best" in their envelope keys) right after the last row it covers."""
    names = [str(n) for n in acc.index.names]
    keys = _index_frame(acc)
    order = sorted(range(len(acc)), key=lambda i: tuple(
        (str(v) if isinstance(v, str) else v) for n, v in zip(names, keys.iloc[i]) if n != "sigma"
    ) + (float(keys.iloc[i]["sigma"]) if "sigma" in names else 0.0,))
    rows: list[tuple[list[Any], list[float], bool]] = [(list(keys.iloc[i]), list(values[i]), False) for i in order]
    if best is None or not len(best):
        return names, rows
    best_keys = _index_frame(best)
    for j in range(len(best)):
        label = list(best_keys.iloc[j])
        fixed = [(k, v) for k, v in enumerate(label) if not (isinstance(v, str) and v == BEST)]
        after = max((i for i, (lab, _, _) in enumerate(rows) if all(lab[k] == v for k, v in fixed)), default=len(rows) - 1)
        rows.insert(after + 1, (label, list(best_values[j]), True))
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
    extra: Mapping[str, pd.Series] | None = None,
    best: pd.DataFrame | None = None,
) -> str:
    """Render a :func:`certified_accuracy` frame as markdown, LaTeX (booktabs) or CSV.

    Rows are the groups (method, sigma, K, steps, ...), columns the radii. ``best`` (from
    ``pipeline.metrics.best_over``, same index names) adds its envelope rows, e.g. sigma "best",
    after the rows they cover. ``extra`` adds named columns after the radii, one value per group
    (a Series indexed like ``acc_df``, e.g. ``{"ACR": average_certified_radius(df)}``); the best
    rows leave them empty. Markdown and LaTeX show ``digits`` decimals; CSV keeps full precision and
    uses the bare radius (and the lower-case extra name) as column header so it reads back as numbers.
    """
    radii = [float(r) for r in acc_df.columns]
    extra_names = list(extra or {})
    values = acc_df.to_numpy(dtype=float)
    if extra:
        aligned = []
        for name, series in extra.items():
            column = pd.Series(series).reindex(acc_df.index)
            if column.isna().all() and len(column):
                raise ValueError(f"extra column {name!r} is not indexed like the accuracy table")
            aligned.append(column.to_numpy(dtype=float))
        values = np.column_stack([values, *aligned])
    best_values = None
    if best is not None and len(best):
        if list(best.index.names) != list(acc_df.index.names):
            raise ValueError("best rows must be indexed like the accuracy table")
        best_values = np.column_stack([best.to_numpy(dtype=float), np.full((len(best), len(extra_names)), np.nan)])
    names, rows = _table_rows(acc_df, values, best, best_values)
    heads = [_DISPLAY_NAMES.get(n, n) for n in names]

    def cell(v: float) -> str:
        return "" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"

    if fmt == "csv":
        out = [",".join(heads + [f"{r:g}" for r in radii] + [n.lower() for n in extra_names])]
        for labels, vals, _ in rows:
            lab = [_csv_quote(_fmt_label(n, v)) for n, v in zip(names, labels)]
            out.append(",".join(lab + ["" if not np.isfinite(v) else repr(float(v)) for v in vals]))
        return "\n".join(out) + "\n"
    if fmt == "markdown":
        header = heads + [_radius_header(r) for r in radii] + extra_names
        align = [":--" if n in ("method", "run", "group") else "--:" for n in names] + ["--:"] * (len(radii) + len(extra_names))
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
        for labels, vals, _ in rows:
            lab = [_fmt_label(n, v).replace("|", r"\|") for n, v in zip(names, labels)]
            lines.append("| " + " | ".join(lab + [cell(v) for v in vals]) + " |")
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        latex_heads = {"sigma": r"$\sigma$", "K": "$K$"}
        header = ([latex_heads.get(h, _latex_escape(h)) for h in heads] + [f"${_radius_header(r)}$" for r in radii]
                  + [_latex_escape(n) for n in extra_names])
        spec = "".join("l" if n in ("method", "run", "group") else "r" for n in names) + "r" * (len(radii) + len(extra_names))
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


def accuracy_report(
    df: pd.DataFrame,
    radii: Sequence[float],
    fmt: Literal["markdown", "latex", "csv"] = "markdown",
    by: Sequence[str] = ("method", "sigma", "votes", "steps"),
    confidence: float | None = None,
    acr: bool = False,
    best_sigma: bool = True,
    best_votes: bool = False,
    union_bound: bool = True,
) -> tuple[str, list[str]]:
    """The certified-accuracy table of ``densepure report`` (and of the end of a run), and the notes
    that say what its best rows mean.

    Best rows: over sigma (``best_sigma``), over the vote counts K of DensePure (``best_votes``), or
    over both; with ``union_bound`` each is computed from certificates recomputed at alpha / m for
    its m choices (``pipeline.metrics.best_over``), so it keeps the per-image 1 - alpha guarantee.
    """
    from pipeline.metrics import average_certified_radius, best_over, certified_accuracy

    acc = certified_accuracy(df, radii, by=by, confidence=confidence)
    envelopes, notes = [], []
    overs = []
    if best_sigma:
        overs.append(("sigma",))
    if best_votes:
        overs.append(("votes",))
        if best_sigma:
            overs.append(("sigma", "votes"))
    for over in overs:
        # Only groups with a real choice get a best row.
        best = best_over(df, radii, over=over, by=by, confidence=confidence, union_bound=union_bound)
        choice = {k: m for k, m in best.attrs["m"].items() if m > 1}
        keep = [i for i, (k, m) in enumerate(best.attrs["m"].items()) if m > 1]
        if keep:
            envelopes.append(best.iloc[keep])
            ms = sorted(set(choice.values()))
            what = " and ".join("sigma" if o == "sigma" else "K" for o in over)
            if union_bound:
                notes.append(f"best over {what}: each row's certificates recomputed at alpha/m (m = {', '.join(map(str, ms))} "
                             "choices) before taking the best, so the best row keeps the 1 - alpha guarantee (union bound)")
            else:
                notes.append(f"best over {what}: the plain maximum (optimistic: choosing among m = {', '.join(map(str, ms))} "
                             "certificates after seeing them needs alpha/m each; drop --naive-best for that)")
    best_frame = pd.concat(envelopes) if envelopes else None
    extra = {"ACR": average_certified_radius(df, by=by)} if acr else None
    return format_table(acc, fmt, extra=extra, best=best_frame), notes
