"""The small certification runs the pipeline tests share (bundled digits models, seconds each)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
COST_COLUMNS = ["seconds"]  # wall time differs between runs; everything else must not

TINY = dict(
    dataset="digits", denoiser="digits", classifier="digits", methods=["cohen", "dds", "densepure"],
    sigmas=[0.25], votes=[1, 2], steps=2, n0=8, n=40, alpha=0.01, max_images=3, every=5, chunk=20,
    progress=False,
)
TINY_ARGS = [
    "--methods", "cohen,dds,densepure", "--sigmas", "0.25", "--votes", "1,2", "--steps", "2", "--n0", "8",
    "--n", "40", "--alpha", "0.01", "--max", "3", "--every", "5", "--chunk", "20", "--no-progress", "--no-report",
]
TINY_UNITS = 3 * 3 * (1 + 2)  # images x methods x (select + estimate units)

# Ten times the draws: long enough (about 10 s of work) for a kill to land mid-run.
LONGER = dict(n=400, chunk=40)
LONGER_ARGS = [*TINY_ARGS, "--n", "400", "--chunk", "40"]
LONGER_UNITS = 3 * 3 * (1 + 10)


def tiny(out: str | Path, **overrides) -> RunConfig:
    return RunConfig(out=str(out), **{**TINY, **overrides})


def comparable(table: pd.DataFrame) -> pd.DataFrame:
    return table.drop(columns=COST_COLUMNS).reset_index(drop=True)


def quiet(_: str) -> None:
    pass
