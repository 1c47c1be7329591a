"""Certified-accuracy metrics over certification tables: pure pandas functions of the table.

Conventions follow Cohen et al.'s ``analyze.py``: the "approximate certified accuracy" at radius
r is the share of images that CERTIFY classified correctly, without abstaining, with certified
radius >= r.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from scipy.stats import norm

from pipeline.stats import lower_confidence_bound
from workers.errors import UserError

__all__ = [
    "DEFAULT_BY",
    "average_certified_radius",
    "BEST",
    "best_over",
    "best_over_sigma",
    "recertify",
    "sampling_savings",
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


def recertify(df: pd.DataFrame, m: int) -> pd.DataFrame:
    """The rows with every certificate recomputed from its counts at level alpha / m.

    Each row's bound was computed at ``alpha_bound`` (alpha for fixed sampling, alpha / L for
    sequential sampling's L looks); here it becomes the Clopper-Pearson bound of the same count
    at ``alpha_bound / m``, with the radius and abstention that follow. Guarantee (union bound):
    if m rows of one image are each recomputed at alpha / m, all m certificates hold together
    with probability >= 1 - alpha, so a row chosen among them after seeing the results (the best
    sigma, the best K) is still a valid 1 - alpha certificate. A stricter level can only lower a
    bound, so a row that abstained still abstains.
    """
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    check_columns(df, ["count", "n", "sigma", "abstain", "correct", "radius", "p_lower"])
    out = df.copy()
    if m == 1:
        return out
    # Tables of older versions (or concatenations with them) lack n_used / alpha_bound: fixed n.
    n_used = out["n_used"].fillna(out["n"]) if "n_used" in out.columns else out["n"]
    level = (out["alpha_bound"].fillna(out["alpha"]) if "alpha_bound" in out.columns else out["alpha"]).astype(float) / m
    p = np.array([lower_confidence_bound(int(c), int(n), float(a)) for c, n, a in zip(out["count"], n_used, level)], dtype=float)
    abstain = out["abstain"].astype(bool).to_numpy() | (p < 0.5)
    radius = np.where(abstain, 0.0, out["sigma"].to_numpy(dtype=float) * norm.ppf(np.clip(p, 0.5, 1.0)))
    out["p_lower"], out["radius"], out["abstain"] = p, radius, abstain
    out["correct"] = out["correct"].astype(bool) & ~abstain
    if "prediction" in out.columns:
        out["prediction"] = np.where(abstain, -1, out["prediction"])
    if "alpha_bound" in out.columns:
        out["alpha_bound"] = level
    return out


BEST = "best"
"""The label of an envelope row in a key column (e.g. sigma "best")."""


def best_over(
    df: pd.DataFrame,
    radii: Sequence[float],
    over: Sequence[str] = ("sigma",),
    by: Sequence[str] = DEFAULT_BY,
    confidence: float | None = None,
    union_bound: bool = True,
) -> pd.DataFrame:
    """The envelope over ``over`` (sigma, votes, or both): per radius, the best certified accuracy
    among the choices, for each group of the other keys of ``by``.

    With ``union_bound`` (the default) the m choices of a group are compared on certificates
    recomputed at alpha / m (:func:`recertify`), so the best row is a claim with the run's 1 -
    alpha guarantee per image although it was chosen after seeing the results. Without it this is
    the plain maximum of Cohen et al.'s and Carlini et al.'s "best over sigma" rows, optimistic by
    that multiple-testing margin. Index: ``by``, with ``over`` levels holding :data:`BEST`;
    ``attrs["m"]`` maps each group to its m.
    """
    over = list(over)
    by = list(by)
    if not over or any(o not in by for o in over):
        raise ValueError(f"over ({over}) must name keys of by ({by})")
    check_columns(df, by)
    rest = [k for k in by if k not in over]
    frames, ms = [], {}
    for key, part in (df.groupby(rest, sort=True, dropna=False) if rest else [((), df)]):
        key = key if isinstance(key, tuple) else (key,)
        m = int(part[over].drop_duplicates().shape[0])
        ms[key] = m
        rows = recertify(part, m) if union_bound else part
        acc = certified_accuracy(rows, radii, by=by, confidence=confidence)
        best = acc.max(axis=0).to_frame().T
        labels = dict(zip(rest, key))
        best.index = pd.MultiIndex.from_tuples([tuple(labels.get(k, BEST) for k in by)], names=by)
        frames.append(best)
    out = pd.concat(frames)
    out.columns = pd.Index([float(r) for r in check_radii(radii)], dtype=float, name="radius")
    out.attrs = {"m": ms, "union_bound": union_bound}
    return out


def best_over_sigma(
    df: pd.DataFrame,
    radii: Sequence[float],
    by: Sequence[str] = ("method", "votes", "steps"),
    confidence: float | None = None,
    union_bound: bool = True,
) -> pd.DataFrame:
    """:func:`best_over` sigma, indexed by ``by`` alone (the rows of a "best over sigma" table)."""
    if "sigma" in by:
        raise ValueError("by must not contain sigma: the envelope is taken over it")
    out = best_over(df, radii, over=("sigma",), by=(*by, "sigma"), confidence=confidence, union_bound=union_bound)
    return out.droplevel("sigma") if len(by) else out


def average_certified_radius(df: pd.DataFrame, by: Sequence[str] = DEFAULT_BY) -> pd.Series:
    """Average certified radius (ACR): mean over images of radius if certified correct, else 0."""
    check_columns(df, list(by) + ["correct", "abstain", "radius"])
    frame, keys = grouper(df, by)
    value = frame["radius"].where(is_certified(frame), 0.0).astype(float)
    return value.groupby([frame[k] for k in keys], sort=True, dropna=False).mean().rename("acr")


@dataclass(frozen=True)
class Savings:
    """Estimation draws sequential sampling used against its fixed-n budget, and the worker time
    that saved (estimated from the run's own cost: each group's seconds per draw times the draws it
    did not need)."""

    groups: int
    draws_used: int
    draws_budget: int
    seconds_spent: float
    seconds_saved: float

    @property
    def ratio(self) -> float:
        return self.draws_budget / self.draws_used if self.draws_used else float("inf")

    def describe(self, kind: str = "GPU") -> str:
        return (f"sequential sampling used {_count(self.draws_used)} of {_count(self.draws_budget)} estimation draws "
                f"({self.ratio:.1f}x fewer) over {self.groups} groups; about {self.seconds_saved / 3600:.2f} "
                f"{kind}-hours saved against fixed n ({self.seconds_spent / 3600:.2f} spent)")


def _count(value: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(value)


def sampling_savings(df: pd.DataFrame) -> Savings | None:
    """:class:`Savings` of the sequential rows of a table (one count per (image, sigma, method)
    group, whose vote rows share their draws); None when no row was sampled sequentially."""
    if "sampling" not in df.columns or not (df["sampling"] == "sequential").any():
        return None
    keys = [k for k in ("run", "image_id", "sigma", "method") if k in df.columns]
    groups = df[df["sampling"] == "sequential"].drop_duplicates(keys)
    used = groups["n_used"].to_numpy(dtype=np.int64)
    budget = groups["n"].to_numpy(dtype=np.int64)
    seconds = groups["seconds"].to_numpy(dtype=float)
    per_draw = seconds / np.maximum(used + groups["n0"].to_numpy(dtype=np.int64), 1)
    return Savings(len(groups), int(used.sum()), int(budget.sum()), float(seconds.sum()),
                   float((per_draw * (budget - used)).sum()))
