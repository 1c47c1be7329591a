"""Certified-accuracy metrics over certification tables: pure pandas functions of the table.

Conventions follow Cohen et al.'s ``analyze.py``: the "approximate certified accuracy" at radius
r is the share of images that CERTIFY classified correctly, without abstaining, with certified
radius >= r.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from pipeline.stats import lower_confidence_bound
from workers.errors import UserError

__all__ = [
    "DEFAULT_BY",
    "average_certified_radius",
    "best_over_sigma",
    "certified_accuracy",
    "check_columns",
    "check_confidence",
    "check_radii",
    "grouper",
    "is_certified",
]

DEFAULT_BY: tuple[str, ...] = ("method", "sigma", "votes", "steps")
"""One smoothed classifier per group: base method, noise level, number of votes K, reverse steps b."""


def check_radii(radii: Sequence[float] | float) -> list[float]:
    """The radii as floats; UserError unless there is at least one and all are finite and >= 0."""
    if isinstance(radii, (int, float, np.floating, np.integer)):
        radii = [radii]
    out = [float(r) for r in radii]
    if not out:
        raise UserError("radii: give at least one radius, e.g. radii 0 0.25 0.5")
    bad = [r for r in out if not math.isfinite(r) or r < 0]
    if bad:
        raise UserError(f"radii must be finite and >= 0 (got {', '.join(f'{r:g}' for r in bad)}), e.g. radii 0 0.25 0.5")
    return out


def check_confidence(confidence: float | None) -> None:
    """UserError unless ``confidence`` is None or strictly between 0 and 1."""
    if confidence is not None and not (0.0 < confidence < 1.0):
        raise UserError(f"confidence must lie strictly between 0 and 1 (got {confidence:g}), e.g. confidence 0.999")


def check_columns(df: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"certification table lacks columns {missing}; is it a table written by this pipeline?")


def is_certified(df: pd.DataFrame) -> pd.Series:
    """Correct and not abstaining (abstentions count as wrong, as in Cohen's analysis)."""
    return df["correct"].astype(bool) & ~df["abstain"].astype(bool)


def grouper(df: pd.DataFrame, by: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
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
    radii = check_radii(radii)
    check_columns(df, list(by) + ["correct", "abstain", "radius"])
    check_confidence(confidence)
    frame, keys = grouper(df, by)
    certified = is_certified(frame)
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
    check_columns(df, list(by) + ["correct", "abstain", "radius"])
    frame, keys = grouper(df, by)
    value = frame["radius"].where(is_certified(frame), 0.0).astype(float)
    return value.groupby([frame[k] for k in keys], sort=True, dropna=False).mean().rename("acr")
