"""Every draw and every vote of a run has its own random stream, on CPU too, call after call."""

from __future__ import annotations

import numpy as np
import torch

from workers.noise import Streams
from workers.seeds import draw_seeds, vote_seeds


def _first_normals(seeds: np.ndarray, k: int = 4) -> np.ndarray:
    return Streams(seeds, "cpu").normal((k,)).numpy()


def test_200000_estimation_and_1000_selection_draws_have_distinct_streams():
    estimate = draw_seeds(0, 0, 0.25, "estimate", 0, 200_000)
    select = draw_seeds(0, 0, 0.25, "select", 0, 1_000)
    seeds = np.concatenate([estimate, select])
    assert len(np.unique(seeds)) == len(seeds)
    # Distinct generator states: the first normals of the streams (as 4-tuples) are all distinct.
    firsts = _first_normals(seeds)
    assert len(np.unique(firsts, axis=0)) == len(seeds)
    # The same seeds give the same noise on every call.
    np.testing.assert_array_equal(_first_normals(seeds[:1000]), firsts[:1000])


def test_vote_streams_are_distinct_from_each_other_and_from_the_draws():
    draws = draw_seeds(3, 7, 0.5, "estimate", 0, 2_000)
    votes = vote_seeds(draws[:, None], np.arange(40)[None, :])
    everything = np.concatenate([draws, votes.ravel(), draw_seeds(3, 7, 0.5, "select", 0, 100)])
    assert len(np.unique(everything)) == len(everything)
    # A vote's seed depends on its draw's seed and its index only.
    np.testing.assert_array_equal(vote_seeds(draws[10:20], 5), votes[10:20, 5])


def test_seeds_that_agree_in_their_low_32_bits_still_get_different_noise():
    """PyTorch's CPU generator keeps only the low 32 bits of a seed; the streams here do not."""
    a, b = 12345, 12345 + 2**32
    same = torch.randn(5, generator=torch.Generator().manual_seed(a)), torch.randn(5, generator=torch.Generator().manual_seed(b))
    assert torch.equal(*same)  # the collision the project avoids
    ours = Streams(np.array([a, b], dtype=np.uint64), "cpu").normal((5,))
    assert not torch.equal(ours[0], ours[1])


def test_a_stream_continues_where_it_stopped():
    seeds = draw_seeds(0, 1, 0.25, "estimate", 0, 3)
    s = Streams(seeds, "cpu")
    first, second = s.normal((2, 2)), s.normal((2, 2))
    assert not torch.equal(first, second)
    again = Streams(seeds, "cpu")
    assert torch.equal(again.normal((2, 2)), first) and torch.equal(again.normal((2, 2)), second)
