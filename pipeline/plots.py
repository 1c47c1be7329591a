"""Certified-accuracy curves as PNG files (matplotlib's Agg canvas: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.metrics import DEFAULT_BY, check_columns, grouper, is_certified
from workers.errors import UserError

__all__ = ["plot_certified_accuracy"]


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

    check_columns(df, list(by) + ["correct", "abstain", "radius"])
    certified = is_certified(df)
    if radii_max is None:
        top = float(df.loc[certified, "radius"].max()) if certified.any() else 0.0
        radii_max = top * 1.05 if top > 0 else 1.0
    if not (radii_max > 0 and math.isfinite(radii_max)):
        raise UserError(f"radii_max must be a positive number (got {radii_max})")
    grid = np.linspace(0.0, float(radii_max), 1001)

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    frame, keys = grouper(df, by)
    for key, g in frame.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        radii = np.sort(g.loc[is_certified(g), "radius"].to_numpy(dtype=float))
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
