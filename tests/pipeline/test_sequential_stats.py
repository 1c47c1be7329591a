"""Tests of pipeline.sequential: coverage under optional stopping, and the pieces of the stopping rule.

The coverage tests simulate Bernoulli(p) estimation draws (binomial increments between looks,
vectorised over trials) and count how often the reported bound exceeds p. With 20,000 trials
per p the standard error at alpha = 0.01 is 0.0007, so a procedure whose error rate were 2 alpha
would exceed the allowance alpha + 3 se by about 13 standard errors; the negative control (the
fixed-n bound re-evaluated at every look) shows the test does fail such a procedure.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable

import numpy as np
import pytest
from scipy.stats import binom, norm

from workers.errors import UserError
from pipeline.sequential import (
    CERTIFIED,
    FIRST_LOOK,
    FUTILE,
    FUTILITY,
    GROWTH,
    OPEN,
    PRACTICAL_BUDGET,
    UNREACHABLE,
    SequentialPlan,
    best_case_lower_bound,
    certifiable_within_budget,
    look_schedule,
    lower_bound_at_look,
    max_certifiable_radius_sequential,
    min_budget_for_radius,
    needed_count,
    radius_status,
    row_settled,
    sequential_certify,
    should_stop,
    upper_bound_at_look,
    validate_radii,
)
from pipeline.stats import ABSTAIN, certify, lower_confidence_bound, max_certifiable_radius

# ============================================================================================
# Coverage: P[p_lower > p] <= alpha, fixed and sequential
# ============================================================================================

ALPHA = 0.01
TRIALS = 20_000
PS = (0.5, 0.6, 0.9, 0.99, 0.9999)
# 100,000 draws: the paper's CIFAR-10 budget, and large enough that p = 0.9999 can be exceeded
# (the all-agree bound passes 0.9999 only after about 75,000 draws).
BUDGET = 100_000
SE = math.sqrt(ALPHA * (1 - ALPHA) / TRIALS)
ALLOWANCE = ALPHA + 3 * SE


def _paths(p: float, looks: tuple[int, ...], seed: int) -> np.ndarray:
    """Successes among the first n_j draws at every look, (TRIALS, L), from binomial increments."""
    rng = np.random.default_rng(seed)
    steps = np.diff(np.concatenate(([0], looks)))
    return np.cumsum(rng.binomial(steps[None, :], p, size=(TRIALS, len(looks))), axis=1)


def _apply(func: Callable[[int, int], object], counts: np.ndarray, n: int) -> np.ndarray:
    """func(n_a, n) for every trial, called once per distinct count (the counts repeat a lot)."""
    uniq, inverse = np.unique(counts, return_inverse=True)
    return np.array([func(int(k), n) for k in uniq])[inverse.ravel()]


def _first_exceeding(bound: Callable[[int, int], float], n: int, p: float) -> int:
    """Smallest count k with bound(k, n) > p (n + 1 if none), by bisection.

    Why bisection: the Clopper-Pearson bound increases with the count, so "bound > p" at look n
    is "count >= k", and ~17 evaluations per look replace one per distinct count (thousands);
    ``test_critical_counts_match_direct_evaluation`` checks the shortcut on sampled counts.
    """
    if bound(n, n) <= p:
        return n + 1
    lo = int(math.floor(n * p))  # bound(k) <= k / n <= p here; checked below, not assumed
    if bound(lo, n) > p:
        lo = 0
    hi = n  # invariant: bound(lo) <= p < bound(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if bound(mid, n) <= p else (lo, mid)
    return hi


def _coverage_plan(p: float) -> SequentialPlan:
    """A plan whose thresholds lie a few standard errors (at ~2,000 draws) either side of p.

    Rows are then decided (certified or futile) at different looks from trial to trial, and the
    rule stops on exactly the fluctuations that would push a bound above p. Radii are >= 0, so
    a threshold below 1/2 (p = 0.5) is left out.
    """
    delta = 4 * math.sqrt(p * (1 - p) / 2000)
    thresholds = [t for t in (p - delta, min(p + delta, p + (1 - p) / 2)) if t >= 0.5]
    radii = tuple(sorted(float(norm.ppf(t)) for t in thresholds))
    return SequentialPlan.make(BUDGET, ALPHA, 1.0, radii)


def _stopping_looks(counts: np.ndarray, plan: SequentialPlan) -> np.ndarray:
    """Index of the look where should_stop first holds, per trial (one row per group).

    Only trials still drawing are evaluated at each look, as in the pipeline.
    """
    tau = np.full(counts.shape[0], len(plan.looks) - 1)
    active = np.arange(counts.shape[0])
    for j, n in enumerate(plan.looks):
        stop = _apply(lambda k, n: should_stop([k], n, plan), counts[active, j], n).astype(bool)
        tau[active[stop]] = j
        active = active[~stop]
    assert active.size == 0  # the last look always stops
    return tau


def _bounds_at(counts: np.ndarray, tau: np.ndarray, plan: SequentialPlan) -> np.ndarray:
    """lower_bound_at_look at each trial's stopping look."""
    out = np.empty(counts.shape[0])
    for j in np.unique(tau):
        rows = np.flatnonzero(tau == j)
        n = plan.looks[j]
        out[rows] = _apply(lambda k, n: lower_bound_at_look(k, n, plan), counts[rows, j], n)
    return out


