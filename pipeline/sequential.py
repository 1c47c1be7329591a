"""Sequential (anytime-valid) CERTIFY: stop drawing once every requested radius is decided.

Fixed-n CERTIFY (``pipeline.stats.certify``) spends the whole budget n on every input, although
most inputs are decided long before: an input on which every draw agrees is certified at the
largest requested radius after a few thousand draws, and an input that will abstain is known to
after a few hundred. Here the estimation draws are examined at a few *looks*
n_1 < n_2 < ... < n_L = n and sampling stops at the first look where every requested radius is
settled (certified, or shown not certifiable). What arrives here, as in ``pipeline.stats``, are
counts only; every function is pure, so a stopping decision and a certificate can be recomputed
from the unit log.

Construction (one-sided Clopper-Pearson bounds with alpha spent evenly over fixed looks)
---------------------------------------------------------------------------------------------
The look schedule is a function of (budget, first, growth) only, fixed before any draw. At look j
the lower bound is the one-sided Clopper-Pearson bound at level alpha / L. By the union bound,
P[exists j: L_j > p_A] <= sum_j alpha / L = alpha, so the bound at *any* look-valued stopping
time, however it was chosen (from these counts, from other rows, even from the future), exceeds
p_A with probability at most alpha. Why this construction rather than a confidence sequence:

* at each look it is exactly Cohen et al.'s bound (``pipeline.stats.lower_confidence_bound``) at
  a smaller level, so users of fixed-n CERTIFY recognise it, and the fixed-n mode is the special
  case of a single look (L = 1);
* it is valid at every look by nothing more than the union bound: no martingale argument to
  trust, and it is exact (not asymptotic) for every n, including nA = 0 and nA = n;
* a confidence sequence (Howard et al. 2021) is valid at every single draw, but the pipeline can
  only stop at unit boundaries anyway (a stop decision taken between units would depend on
  timing and break bit-identical tables across worker counts), so that extra flexibility buys
  nothing here;
* the price is alpha / L instead of alpha at the last look, i.e. an evidence requirement of
  ln(L / alpha) instead of ln(1 / alpha): for an all-agreeing input at n = 100,000 and
  alpha = 0.001 the largest certifiable radius goes from sigma * 3.81 to sigma * 3.73 with
  L = 15 looks, sigma * 3.72 with the default schedule's L = 19. Since the bound is valid at all
  looks at once, even the largest bound seen so far would be valid; the pipeline reports the
  bound at the stopping look, which needs no history.

Futility (giving a radius up before the budget) is stochastic curtailment (Lan, Simon and
Halperin 1982; Jennison and Turnbull 2000, ch. 10): a row run to the budget n certifies r exactly
when its final count reaches the *needed count* k*(r), the smallest count whose bound at the last
look reaches Phi(r / sigma). At look m with count k the remaining n - m draws must therefore
bring k*(r) - k more successes, and r is given up when even a success rate equal to the one-sided
Clopper-Pearson *upper* bound U on p_A (at its own level beta / L, ``futility``, default 0.05 in
total) would fall short on average: U (n - m) < k*(r) - k. With probability >= 1 - beta, U >= p_A
at every look, and then r is only given up when the rest of the budget would have to beat its own
expected count to certify it (probability about one half or less, given the draws so far). A row
behind the pace the budget needs is given up sooner than one merely close to the threshold, a row
ahead of it later. Its errors cost power, never soundness: a row is only ever reported with its
lower bound at the stopping look. Measured (``tests/pipeline/test_sequential_stats.py``): rows
near k*(r) / n, where the budget certifies about half of them, lose r to futility although the
budget would have certified it in at most about 3 % of the cases.

References
----------
* J. Cohen, E. Rosenfeld, J. Z. Kolter, "Certified Adversarial Robustness via Randomized
  Smoothing", ICML 2019 (CERTIFY, the Clopper-Pearson bound).
* M. Z. Horvath, M. N. Mueller, M. Fischer, M. Vechev, "Boosting Randomized Smoothing with
  Variance Reduced Classifiers", ICLR 2022, adaptive sampling: Clopper-Pearson bounds at several
  pre-set sample sizes with a Bonferroni correction, stopping once a predetermined radius is
  certified or ruled out; the construction used here.
* S. R. Howard, A. Ramdas, J. McAuliffe, J. Sekhon, "Time-uniform, nonparametric, nonasymptotic
  confidence sequences", Annals of Statistics 49(2), 2021; I. Waudby-Smith, A. Ramdas,
  "Estimating means of bounded random variables by betting", JRSS-B 2024 (arXiv 2010.09686):
  confidence sequences, the anytime-valid alternative not used here.
* K. K. G. Lan, R. Simon, M. Halperin, "Stochastically curtailed tests in long-term clinical
  trials", Communications in Statistics C 1(3), 1982; C. Jennison, B. W. Turnbull, "Group
  Sequential Methods with Applications to Clinical Trials", Chapman & Hall 2000: futility
  (curtailment) boundaries, which never affect the type I error of the efficacy bound.
* V. Voracek, "Treatment of Statistical Estimation Problems in Randomized Smoothing for
  Adversarial Robustness", NeurIPS 2024 (arXiv 2406.17830): sequential estimation for
  randomized smoothing specifically.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, Sequence

import numpy as np
from scipy.stats import norm

from workers.errors import UserError
from pipeline.stats import Certificate, certify, check_level, lower_confidence_bound

__all__ = [
    "CERTIFIED",
    "FIRST_LOOK",
    "FUTILE",
    "FUTILITY",
    "GROWTH",
    "OPEN",
    "PRACTICAL_BUDGET",
    "STATUSES",
    "STOPPING_RULE",
    "UNREACHABLE",
    "SequentialPlan",
    "best_case_lower_bound",
    "certifiable_within_budget",
    "look_schedule",
    "lower_bound_at_look",
    "max_certifiable_radius_sequential",
    "min_budget_for_radius",
    "needed_count",
    "radius_status",
    "row_settled",
    "sequential_certify",
    "should_stop",
    "upper_bound_at_look",
    "validate_radii",
]

FIRST_LOOK: int = 100
"""Default first look, in estimation draws (Cohen's n0, and the first look of SEQUENTIAL.md).

Chosen with ``benchmarks/simulate_sequential.py``: with growth 1.5, first looks of 50, 100 and
200 gave savings within 10 % of one another in no consistent order (the first look mostly moves
where the later looks fall relative to the draws an all-agreeing input needs), and inputs that
will abstain settle after a few hundred draws whichever; so the conventional 100 is kept."""

GROWTH: float = 1.5
"""Default ratio between consecutive looks.

Chosen with ``benchmarks/simulate_sequential.py --protocols targets --growth 1.25,1.5,2.0``
(default p_A mix, 20 x 100 images): at n = 20,000 (sigma 0.25, radii 0.25, 0.5) growth 1.25 / 1.5
/ 2.0 gave 29.0x / 27.4x / 28.1x fewer estimation draws, at n = 100,000 (radii 0.25, 0.5, 0.75)
15.3x / 15.1x / 10.7x. 1.5 keeps nearly all of 1.25's saving with 19 looks at n = 100,000 instead
of 32 (each look is a synchronisation point of the pipeline, and the first units stay >= 50
draws); 2.0 loses a third at n = 100,000, where the look after an all-agreeing row's stopping
point can lie twice as far."""

FUTILITY: float = 0.05
"""Default futility level beta: the probability, in total over all looks, that the futility upper
bound falls below p_A at some look (outside that event a radius is only given up when the rest of
the budget would have to beat its expected count to certify it).

It governs power only (P[p_lower > p_A] <= alpha holds for every beta). Chosen with
``benchmarks/simulate_sequential.py --protocols targets --pa-file`` on the demo's own p_A spread:
at n = 20,000 (sigma 0.25, radii 0.25, 0.5) beta = 0.001 / 0.05 / 0.2 gave 13.3x / 15.6x / 17.4x
fewer estimation draws, at n = 100,000 (radii 0.25, 0.5, 0.75) 18.4x / 21.8x / 23.6x, with a mean
certified-accuracy deficit against fixed sampling of at most 0.23, 0.25 and 0.34 images per 100
(20 trials x 320 rows). The first rule (the upper bound at alpha / L against Phi(r / sigma)) gave
8.4x and 11.0x, the second (the upper bound against k* / budget, whatever the pace) 13.7x and
20.1x at beta = 0.05. 0.05 keeps most of the saving of 0.2 at the accuracy of 0.001."""

STOPPING_RULE: str = "cp-bonferroni-looks/curtailment-1"
"""Names the stopping rule below; a sequential run folder records it and is resumed only under the
same one. Changed whenever the same counts and options could stop at another look (the previous
rule, recorded as nothing, compared the futility bound with k* / budget instead of the pace)."""

PRACTICAL_BUDGET: int = 10**9
"""Largest --n that ``validate_radii`` names as the fix for an out-of-budget radius. A billion
estimation draws are two weeks of A100 time for one CIFAR-10 image at the DDS speed Carlini et al.
report (121 s per 100,000); beyond that it says to drop the radius or raise sigma instead."""

CERTIFIED = "certified"
"""Status of a radius whose threshold the lower bound at this look reaches."""
UNREACHABLE = "unreachable"
"""Status of a radius the budget cannot certify even if every remaining draw succeeds."""
FUTILE = "futile"
"""Status of a radius the rest of the budget would certify only by beating its expected count
(at a success rate equal to the futility upper bound)."""
OPEN = "open"
"""Status of a radius not decided yet; only possible before the last look."""
STATUSES: tuple[str, ...] = (CERTIFIED, UNREACHABLE, FUTILE, OPEN)


# --------------------------------------------------------------------------------------------
# Input checks (ValueError: these are programming errors; the CLI uses validate_radii)
# --------------------------------------------------------------------------------------------


def _whole(value: object, name: str, minimum: int) -> int:
    """Return ``value`` as an int after checking it is a whole number >= minimum.

    Whole floats (100000.0, e.g. read back from a table) are accepted as in
    ``pipeline.stats``; bools, fractions and non-finite values are refused.
    """
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {int(value)}")
    return int(value)


def _check_sigma(sigma: float) -> float:
    if not (math.isfinite(sigma) and sigma > 0.0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    return float(sigma)


def _check_growth(growth: float) -> Fraction:
    """Return the growth as an exact fraction of its shortest decimal spelling.

    Why a Fraction of ``repr``: ``ceil(first * growth ** j)`` in floating point depends on the
    last bit of ``pow`` (which libm need not agree on across machines) and turns 100 * 1.3 into
    131; with 1.3 read as 13/10 the schedule is exact, and so identical on every machine.
    """
    if isinstance(growth, bool) or not isinstance(growth, (int, float, np.integer, np.floating)):
        raise ValueError(f"growth must be a number > 1, got {growth!r}")
    if not (math.isfinite(growth) and growth > 1.0):
        raise ValueError(f"growth must be a finite number > 1, got {growth!r}")
    return Fraction(repr(float(growth)))


# --------------------------------------------------------------------------------------------
# Look schedule
# --------------------------------------------------------------------------------------------


def _geometric_points(first: int, growth: Fraction) -> Iterator[int]:
    """ceil(first * growth**j) for j = 0, 1, 2, ..., duplicates dropped (strictly increasing)."""
    last = 0
    value = Fraction(first)
    while True:
        point = math.ceil(value)
        if point > last:
            yield point
            last = point
        value *= growth


def look_schedule(budget: int, first: int = FIRST_LOOK, growth: float = GROWTH) -> tuple[int, ...]:
    """Draw counts n_1 < ... < n_L at which the stopping rule looks, the last one being ``budget``.

    n_j = ceil(first * growth**(j - 1)) for the points below ``budget``, then ``budget``; equal
    points (small ``first``) appear once. ``budget <= first`` gives ``(budget,)``.

    Guarantee: strictly increasing, last == budget, and a function of (budget, first, growth)
    only, computed in exact rational arithmetic (growth read as its decimal spelling), so it is
    fixed before any data and identical on every machine, which is what makes the alpha / L
    union bound valid and the stop decisions reproducible.
    """
    budget = _whole(budget, "budget", 1)
    first = _whole(first, "first", 1)
    g = _check_growth(growth)
    looks = []
    for point in _geometric_points(first, g):
        if point >= budget:
            break
        looks.append(point)
    looks.append(budget)
    return tuple(looks)


def _looks_count(budget: int, first: int, growth: Fraction) -> int:
    """L = len(look_schedule(budget, first, growth)) without building the tuple."""
    count = 1
    for point in _geometric_points(first, growth):
        if point >= budget:
            return count
        count += 1
    raise AssertionError("unreachable: the geometric points are unbounded")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# The plan: everything fixed before the data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequentialPlan:
    """What a sequential CERTIFY of one (sigma, method) fixes before the first estimation draw.

    Guarantee: the fields are validated on construction (budget >= 1, 0 < alpha < 1, sigma > 0,
    radii sorted, distinct, finite and >= 0, looks strictly increasing with looks[-1] == budget),
    so every function below may rely on them. Any schedule fixed in advance is sound; ``make``
    builds the geometric one of ``look_schedule``.
    """

    budget: int
    """n: the most estimation draws a row may use (the last look)."""
    alpha: float
    """Per-row failure probability, in total over all looks."""
    sigma: float
    """Noise level; radii are certified in the same units."""
    radii: tuple[float, ...]
    """Requested radii: sorted ascending, distinct, >= 0."""
    looks: tuple[int, ...]
    """Draw counts at which the stopping rule looks; strictly increasing, last == budget."""
    futility: float = FUTILITY
    """beta: level, in total over the looks, of the futility upper bound (power only)."""

    def __post_init__(self) -> None:
        budget = _whole(self.budget, "budget", 1)
        alpha = check_level(self.alpha)
        futility = check_level(self.futility, "futility")
        sigma = _check_sigma(self.sigma)
        radii = tuple(float(r) for r in self.radii)
        if not radii:
            raise ValueError("radii must not be empty: the stopping rule needs at least one radius")
        if not all(math.isfinite(r) and r >= 0.0 for r in radii):
            raise ValueError(f"radii must be finite and >= 0, got {radii!r}")
        if any(b <= a for a, b in zip(radii, radii[1:])):
            raise ValueError(f"radii must be sorted ascending without duplicates, got {radii!r}")
        looks = tuple(_whole(n, "each look", 1) for n in self.looks)
        if not looks or any(b <= a for a, b in zip(looks, looks[1:])):
            raise ValueError(f"looks must be non-empty and strictly increasing, got {looks!r}")
        if looks[-1] != budget:
            raise ValueError(f"the last look must equal the budget {budget}, got {looks!r}")
        # Normalise types (numpy ints/floats in, plain Python numbers out) so that plans compare
        # and hash by value.
        for name, value in (("budget", budget), ("alpha", alpha), ("sigma", sigma), ("radii", radii), ("looks", looks),
                            ("futility", futility)):
            object.__setattr__(self, name, value)

    @classmethod
    def make(
        cls,
        budget: int,
        alpha: float,
        sigma: float,
        radii: Sequence[float],
        first: int = FIRST_LOOK,
        growth: float = GROWTH,
        futility: float = FUTILITY,
    ) -> "SequentialPlan":
        """The plan with the geometric looks ``look_schedule(budget, first, growth)``."""
        return cls(
            budget=budget,
            alpha=alpha,
            sigma=sigma,
            radii=tuple(radii),
            looks=look_schedule(budget, first, growth),
            futility=futility,
        )

    @property
    def alpha_per_look(self) -> float:
        """alpha / L: the level of each look's bound (Bonferroni over the L looks)."""
        return self.alpha / len(self.looks)

    @property
    def futility_per_look(self) -> float:
        """beta / L: the level of each look's futility upper bound."""
        return self.futility / len(self.looks)

    @functools.cached_property
    def thresholds(self) -> tuple[float, ...]:
        """Phi(r / sigma) per radius: radius r is certified iff the lower bound reaches it.

        A radius of 0 has threshold 0.5 exactly: "certified at r = 0" means not abstaining.
        Computed once per plan (it is read at every look of every row), stored outside the fields.
        """
        return tuple(float(norm.cdf(r / self.sigma)) for r in self.radii)

    @functools.cached_property
    def needed_counts(self) -> tuple[int, ...]:
        """k*(r) per radius (``needed_count``): the futility test's target, computed once per plan."""
        return tuple(needed_count(t, self) for t in self.thresholds)


def needed_count(threshold: float, plan: SequentialPlan) -> int:
    """k*: the smallest count whose bound at the last look (n = budget) reaches ``threshold``.

    Found by bisection (the bound grows with the count); budget + 1, more than any count, when no
    count reaches it.

    Guarantee: a row run to the budget is certified at the threshold exactly when its final count
    is >= k*, so at a look with count k and m draws made, certifying it at the budget takes
    k* - k successes among the remaining budget - m draws; ``radius_status`` compares that with
    what the futility upper bound allows.
    """
    budget, level = plan.budget, plan.alpha_per_look
    if lower_confidence_bound(budget, budget, level) < threshold:
        return budget + 1
    lo, hi = -1, budget  # bound(lo) < threshold <= bound(hi); bound(-1) stands for "none"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if lower_confidence_bound(mid, budget, level) < threshold else (lo, mid)
    return hi


def _check_look(n_a: int, n: int, plan: SequentialPlan) -> tuple[int, int]:
    n = _whole(n, "n", 1)
    if n not in plan.looks:
        raise ValueError(f"n = {n} is not one of the plan's looks {plan.looks}")
    n_a = _whole(n_a, "n_a", 0)
    if n_a > n:
        raise ValueError(f"n_a must lie in [0, n] = [0, {n}], got {n_a}")
    return n_a, n


# --------------------------------------------------------------------------------------------
# Bounds at a look
# --------------------------------------------------------------------------------------------


def lower_bound_at_look(n_a: int, n: int, plan: SequentialPlan) -> float:
    """One-sided Clopper-Pearson lower bound at level alpha / L, at look n (one of plan.looks).

    Guarantee: for X_1, X_2, ... i.i.d. Bernoulli(p) and n_a the successes among the first n,
    P[exists look n_j: lower_bound_at_look(n_a_j, n_j) > p] <= plan.alpha (union bound over the
    L looks), hence P[bound at T > p] <= alpha for every random look T, stopping time or not.
    It is exactly ``pipeline.stats.lower_confidence_bound(n_a, n, alpha / L)``.
    """
    n_a, n = _check_look(n_a, n, plan)
    return lower_confidence_bound(n_a, n, plan.alpha_per_look)


def upper_bound_at_look(n_a: int, n: int, plan: SequentialPlan) -> float:
    """One-sided Clopper-Pearson upper bound at level beta / L (plan.futility_per_look), at look n.

    It is 1 - lower_confidence_bound(n - n_a, n, beta / L) (the CP bound on the failure rate), so
    1.0 when n_a = n. Used for futility only: P[exists look: U_j < p_A] <= beta (union bound), and
    its errors cost power, never soundness, because a row is reported with its lower bound.

    Why a level of its own: futility is a question of power, so it need not be as strict as the
    certificate's alpha; at beta = alpha it would cost far more draws for rows near a threshold
    (see FUTILITY), at a per-look level without the union bound (e.g. 0.05 at each look) the
    power statement would be vacuous.
    """
    n_a, n = _check_look(n_a, n, plan)
    return 1.0 - lower_confidence_bound(n - n_a, n, plan.futility_per_look)


def best_case_lower_bound(n_a: int, n: int, plan: SequentialPlan) -> float:
    """The lower bound at the last look if every remaining draw up to plan.budget succeeded.

    Guarantee: an upper limit on every lower bound this row can still reach at the last look
    (the Clopper-Pearson bound grows with the count), and >= lower_bound_at_look(n_a, n, plan).
    """
    n_a, n = _check_look(n_a, n, plan)
    return lower_confidence_bound(n_a + plan.budget - n, plan.budget, plan.alpha_per_look)


# --------------------------------------------------------------------------------------------
# Stopping rule
# --------------------------------------------------------------------------------------------


def radius_status(n_a: int, n: int, plan: SequentialPlan) -> tuple[str, ...]:
    """Per requested radius, what the counts at look n say about it, in this order of precedence:

    * "certified":   lower_bound_at_look >= Phi(r / sigma) (a certificate at this look says r);
    * "unreachable": best_case_lower_bound < Phi(r / sigma) (even with every remaining draw
      successful, the last look would not certify r: a fact about the budget, not a guess);
    * "futile":      upper_bound_at_look x (budget - n) < needed_count - n_a (even at a success
      rate equal to the upper bound, the remaining draws would on average bring fewer successes
      than the budget needs to certify r);
    * "open":        none of these; never at n == budget (there best case == lower bound).

    Guarantee: exactly one status per radius (tested in this order); a radius that is not
    "certified" is not certified by a certificate issued at this look; with probability
    >= 1 - plan.futility the upper bound is >= p_A at every look, and then "futile" means the rest
    of the budget would have to beat its own expected count (p_A x (budget - n)) to certify r.
    Only counts at this look are used.
    """
    n_a, n = _check_look(n_a, n, plan)
    lower = lower_bound_at_look(n_a, n, plan)
    best = lower if n == plan.budget else best_case_lower_bound(n_a, n, plan)
    upper: float | None = None  # only needed for radii the other two bounds leave undecided
    remaining = plan.budget - n
    statuses = []
    for t, needed in zip(plan.thresholds, plan.needed_counts):
        if lower >= t:
            statuses.append(CERTIFIED)
        elif best < t:
            statuses.append(UNREACHABLE)
        else:
            if upper is None:
                upper = upper_bound_at_look(n_a, n, plan)
            statuses.append(FUTILE if upper * remaining < needed - n_a else OPEN)
    return tuple(statuses)


def row_settled(n_a: int, n: int, plan: SequentialPlan) -> bool:
    """True when no requested radius is "open" at this look (always at n == budget)."""
    return OPEN not in radius_status(n_a, n, plan)


def should_stop(n_as: Sequence[int], n: int, plan: SequentialPlan) -> bool:
    """Whether a group (image, sigma, method) stops drawing at look n.

    ``n_as`` holds one count per row (vote count K): among the first n estimation draws, the
    votes for the class that row selected on its n0 selection draws. Stop when every row is
    settled or n == budget.

    Guarantee: a function of (n_as, n, plan) only, so the decision is the same whatever the
    number of workers or the order in which units finished; and because every row's bound is
    valid at every look simultaneously (``lower_bound_at_look``), each row's certificate at the
    stopping look keeps P[p_lower > p_A] <= alpha.
    """
    n = _whole(n, "n", 1)
    if len(n_as) == 0:
        raise ValueError("n_as must hold at least one row's count")
    if n == plan.budget:
        for n_a in n_as:
            _check_look(n_a, n, plan)
        return True
    return all(row_settled(n_a, n, plan) for n_a in n_as)


def sequential_certify(
    counts0: np.ndarray,
    counts: np.ndarray,
    n0: int,
    n: int,
    plan: SequentialPlan,
) -> Certificate:
    """CERTIFY at the stopping look n (one of plan.looks) with the sequential bound.

    cA = argmax(counts0) (``select_class``, ties to the lowest index); nA = counts[cA];
    p_lower = lower_bound_at_look(nA, n, plan); abstain if p_lower < 0.5, else radius
    sigma * Phi^-1(p_lower). This is ``pipeline.stats.certify`` at level alpha / L.

    Guarantee: provided ``counts0`` comes from draws independent of the estimation draws,
    P[p_lower > p_A] <= plan.alpha whatever the look-valued stopping time that chose n, so with
    probability >= 1 - alpha a non-abstaining result is correct (Cohen et al., Thm. 1): the
    smoothed classifier predicts cA everywhere within L2 distance ``radius`` of x.
    """
    n = _whole(n, "n", 1)
    if n not in plan.looks:
        raise ValueError(f"n = {n} is not one of the plan's looks {plan.looks}")
    return certify(counts0, counts, n0, n, plan.alpha_per_look, plan.sigma)


# --------------------------------------------------------------------------------------------
# What a budget can certify
# --------------------------------------------------------------------------------------------


def certifiable_within_budget(
    radius: float,
    sigma: float,
    budget: int,
    alpha: float,
    first: int = FIRST_LOOK,
    growth: float = GROWTH,
) -> bool:
    """Whether ``radius`` is certified at the last look of this budget's schedule when every draw succeeds.

    Guarantee: exactly the test radius_status applies (all-agree bound (alpha / L)^(1/budget)
    against Phi(r / sigma)); when False, no input can be certified at ``radius``.
    """
    budget = _whole(budget, "budget", 1)
    alpha = check_level(alpha)
    sigma = _check_sigma(sigma)
    n_looks = _looks_count(budget, _whole(first, "first", 1), _check_growth(growth))
    return lower_confidence_bound(budget, budget, alpha / n_looks) >= float(norm.cdf(radius / sigma))


def max_certifiable_radius_sequential(
    plan_or_budget: SequentialPlan | int,
    alpha: float | None = None,
    sigma: float | None = None,
    first: int = FIRST_LOOK,
    growth: float = GROWTH,
) -> float:
    """Largest radius a sequential plan can certify: sigma * Phi^-1((alpha / L)^(1 / budget)).

    Takes a ``SequentialPlan`` (its looks are used as they are) or a budget with ``alpha`` and
    ``sigma`` (looks from ``look_schedule(budget, first, growth)``). It is the radius of an input
    on which every draw agrees and the row runs to the budget, so no input is certified beyond
    it; 0.0 if even that abstains. Compare ``pipeline.stats.max_certifiable_radius`` (L = 1).
    """
    if isinstance(plan_or_budget, SequentialPlan):
        budget, level, sigma = plan_or_budget.budget, plan_or_budget.alpha_per_look, plan_or_budget.sigma
    else:
        if alpha is None or sigma is None:
            raise ValueError("with a budget, alpha and sigma must be given")
        budget = _whole(plan_or_budget, "budget", 1)
        n_looks = _looks_count(budget, _whole(first, "first", 1), _check_growth(growth))
        level = check_level(alpha) / n_looks
        sigma = _check_sigma(sigma)
    p = lower_confidence_bound(budget, budget, level)
    if p < 0.5:
        return 0.0
    return float(sigma * norm.ppf(p))


def min_budget_for_radius(
    radius: float,
    sigma: float,
    alpha: float,
    first: int = FIRST_LOOK,
    growth: float = GROWTH,
) -> int:
    """Smallest budget N such that every budget >= N can certify ``radius`` (all draws succeeding).

    Why "every budget >= N" and not merely "N can": a budget just above a geometric point has one
    look more (alpha / (L + 1)) and can certify slightly less than the budget just below it, so
    the budgets that can certify a radius are not an interval in general; with this definition
    the message "needs --n >= N" is true for every such --n, and N - 1 cannot certify it.

    Exact: within a stretch of budgets with the same number of looks L the all-agree bound
    (alpha / L)^(1/b) grows with b, so each stretch is decided by bisection on the very test of
    ``certifiable_within_budget``; stretches are scanned upwards until one from which on the
    bound can only grow (see ``_bound_keeps_up``). ValueError if no budget can (Phi(r / sigma)
    rounds to 1).
    """
    first = _whole(first, "first", 1)
    g = _check_growth(growth)
    alpha = check_level(alpha)
    sigma = _check_sigma(sigma)
    if not (math.isfinite(radius) and radius >= 0.0):
        raise ValueError(f"radius must be finite and >= 0, got {radius!r}")
    t = float(norm.cdf(radius / sigma))
    if t >= 1.0:
        raise ValueError(f"radius {radius} at sigma {sigma} is beyond any budget: Phi(r / sigma) rounds to 1")

    def ok(b: int, n_looks: int) -> bool:
        return lower_confidence_bound(b, b, alpha / n_looks) >= t

    answer = 1  # smallest budget from which on every budget seen so far can
    lo = 1  # first budget of the current stretch
    n_looks = 1  # looks of every budget in the current stretch [lo, hi]
    for point in _geometric_points(first, g):
        hi = point  # budgets lo..point all have n_looks looks (point itself is the last look)
        if not ok(hi, n_looks):
            answer = hi + 1
        elif not ok(lo, n_looks):
            # The bound grows with b inside the stretch: bisect for the first budget that can.
            a, b = lo, hi  # ok(a) False, ok(b) True
            while b - a > 1:
                mid = (a + b) // 2
                a, b = (mid, b) if not ok(mid, n_looks) else (a, mid)
            answer = b
        if _bound_keeps_up(hi + 1, n_looks + 1, alpha, t, first, g):
            return answer
        lo, n_looks = hi + 1, n_looks + 1
        if lo > 2**62:  # pragma: no cover - Phi(r / sigma) < 1 keeps this far away
            raise ValueError(f"no budget below 2**62 certifies radius {radius} at sigma {sigma}")
    raise AssertionError("unreachable")  # pragma: no cover


def _bound_keeps_up(b0: int, n_looks0: int, alpha: float, t: float, first: int, g: Fraction) -> bool:
    """Sufficient condition that every budget b >= b0 certifies threshold t when all draws succeed.

    ``b0`` starts a stretch of budgets with ``n_looks0`` looks. Budget b certifies iff
    slack(b) = b * (-ln t) - ln(L(b) / alpha) >= 0; inside a stretch slack grows with b, so only
    the first budget of each stretch matters, and from one stretch to the next slack changes by
    (stretch length) * (-ln t) - ln((L + 1) / L). Once a stretch is long enough that even a
    stretch two draws shorter gains more than ln((L + 1) / L), every later one does too (the
    exact gaps first * g**j * (g - 1) grow, ceil moves each stretch by less than 2, and
    ln((L + 1) / L) shrinks), so slack never falls again. Real arithmetic with a relative margin
    of 1e-9, far above rounding: True is safe; False only makes the caller scan one more stretch.
    """
    rate = -math.log(t)  # > 0 since t < 1
    margin = 1e-9
    n_looks, lo = n_looks0, b0
    slack = lo * rate - math.log(n_looks / alpha) * (1 + margin)
    for point in _geometric_points(first, g):
        if point < lo:
            continue
        if slack <= 0:
            return False
        cost = math.log((n_looks + 1) / n_looks) * (1 + margin)
        length = point + 1 - lo  # budgets lo..point, then the next stretch starts
        if (length - 2) * rate >= cost:
            return True
        slack += length * rate - cost
        lo, n_looks = point + 1, n_looks + 1
    raise AssertionError("unreachable: the geometric points are unbounded")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# CLI check
# --------------------------------------------------------------------------------------------


def validate_radii(
    radii: Sequence[float] | None,
    sigma_list: Sequence[float],
    budget: int,
    alpha: float,
    first: int = FIRST_LOOK,
    growth: float = GROWTH,
) -> tuple[float, ...]:
    """Check the --radii of a sequential run; raise UserError with a one-line fix.

    Guarantee: returns (as a tuple of floats) only if the radii are given, finite, >= 0, sorted
    ascending without duplicates, and each can be certified at every sigma of ``sigma_list``
    within ``budget`` (``certifiable_within_budget``); otherwise the message names the radius,
    the sigma and the --n that would certify it. ``budget``, ``alpha`` and the sigmas are
    expected to have passed ``pipeline.stats.validate_protocol`` (ValueError otherwise).
    """
    if radii is None or len(radii) == 0:
        raise UserError("sequential certification needs --radii (the radii to certify), e.g. --radii 0.25,0.5")
    values = []
    for r in radii:
        try:
            value = float(r)
        except (TypeError, ValueError):
            raise UserError(f"--radii must be numbers, got {r!r}; e.g. --radii 0.25,0.5") from None
        if not math.isfinite(value):
            raise UserError(f"--radii must be finite numbers, got {r!r}; e.g. --radii 0.25,0.5")
        if value < 0.0:
            raise UserError(f"--radii must be >= 0, got {value}; remove the negative radius")
        values.append(value)
    for a, b in zip(values, values[1:]):
        if b == a:
            raise UserError(f"--radii lists {a} twice; give each radius once")
        if b < a:
            raise UserError(f"--radii must be sorted ascending, but {b} follows {a}; sort them")
    for sigma in sigma_list:
        for r in values:
            if certifiable_within_budget(r, sigma, budget, alpha, first, growth):
                continue
            limit = max_certifiable_radius_sequential(budget, alpha, sigma, first, growth)
            try:
                needed = min_budget_for_radius(r, sigma, alpha, first, growth)
            except ValueError:
                needed = None
            if needed is not None and needed <= PRACTICAL_BUDGET:
                fix = f"needs --n >= {needed}, or drop that radius"
            else:
                # Past ~1e9 draws per image the exact figure helps nobody (and 1 - Phi(r / sigma)
                # has lost most of its digits in double precision): say what to change instead.
                need = "no --n can certify it" if needed is None else f"it needs about {needed:.0e} draws per image"
                fix = f"{need}; drop that radius or certify it at a larger sigma"
            raise UserError(
                f"radius {r} cannot be certified at sigma {sigma} with --n {budget} (at most {limit:.3f}): {fix}"
            )
    return tuple(values)
