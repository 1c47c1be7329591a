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

from benchmarks.simulate_sequential import Protocol, information_bound
from pipeline.sequential import SequentialPlan, should_stop

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
    """Mean draws of ``should_stop`` over 2,000 paths (standard error under 2 %) >= the bound."""
    plan = SequentialPlan.make(PROTO.budget, PROTO.alpha, PROTO.sigma, PROTO.radii)
    rng = np.random.default_rng(11)
    steps = np.diff(np.concatenate(([0], plan.looks)))
    counts = np.cumsum(rng.binomial(steps[None, :], p, size=(2000, len(plan.looks))), axis=1)
    cache: dict[tuple[int, int], bool] = {}
    used = []
    for row in counts:
        for k, n in zip(row, plan.looks):
            key = (int(k), n)
            if key not in cache:
                cache[key] = should_stop([int(k)], n, plan)
            if cache[key]:
                used.append(n)
                break
    bound = information_bound(np.array([p]), PROTO)[0]
    assert bound > 0
    assert np.mean(used) >= bound, (np.mean(used), bound)
