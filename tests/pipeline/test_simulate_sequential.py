"""The information bound of ``benchmarks/simulate_sequential.py``: what no sound procedure can beat.

It is the figure the sequential benchmarks compare the project's stopping rule with, so it is
checked against a closed form and against the project's own procedure, which, being sound, must
never use fewer draws on average than the bound says any sound procedure needs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from benchmarks.simulate_sequential import Protocol, information_bound, simulate
from pipeline.sequential import FIRST_LOOK, FUTILITY, GROWTH

PROTO = Protocol("small", 2000, 0.001, 0.25, (0.25, 0.5))


def test_all_agreeing_images_need_log_one_over_alpha_over_log_one_over_threshold() -> None:
    # p_A = 1: the fixed run certifies both radii surely (pi = 1), so kl(1, alpha) = ln(1 / alpha)
    # and KL(1 || t) = ln(1 / t); the larger radius decides.
    bound = information_bound(np.array([1.0]), PROTO)[0]
    assert bound == pytest.approx(math.log(1 / 0.001) / -math.log(norm.cdf(2.0)), rel=1e-9)


def test_images_no_radius_can_be_certified_for_need_nothing() -> None:
    # Below the smallest threshold Phi(1) = 0.841 no sound procedure may certify (pi <= alpha).
    assert (information_bound(np.array([0.0, 0.5, 0.84]), PROTO) == 0.0).all()


def test_the_bound_lies_between_zero_and_the_budget() -> None:
    bound = information_bound(np.linspace(0.0, 1.0, 2001), PROTO)
    assert np.all(np.isfinite(bound)) and bound.min() == 0.0 and bound.max() <= PROTO.budget
    # Closer to the larger radius's threshold from above costs more (while the fixed run still
    # certifies it nearly always).
    near, far = information_bound(np.array([0.99, 0.999]), PROTO)
    assert near > far > 0


@pytest.mark.parametrize("p", [1.0, 0.995, 0.985, 0.9])
def test_the_projects_sound_procedure_never_beats_the_bound(p: float) -> None:
    """Mean draws of the benchmark's own simulation of ``should_stop`` over 2,000 paths
    (standard error under 2 %) are >= the bound: its ratio never exceeds the bound's."""
    assert information_bound(np.array([p]), PROTO)[0] > 0
    row = simulate(PROTO, FIRST_LOOK, GROWTH, FUTILITY, [np.full(2000, p)], np.random.default_rng(11))
    assert row["ratio"] <= row["ratio_information_bound"], row