@pytest.fixture(scope="module")
def coverage() -> dict[float, dict[str, object]]:
    """Per p: error rates of the fixed, sequential (two stopping rules) and naive procedures."""
    out: dict[float, dict[str, object]] = {}
    for i, p in enumerate(PS):
        plan = _coverage_plan(p)
        looks = plan.looks
        counts = _paths(p, looks, seed=1000 + i)
        # Fixed n: Cohen's bound at n = budget, evaluated on every trial's count.
        fixed = _apply(lambda k, n: lower_confidence_bound(k, n, ALPHA), counts[:, -1], BUDGET)
        # Critical counts per look: sequential bound (alpha / L) and naive bound (alpha).
        k_seq = np.array([_first_exceeding(lambda k, n: lower_bound_at_look(k, n, plan), n, p) for n in looks])
        k_naive = np.array([_first_exceeding(lambda k, n: lower_confidence_bound(k, n, ALPHA), n, p) for n in looks])
        tau = _stopping_looks(counts, plan)
        at_stop = _bounds_at(counts, tau, plan)
        out[p] = {
            "plan": plan,
            "counts": counts,
            "k_seq": k_seq,
            "fixed": float(np.mean(fixed > p)),
            # Adversarial rule: stop at the first look where the bound exceeds p, if ever; its error
            # event is "some look exceeds p", the very event the union bound controls.
            "adversarial": float(np.mean((counts >= k_seq).any(axis=1))),
            "should_stop": float(np.mean(at_stop > p)),
            # Naive: fixed-n bound at alpha re-evaluated at every look, stop when it exceeds p.
            "naive": float(np.mean((counts >= k_naive).any(axis=1))),
            "stop_looks": np.bincount(tau, minlength=len(looks)) / TRIALS,
        }
    return out


@pytest.mark.parametrize("p", PS)
def test_fixed_sampling_coverage(coverage: dict, p: float) -> None:
    assert coverage[p]["fixed"] <= ALLOWANCE, coverage[p]


@pytest.mark.parametrize("p", PS)
def test_sequential_coverage_adversarial_stopping(coverage: dict, p: float) -> None:
    assert coverage[p]["adversarial"] <= ALLOWANCE, coverage[p]


@pytest.mark.parametrize("p", PS)
def test_sequential_coverage_should_stop(coverage: dict, p: float) -> None:
    result = coverage[p]
    assert result["should_stop"] <= ALLOWANCE, result
    # The stopping time really is data-dependent: at least two looks each take >= 5 % of trials.
    assert np.sum(result["stop_looks"] >= 0.05) >= 2, result["stop_looks"]


def test_naive_repeated_fixed_n_bound_fails(coverage: dict) -> None:
    """Negative control: re-evaluating the fixed-n bound at every look breaks the guarantee."""
    worst = max(coverage[p]["naive"] for p in PS)
    assert worst > 2 * ALPHA, {p: coverage[p]["naive"] for p in PS}
    assert worst > ALLOWANCE + 10 * SE


