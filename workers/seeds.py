"""Seeds: every random stream of a run from numbers alone, pairwise distinct by construction.

A run's random numbers come in streams. Each draw (a noisy copy of an image) has a *smoothing*
stream (its noise delta), and each of its DensePure votes j has a *vote* stream (the noise of
vote j's reverse process). A stream's 64-bit seed is

    mix(key(run seed, image, sigma) + index * GOLDEN),   index = phase | slot | draw

with ``phase`` (selection, estimation, the purify command) in bits 62-63, ``slot`` (0 for the
smoothing stream, j + 1 for vote j) in bits 48-61 and the draw's index in bits 0-47. Multiplying
by the odd GOLDEN constant, adding the key and SplitMix64's finaliser ``mix`` are all bijections
of 64-bit integers, so two different (phase, slot, draw) of one (run, image, sigma) can never
get the same seed: no two draws, votes or phases share a stream (CERTIFY needs selection and
estimation draws to be independent, and every draw independent of every other). A vote's seed is
computed from its draw's seed alone (``vote_seeds``), by inverting ``mix``.

A seed depends only on these numbers, so a draw gives the same result whichever worker computes
it, in whatever order, after however many retries, and however the draws are grouped into units.
The method is not part of the key: Cohen, DDS and DensePure see the same smoothing noise for the
same draw (common random numbers), which makes their comparison sharper.

How seeds become noise is ``workers/noise.py``. numpy only here: the driver plans without torch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_DRAWS", "MAX_VOTES", "PHASE_CODES", "draw_seeds", "sigma_key", "sigma_label", "vote_seeds"]

PHASE_CODES = {"select": 0, "estimate": 1, "purify": 2}
_PHASE_SHIFT = np.uint64(62)
_SLOT_SHIFT = np.uint64(48)
MAX_DRAWS = 1 << 48
"""Draw indices of one (image, sigma, phase) must stay below this (2.8e14)."""
MAX_VOTES = (1 << 14) - 1
"""Votes per draw must stay at or below this (16383)."""
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
# Modular inverses (mod 2^64) of the two multipliers, to undo ``_mix``.
_M1_INV = np.uint64(pow(0xBF58476D1CE4E5B9, -1, 1 << 64))
_M2_INV = np.uint64(pow(0x94D049BB133111EB, -1, 1 << 64))
SIGMA_DECIMALS = 6
"""Sigmas enter keys and unit ids rounded to this many decimals (``sigma_key``)."""


def sigma_key(sigma: float) -> int:
    """The integer a sigma is known by in seeds and unit ids: round(sigma * 10^6).

    Two sigmas with the same key would share every stream, so a run refuses them
    (``pipeline.config.RunConfig.validate``).
    """
    return int(round(float(sigma) * 10**SIGMA_DECIMALS))


def sigma_label(sigma: float) -> str:
    """The sigma as unit ids write it: the rounded value of ``sigma_key``, e.g. '0.25', '1', '0.123457'."""
    text = f"{sigma_key(sigma) / 10**SIGMA_DECIMALS:.{SIGMA_DECIMALS}f}".rstrip("0").rstrip(".")
    return text or "0"


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective mix of 64-bit integers (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def _unxorshift(x: np.ndarray, shift: int) -> np.ndarray:
    """Inverse of x ^ (x >> shift) on 64-bit integers."""
    out = x.copy()
    s = np.uint64(shift)
    for _ in range(64 // shift + 1):
        out = x ^ (out >> s)
    return out


def _unmix(x: np.ndarray) -> np.ndarray:
    """The inverse of ``_mix``."""
    with np.errstate(over="ignore"):
        x = _unxorshift(x.astype(np.uint64), 31) * _M2_INV
        x = _unxorshift(x, 27) * _M1_INV
        return _unxorshift(x, 30)


def _key(run_seed: int, image_id: int, sigma: float) -> np.uint64:
    """A well-mixed 64-bit key of (run seed, image, sigma), from numpy's SeedSequence."""
    entropy = [int(run_seed), int(image_id), sigma_key(sigma)]
    if any(v < 0 for v in entropy):
        raise ValueError(f"run seed, image id and sigma must be >= 0, got {entropy}")
    return np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]


def draw_seeds(run_seed: int, image_id: int, sigma: float, phase: str, start: int, count: int) -> np.ndarray:
    """64-bit seeds (uint64) of the smoothing streams of draws start..start+count-1 of
    (image, sigma, phase) in a run. Any sub-range is computed directly, without the draws before it."""
    if not 0 <= start and start + count <= MAX_DRAWS:
        raise ValueError(f"draw indices must lie in [0, {MAX_DRAWS}), got [{start}, {start + count})")
    index = np.arange(start, start + count, dtype=np.uint64) | (np.uint64(PHASE_CODES[phase]) << _PHASE_SHIFT)
    with np.errstate(over="ignore"):
        return _mix(_key(run_seed, image_id, sigma) + index * _GOLDEN)


def vote_seeds(seeds: np.ndarray, votes: np.ndarray | range | int) -> np.ndarray:
    """Seeds of vote streams: vote ``votes`` of the draw with seed ``seeds``, elementwise with numpy
    broadcasting (``vote_seeds(s[:, None], np.arange(K)[None, :])`` gives every vote of every draw).

    Vote j of a draw is the stream in slot j + 1 of the draw's own index (see the module
    docstring), so it depends on nothing but the draw's seed and j, and is distinct from every
    other stream of the run's (image, sigma).
    """
    votes = np.asarray(votes, dtype=np.int64)
    if votes.size and (votes.min() < 0 or votes.max() >= MAX_VOTES):
        raise ValueError(f"vote indices must lie in [0, {MAX_VOTES}), got {votes.min()}..{votes.max()}")
    base = _unmix(np.asarray(seeds, dtype=np.uint64))  # key + index * GOLDEN of each draw
    slots = (votes.astype(np.uint64) + np.uint64(1)) << _SLOT_SHIFT
    with np.errstate(over="ignore"):
        return _mix(base + slots * _GOLDEN)
