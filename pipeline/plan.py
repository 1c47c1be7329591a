"""Planning: the run as a list of deterministic, seeded work units (``workers.contract.WorkUnit``).

A unit is (image, sigma, method, phase, draws [start, start + num_draws)); its draws' seeds are
a pure function of those numbers (``workers/seeds.py``), so the plan can be recomputed on resume
and any unit can run anywhere, any number of times, with the same result.
"""

from __future__ import annotations

from typing import Iterable

from pipeline.config import RunConfig
from workers.contract import WorkUnit, table_steps

__all__ = ["plan_units"]


def _chunks(total: int, size: int) -> Iterable[tuple[int, int]]:
    for lo in range(0, total, size):
        yield lo, min(size, total - lo)


def plan_units(config: RunConfig, images: list[tuple[int, int]]) -> list[WorkUnit]:
    """All work units of a run, for ``images`` = [(image_id, label), ...], in a fixed order.

    The order (image, sigma, method, phase, chunk) finishes whole images early, so partial runs
    already give complete rows.
    """
    units: list[WorkUnit] = []
    for image_id, label in images:
        for sigma in config.sigmas:
            for method in config.methods:
                steps = table_steps(method, config.steps)
                votes = tuple(config.vote_counts(method))
                for phase, total in (("select", config.n0), ("estimate", config.n)):
                    for start, size in _chunks(total, config.chunk):
                        units.append(WorkUnit(image_id, label, sigma, method, steps, votes, phase, start, size, config.seed))
    return units
