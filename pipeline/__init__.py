"""The driver side of densepure: planning, scheduling, aggregation, run folders, analysis, CLI.

``from pipeline import Smooth`` gives Cohen et al.'s API over the same engine (``pipeline.smooth``);
it is imported on first use, so that planning and validating a run stays free of torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ABSTAIN", "Smooth"]


def __getattr__(name: str) -> Any:
    if name == "Smooth":
        from pipeline.smooth import Smooth

        return Smooth
    if name == "ABSTAIN":
        from pipeline.stats import ABSTAIN

        return ABSTAIN
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