@pytest.mark.parametrize("p", PS)
def test_critical_counts_match_direct_evaluation(coverage: dict, p: float) -> None:
    """The bisection shortcut of the adversarial rate agrees with the bound on sampled counts."""
    plan, counts, k_seq = coverage[p]["plan"], coverage[p]["counts"], coverage[p]["k_seq"]
    rng = np.random.default_rng(7)
    for j, n in enumerate(plan.looks):
        sample = np.unique(np.concatenate([counts[rng.integers(0, TRIALS, 30), j], [k_seq[j] - 1, k_seq[j]]]))
        for k in sample[(sample >= 0) & (sample <= n)]:
            assert (lower_bound_at_look(int(k), n, plan) > p) == (k >= k_seq[j])


def test_coverage_test_is_not_vacuous(coverage: dict) -> None:
    """The sequential bound does exceed p sometimes: the rates measure something."""
    assert max(coverage[p]["adversarial"] for p in PS) > ALPHA / 10


# ============================================================================================
# Look schedule
# ============================================================================================


@pytest.mark.parametrize("budget", [1, 7, 99, 100, 101, 150, 1000, 10_000, 20_000, 100_000, 1_000_003])
@pytest.mark.parametrize("first,growth", [(FIRST_LOOK, GROWTH), (100, 2.0), (1, 1.25), (200, 1.3)])
def test_look_schedule_properties(budget: int, first: int, growth: float) -> None:
    looks = look_schedule(budget, first, growth)
    assert looks[-1] == budget
    assert all(b > a for a, b in zip(looks, looks[1:]))
    assert looks == look_schedule(budget, first, growth)  # deterministic
    if budget <= first:
        assert looks == (budget,)
    else:
        assert looks[0] == first
        # Every look before the last is a geometric point (growth read as its decimal spelling).
        exact = {math.ceil(first * Fraction(str(growth)) ** j) for j in range(120)}
        assert set(looks[:-1]) <= exact


def test_look_schedule_values() -> None:
    assert look_schedule(1000, 100, 1.5) == (100, 150, 225, 338, 507, 760, 1000)
    assert look_schedule(1000, 100, 2.0) == (100, 200, 400, 800, 1000)
    # 100 * 1.3 is 130 exactly (in floating point it would round up to 131).
    assert look_schedule(300, 100, 1.3) == (100, 130, 169, 220, 286, 300)
    # Small first: repeated ceilings appear once.
    assert look_schedule(10, 1, 1.25) == (1, 2, 3, 4, 5, 6, 8, 10)
    assert look_schedule(100, 100, 1.5) == (100,)
    assert look_schedule(5) == (5,)
    assert look_schedule(1000.0, 100, 1.5) == look_schedule(1000, 100, 1.5)  # whole floats accepted


@pytest.mark.parametrize(
    "kwargs",
    [dict(budget=0), dict(budget=10.5), dict(budget=float("nan")), dict(budget=True), dict(budget=10, first=0), dict(budget=10, growth=1.0),
     dict(budget=10, growth=float("nan")), dict(budget=10, growth=float("inf"))],
)
def test_look_schedule_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        look_schedule(**kwargs)


# ============================================================================================
# Plan
# ============================================================================================


def test_plan_make_and_properties() -> None:
    plan = SequentialPlan.make(1000, 0.001, 0.5, [0.0, 0.25, 1.0], first=100, growth=1.5)
    assert plan.looks == (100, 150, 225, 338, 507, 760, 1000)
    assert plan.alpha_per_look == 0.001 / 7
    assert plan.thresholds[0] == 0.5  # radius 0: not abstaining
    assert plan.thresholds == tuple(norm.cdf(r / 0.5) for r in (0.0, 0.25, 1.0))
    assert plan.radii == (0.0, 0.25, 1.0)
    assert hash(plan) == hash(SequentialPlan.make(1000, 0.001, 0.5, (0.0, 0.25, 1.0), 100, 1.5))
    # Defaults of make are the module defaults.
    assert SequentialPlan.make(20_000, 0.001, 0.25, (0.5,)).looks == look_schedule(20_000)


