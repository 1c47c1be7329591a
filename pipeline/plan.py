"""Planning: the run as a list of deterministic, seeded work units.

A unit is (image, sigma, method, phase, draws [start, start + num_draws)). Each draw's seed is a
pure function of (run seed, image, sigma, phase, draw index) and nothing else, so a draw gives
the same result whichever worker computes it, in whatever order, after however many retries, and
however the draws are chunked into units. The method is not part of the seed: Cohen, DDS and
DensePure see the same smoothing noise for the same draw (common random numbers), which makes
their comparison sharper. Selection and estimation draws have different seeds, so they are never
shared, as CERTIFY requires.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np

from pipeline.config import RunConfig

PHASES = ("select", "estimate")
_PHASE_CODE = {"select": 0, "estimate": 1, "purify": 2}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class WorkUnit:
    """One independent piece of work: a range of draws for one (image, sigma, method, phase)."""

    image_id: int
    label: int
    sigma: float
    method: str
    steps: int
    votes: tuple[int, ...]
    phase: str
    start: int
    num_draws: int
    seed: int

    @property
    def unit_id(self) -> str:
        return f"{self.image_id}/{self.sigma:g}/{self.method}/{self.phase}/{self.start}"

    @property
    def max_votes(self) -> int:
        return max(self.votes)

    def draw_seeds(self) -> np.ndarray:
        return draw_seeds(self.seed, self.image_id, self.sigma, self.phase, self.start, self.num_draws)

    def to_dict(self) -> dict:
        return asdict(self)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective mix of 64-bit integers (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def draw_seeds(run_seed: int, image_id: int, sigma: float, phase: str, start: int, count: int) -> np.ndarray:
    """63-bit seeds of draws start..start+count-1 of (image, sigma, phase) in a run.

    The stream key comes from numpy's SeedSequence (well-mixed, collision-resistant); the draws
    of a stream are SplitMix64 of key + index * golden ratio, the construction SplitMix64 itself
    uses, so any sub-range is computed directly without the draws before it.
    """
    key = np.random.SeedSequence([int(run_seed), int(image_id), int(round(sigma * 1_000_000)), _PHASE_CODE[phase]])
    base = key.generate_state(1, dtype=np.uint64)[0]
    index = np.arange(start, start + count, dtype=np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        mixed = _splitmix64(base + index * _GOLDEN)
    return (mixed >> np.uint64(1)).astype(np.int64)


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
                steps = {"cohen": 0, "dds": 1}.get(method, config.steps)
                votes = tuple(config.vote_counts(method))
                for phase, total in (("select", config.n0), ("estimate", config.n)):
                    for start, size in _chunks(total, config.chunk):
                        units.append(WorkUnit(image_id, label, sigma, method, steps, votes, phase, start, size, config.seed))
    return units
