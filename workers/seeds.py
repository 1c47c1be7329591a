"""Draw seeds: every noisy draw of a run gets its own 63-bit seed, from numbers alone.

A draw's seed is a pure function of (run seed, image, sigma, phase, draw index) and nothing else,
so a draw gives the same result whichever worker computes it, in whatever order, after however
many retries, and however the draws are chunked into units. The method is not part of the seed:
Cohen, DDS and DensePure see the same smoothing noise for the same draw (common random numbers),
which makes their comparison sharper. Selection and estimation draws have different seeds, so they
are never shared, as CERTIFY requires. numpy only: the driver plans without torch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PHASE_CODES", "draw_seeds"]

# The phase of a draw is part of its stream key; "purify" is the ``densepure purify`` command's.
PHASE_CODES = {"select": 0, "estimate": 1, "purify": 2}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


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
    key = np.random.SeedSequence([int(run_seed), int(image_id), int(round(sigma * 1_000_000)), PHASE_CODES[phase]])
    base = key.generate_state(1, dtype=np.uint64)[0]
    index = np.arange(start, start + count, dtype=np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        mixed = _splitmix64(base + index * _GOLDEN)
    return (mixed >> np.uint64(1)).astype(np.int64)