@pytest.mark.parametrize(
    "changes",
    [dict(alpha=0.0), dict(alpha=1.0), dict(alpha=float("nan")), dict(sigma=0.0), dict(sigma=float("inf")),
     dict(radii=()), dict(radii=(0.5, 0.25)), dict(radii=(0.25, 0.25)), dict(radii=(-0.1, 0.25)),
     dict(radii=(0.25, float("nan"))), dict(looks=(100, 150)), dict(looks=(150, 100, 1000)),
     dict(looks=(100, 100, 1000)), dict(looks=()), dict(budget=0, looks=(0,)), dict(futility=0.0),
     dict(futility=1.0), dict(futility=float("nan")), dict(futility=True)],
)
def test_plan_rejects(changes: dict) -> None:
    fields = dict(budget=1000, alpha=0.001, sigma=0.25, radii=(0.25, 0.5), looks=(100, 150, 1000))
    fields.update(changes)
    with pytest.raises(ValueError):
        SequentialPlan(**fields)


# ============================================================================================
# Bounds
# ============================================================================================

PLAN = SequentialPlan.make(1000, 0.001, 1.0, (0.0, 1.0, 3.0), first=100, growth=1.5)  # L = 7
LEVEL = 0.001 / 7
FUTILITY_LEVEL = FUTILITY / 7


@pytest.mark.parametrize("n", PLAN.looks)
def test_lower_bound_is_clopper_pearson_at_alpha_over_looks(n: int) -> None:
    for n_a in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        value = lower_bound_at_look(n_a, n, PLAN)
        assert value == lower_confidence_bound(n_a, n, LEVEL)
        if 0 < n_a < n:
            assert binom.sf(n_a - 1, n, value) == pytest.approx(LEVEL, rel=1e-6)
    assert lower_bound_at_look(0, n, PLAN) == 0.0
    # All agree: the closed form (alpha / L)^(1 / n), exactly.
    assert lower_bound_at_look(n, n, PLAN) == LEVEL ** (1.0 / n)


