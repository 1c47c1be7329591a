"""Certification results as text: certified-accuracy tables (markdown, LaTeX, CSV) and Cohen et
al.'s ``certify.py`` TSV, one line per image, which their ``analyze.py`` reads unchanged."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from pipeline.metrics import check_columns
from workers.errors import UserError

__all__ = ["TSV_GROUP", "format_table", "select_group", "to_cohen_tsv"]

TSV_GROUP: tuple[str, ...] = ("sigma", "method", "votes", "steps")
"""Keys that pick one smoothed classifier for a Cohen-format TSV (one line per image)."""

_DISPLAY_NAMES: dict[str, str] = {"votes": "K"}


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
    check_columns(df, ["image_id", "label", "prediction", "radius", "correct", "seconds"])
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