@pytest.mark.parametrize("n", PLAN.looks)
def test_upper_bound(n: int) -> None:
    """Clopper-Pearson upper bound at the futility level beta / L, not at alpha / L."""
    assert PLAN.futility == FUTILITY and PLAN.futility_per_look == FUTILITY_LEVEL
    assert upper_bound_at_look(n, n, PLAN) == 1.0
    assert upper_bound_at_look(0, n, PLAN) == pytest.approx(1.0 - FUTILITY_LEVEL ** (1.0 / n), rel=1e-12)
    for n_a in sorted({1, n // 3, n // 2, n - 1}):
        upper = upper_bound_at_look(n_a, n, PLAN)
        assert lower_bound_at_look(n_a, n, PLAN) <= n_a / n <= upper
        # Defining property: at p = U the chance of n_a or fewer successes is beta / L.
        assert binom.cdf(n_a, n, upper) == pytest.approx(FUTILITY_LEVEL, rel=1e-6)
    strict = SequentialPlan(PLAN.budget, PLAN.alpha, PLAN.sigma, PLAN.radii, PLAN.looks, futility=PLAN.alpha)
    assert upper_bound_at_look(1, n, strict) > upper_bound_at_look(1, n, PLAN)  # a smaller level, a wider bound


@pytest.mark.parametrize("budget,alpha", [(1000, 0.001), (20_000, 0.001), (100_000, 0.001), (10_000, 0.01)])
def test_needed_count_is_the_smallest_certifying_count(budget: int, alpha: float) -> None:
    plan = SequentialPlan.make(budget, alpha, 0.25, (0.0, 0.25, 0.5))
    for t, k in zip(plan.thresholds, plan.needed_counts):
        assert k == needed_count(t, plan) and isinstance(k, int)
        assert lower_bound_at_look(k, budget, plan) >= t > lower_bound_at_look(k - 1, budget, plan)
        # Above the threshold itself by the bound's width at the budget.
        assert k / budget > t


def test_needed_count_of_an_uncertifiable_threshold_exceeds_the_budget() -> None:
    # PLAN's r = 3 is beyond its budget: no count reaches it.
    assert PLAN.needed_counts[2] == 1001
    assert lower_bound_at_look(1000, 1000, PLAN) < PLAN.thresholds[2]


def _futility_outcomes(p: float, plan: SequentialPlan, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per path of Bernoulli(p) draws: whether the single radius of ``plan`` is "futile" at some
    look before the budget, and whether the path's count at the budget certifies it."""
    counts = _paths(p, plan.looks, seed=seed)
    futile = np.zeros(TRIALS, dtype=bool)
    for j, n in enumerate(plan.looks[:-1]):  # at the budget a radius is certified or unreachable
        status = _apply(lambda k, n: radius_status(k, n, plan)[0], counts[:, j], n)
        futile |= status == FUTILE
    return futile, counts[:, -1] >= plan.needed_counts[0]


@pytest.mark.parametrize("budget,radius", [(20_000, 0.5), (1000, 0.25)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_futility_rarely_gives_up_what_the_budget_certifies(budget: int, radius: float, offset: float) -> None:
    """Near k* / budget, where the budget certifies about half the rows, futility costs little.

    20,000 paths at p = k* / budget + offset standard errors of the budget's rate: the paths
    given up before the budget (futile at some look) although their count at the budget would
    have certified the radius are at most 4 % (measured: 2.2 % to 3.0 %; about 0.4 % at 20,000
    draws for a rule that compares the upper bound with k* / budget itself, which stops later);
    and futility does fire on a fair share of the paths the budget would not certify, which is
    what it is for.
    """
    plan = SequentialPlan.make(budget, 0.001, 0.25, (radius,))
    rate = plan.needed_counts[0] / budget
    p = rate + offset * math.sqrt(rate * (1 - rate) / budget)
    futile, certifies = _futility_outcomes(p, plan, seed=77 + int(offset) + budget)
    lost = float(np.mean(futile & certifies))
    assert lost <= 0.04, lost
    assert float(np.mean(futile[~certifies])) > 0.25


def test_futility_fires_below_the_needed_rate() -> None:
    """A row six standard errors below k* / budget is given up before the budget on almost every path."""
    plan = SequentialPlan.make(20_000, 0.001, 0.25, (0.5,))
    rate = plan.needed_counts[0] / 20_000
    futile, certifies = _futility_outcomes(rate - 6 * math.sqrt(rate * (1 - rate) / 20_000), plan, seed=5)
    assert float(np.mean(futile)) > 0.999 and not certifies.any()


def test_best_case_bound() -> None:
    assert best_case_lower_bound(100, 100, PLAN) == LEVEL ** (1.0 / 1000)
    assert best_case_lower_bound(0, 100, PLAN) == lower_confidence_bound(900, 1000, LEVEL)
    assert best_case_lower_bound(860, 1000, PLAN) == lower_bound_at_look(860, 1000, PLAN)
    for n_a in (0, 50, 99):
        assert best_case_lower_bound(n_a, 100, PLAN) >= lower_bound_at_look(n_a, 100, PLAN)


@pytest.mark.parametrize("func", [lower_bound_at_look, upper_bound_at_look, best_case_lower_bound, radius_status, row_settled])
def test_look_checks(func: Callable) -> None:
    with pytest.raises(ValueError, match="not one of the plan's looks"):
        func(50, 120, PLAN)
    with pytest.raises(ValueError):
        func(101, 100, PLAN)  # n_a > n
    with pytest.raises(ValueError):
        func(-1, 100, PLAN)


# ============================================================================================
# Stopping rule
# ============================================================================================


def test_radius_status_hand_computed() -> None:
    # PLAN: budget 1000, looks (100, 150, 225, 338, 507, 760, 1000), thresholds 0.5, 0.841, 0.99865.
    # r = 3 is out of reach of this budget: the best bound ever, (alpha/7)^(1/1000) = 0.9912 < 0.99865.
    assert LEVEL ** (1 / 1000) < norm.cdf(3.0)
    # 100/100: lower bound (alpha/7)^(1/100) = 0.9153 passes 0.5 and 0.841.
    assert LEVEL ** (1 / 100) > norm.cdf(1.0)
    assert radius_status(100, 100, PLAN) == (CERTIFIED, CERTIFIED, UNREACHABLE)
    assert row_settled(100, 100, PLAN)
    # Needed counts at the budget: 558/1000 certifies r = 0 and 883/1000 r = 1.
    assert PLAN.needed_counts[:2] == (558, 883)
    # 0/100: at the upper bound 1 - (beta/7)^(1/100) = 0.048 the 900 draws left would bring 43
    # successes on average, not 558 or 883, while 900 more successes would still give
    # CP(900, 1000) = 0.861 > 0.841: futile, not unreachable.
    assert 1 - FUTILITY_LEVEL ** (1 / 100) < 0.5
    assert lower_confidence_bound(900, 1000, LEVEL) > norm.cdf(1.0)
    assert radius_status(0, 100, PLAN) == (FUTILE, FUTILE, UNREACHABLE)
    # 95/100: certified at 0 (0.822), open at 1 (0.822 < 0.841; 0.988 x 900 = 889 >= 883 - 95).
    assert radius_status(95, 100, PLAN) == (CERTIFIED, OPEN, UNREACHABLE)
    assert not row_settled(95, 100, PLAN)
    # 60/100: 0.415 < 0.5 and upper 0.718 x 900 = 646 >= 558 - 60: open at 0; < 883 - 60: futile at 1.
    assert radius_status(60, 100, PLAN) == (OPEN, FUTILE, UNREACHABLE)
    # 78/100: upper 0.872 lies above Phi(1) = 0.841, but 0.872 x 900 = 785 < 883 - 78: futile at
    # 1, which a futility test against Phi(r / sigma) itself would have left open.
    upper = upper_bound_at_look(78, 100, PLAN)
    assert norm.cdf(1.0) < upper and upper * 900 < 883 - 78
    assert radius_status(78, 100, PLAN)[1] == FUTILE
    # 436/507, a row behind the pace: its upper bound 0.8955 lies above the rate 883/1000 the
    # budget needs, but 0.8955 x 493 = 441.5 falls short of the 883 - 436 = 447 still needed.
    upper = upper_bound_at_look(436, 507, PLAN)
    assert upper > 883 / 1000 and upper * 493 < 883 - 436
    assert radius_status(436, 507, PLAN)[1] == FUTILE
    # Four successes more, 440/507: 0.9024 x 493 = 444.9 >= 443 still needed, open.
    assert radius_status(440, 507, PLAN)[1] == OPEN
    # At the budget nothing is open: 860/1000 has lower bound 0.816 < 0.841 < upper 0.897.
    assert radius_status(860, 1000, PLAN) == (CERTIFIED, UNREACHABLE, UNREACHABLE)
    for n_a in range(0, 1001, 10):
        assert OPEN not in radius_status(n_a, 1000, PLAN)


def test_radius_status_matches_its_definition() -> None:
    for n in PLAN.looks:
        for n_a in range(0, n + 1, max(1, n // 40)):
            lower = lower_bound_at_look(n_a, n, PLAN)
            upper = upper_bound_at_look(n_a, n, PLAN)
            best = best_case_lower_bound(n_a, n, PLAN)
            for t, needed, status in zip(PLAN.thresholds, PLAN.needed_counts, radius_status(n_a, n, PLAN)):
                futile = upper * (PLAN.budget - n) < needed - n_a
                expected = CERTIFIED if lower >= t else UNREACHABLE if best < t else FUTILE if futile else OPEN
                assert status == expected


def test_radius_zero_is_non_abstention() -> None:
    plan = SequentialPlan.make(1000, 0.001, 0.25, (0.0,), first=100, growth=1.5)
    for n_a in range(0, 101):
        certified = radius_status(n_a, 100, plan)[0] == CERTIFIED
        cert = sequential_certify(np.array([10, 0]), np.array([n_a, 100 - n_a]), 10, 100, plan)
        assert certified == (not cert.abstain)


def test_should_stop_several_rows() -> None:
    # Rows: all agree (settled), and 0/100 (settled): stop.
    assert should_stop([100, 0], 100, PLAN)
    # One row still open at r = 1: keep drawing.
    assert not should_stop([100, 95], 100, PLAN)
    assert not should_stop([95], 100, PLAN)
    assert not should_stop((100, 100, 60), 100, PLAN)
    # At the budget a group always stops.
    assert should_stop([860, 950, 1000], 1000, PLAN)
    # A function of the counts only: same answer however the rows are ordered.
    assert should_stop([0, 100], 100, PLAN) == should_stop([100, 0], 100, PLAN)
    with pytest.raises(ValueError):
        should_stop([], 100, PLAN)
    with pytest.raises(ValueError):
        should_stop([50], 120, PLAN)
    with pytest.raises(ValueError):
        should_stop([1001], 1000, PLAN)


# ============================================================================================
# CERTIFY at the stopping look
# ============================================================================================


def test_sequential_certify_radius() -> None:
    cert = sequential_certify(np.array([90, 10]), np.array([100, 0]), 100, 100, PLAN)
    assert cert.prediction == 0 and not cert.abstain and cert.count == 100
    assert cert.p_lower == LEVEL ** (1.0 / 100)
    assert cert.radius == pytest.approx(1.0 * norm.ppf(LEVEL ** (1.0 / 100)), rel=1e-12)
    assert cert == certify(np.array([90, 10]), np.array([100, 0]), 100, 100, LEVEL, 1.0)
    # Weaker than fixed-n CERTIFY at alpha on the same counts (alpha / L < alpha).
    assert cert.radius < certify(np.array([90, 10]), np.array([100, 0]), 100, 100, 0.001, 1.0).radius


def test_sequential_certify_abstains() -> None:
    cert = sequential_certify(np.array([60, 40]), np.array([55, 45]), 100, 100, PLAN)
    assert cert.abstain and cert.prediction == ABSTAIN and cert.radius == 0.0 and cert.count == 55
    assert cert.p_lower == lower_bound_at_look(55, 100, PLAN) < 0.5
    # The class comes from the selection counts, not the estimation counts.
    cert = sequential_certify(np.array([10, 90]), np.array([100, 0]), 100, 100, PLAN)
    assert cert.abstain and cert.count == 0 and cert.p_lower == 0.0


def test_sequential_certify_checks() -> None:
    with pytest.raises(ValueError, match="not one of the plan's looks"):
        sequential_certify(np.array([90, 10]), np.array([120, 0]), 100, 120, PLAN)
    with pytest.raises(ValueError):
        sequential_certify(np.array([90, 10]), np.array([99, 0]), 100, 100, PLAN)  # counts != n


# ============================================================================================
# What a budget can certify
# ============================================================================================


def test_max_certifiable_radius_sequential() -> None:
    looks = look_schedule(100_000)
    expected = float(norm.ppf((0.001 / len(looks)) ** (1 / 100_000)))
    assert max_certifiable_radius_sequential(100_000, 0.001, 1.0) == expected
    plan = SequentialPlan.make(100_000, 0.001, 1.0, (0.5,))
    assert max_certifiable_radius_sequential(plan) == expected
    # Cohen's sigma * 3.81 becomes about sigma * 3.72 (19 looks).
    assert max_certifiable_radius(100_000, 0.001, 1.0) == pytest.approx(3.81, abs=0.005)
    assert 3.70 < expected < 3.75
    assert max_certifiable_radius_sequential(5, 0.001, 1.0) == 0.0  # even 5/5 abstains
    with pytest.raises(ValueError):
        max_certifiable_radius_sequential(100_000)


def _brute_min_budget(radius: float, sigma: float, alpha: float, first: int, growth: float, top: int) -> int:
    """Smallest N with every budget in [N, top) certifying (top well past the answer)."""
    answer = top
    for b in range(top - 1, 0, -1):
        if not certifiable_within_budget(radius, sigma, b, alpha, first, growth):
            break
        answer = b
    return answer


@pytest.mark.parametrize(
    "radius,sigma,alpha,first,growth",
    [(0.0, 0.25, 0.001, 100, 1.5), (0.25, 0.25, 0.001, 100, 1.5), (0.5, 0.25, 0.001, 100, 1.5),
     (0.5, 0.25, 0.01, 1, 1.25), (0.3, 0.5, 0.5, 3, 1.1), (1.0, 1.0, 0.2, 2, 1.3)],
)
def test_min_budget_for_radius_small_cases(radius: float, sigma: float, alpha: float, first: int, growth: float) -> None:
    n = min_budget_for_radius(radius, sigma, alpha, first, growth)
    assert n == _brute_min_budget(radius, sigma, alpha, first, growth, top=3 * n + 50)


@pytest.mark.parametrize("radius,sigma,n", [(0.75, 0.25, 100_000), (1.0, 0.25, 10_000), (3.0, 1.0, 10_000), (0.5, 0.25, 20_000)])
def test_min_budget_for_radius_is_minimal(radius: float, sigma: float, n: int) -> None:
    need = min_budget_for_radius(radius, sigma, 0.001)
    assert certifiable_within_budget(radius, sigma, need, 0.001)
    assert not certifiable_within_budget(radius, sigma, need - 1, 0.001)
    # It holds for larger budgets too, across the next look boundaries (where a look is added).
    looks = look_schedule(10 * need)
    for b in sorted({need + 1, need + 100, 2 * need} | {x + d for x in looks if x >= need for d in (0, 1)}):
        assert certifiable_within_budget(radius, sigma, b, 0.001), b
    # and agrees with what the protocol's own budget can do.
    assert certifiable_within_budget(radius, sigma, n, 0.001) == (n >= need)


def test_budgets_that_certify_are_not_an_interval() -> None:
    """Why min_budget_for_radius asks for every budget >= N: one more look can lose a radius."""
    need = min_budget_for_radius(0.3, 0.5, 0.5, 3, 1.1)
    assert certifiable_within_budget(0.3, 0.5, 3, 0.5, 3, 1.1)  # budget 3: one look
    assert need > 4 and not certifiable_within_budget(0.3, 0.5, need - 1, 0.5, 3, 1.1)


def test_min_budget_for_radius_rejects() -> None:
    with pytest.raises(ValueError, match="beyond any budget"):
        min_budget_for_radius(10.0, 0.25, 0.001)
    for radius in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            min_budget_for_radius(radius, 0.25, 0.001)


# ============================================================================================
# CLI check
# ============================================================================================


def test_validate_radii_accepts() -> None:
    assert validate_radii([0, 0.25, 0.5], [0.25, 0.5], 20_000, 0.001) == (0.0, 0.25, 0.5)
    assert validate_radii(("0.25",), [0.25], 20_000, 0.001) == (0.25,)


@pytest.mark.parametrize(
    "radii,match",
    [(None, "needs --radii"), ([], "needs --radii"), ([0.25, -0.5], "must be >= 0"), ([float("nan")], "finite"),
     ([float("inf")], "finite"), (["abc"], "must be numbers"), ([0.5, 0.25], "sorted ascending"),
     ([0.25, 0.25], "twice")],
)
def test_validate_radii_rejects(radii: object, match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        validate_radii(radii, [0.25], 20_000, 0.001)
    assert "\n" not in str(info.value)


def test_validate_radii_out_of_budget_names_radius_sigma_and_n() -> None:
    need = min_budget_for_radius(1.0, 0.25, 0.001)
    with pytest.raises(UserError) as info:
        validate_radii([0.5, 1.0], [0.5, 0.25], 10_000, 0.001)
    message = str(info.value)
    assert "radius 1.0" in message and "sigma 0.25" in message and f"--n >= {need}" in message
    assert "--n 10000" in message and "\n" not in message
    with pytest.raises(UserError, match="no --n can certify it; drop that radius or certify it at a larger sigma$"):
        validate_radii([10.0], [0.25], 10_000, 0.001)


def test_validate_radii_past_a_practical_budget_says_drop_or_raise_sigma() -> None:
    # 1.5 at sigma 0.25 (6 sigma) needs about 1e10 draws: a figure, but not one to pass as --n.
    need = min_budget_for_radius(1.5, 0.25, 0.001)
    assert need > PRACTICAL_BUDGET
    with pytest.raises(UserError) as info:
        validate_radii([0.5, 1.5], [0.25], 10_000, 0.001)
    message = str(info.value)
    assert "radius 1.5" in message and f"about {need:.0e} draws per image" in message
    assert message.endswith("drop that radius or certify it at a larger sigma") and "--n >=" not in message
    # The largest budget still named as --n.
    assert min_budget_for_radius(1.4, 0.25, 0.001) <= PRACTICAL_BUDGET
    with pytest.raises(UserError, match=r"needs --n >= \d+, or drop that radius$"):
        validate_radii([1.4], [0.25], 10_000, 0.001)
