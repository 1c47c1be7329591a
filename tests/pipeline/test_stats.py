"""Tests of pipeline.stats against closed forms of the Clopper-Pearson bound and CERTIFY."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import binom, norm

from workers.errors import UserError
from pipeline.stats import (
    ABSTAIN,
    Certificate,
    certify,
    check_level,
    lower_confidence_bound,
    max_certifiable_radius,
    predict,
    select_class,
    validate_protocol,
)

NS = [1, 10, 100, 1000, 100000]
ALPHAS = [0.001, 0.01, 0.05]


def _grid_counts(n: int) -> list[int]:
    """nA in {0, 1, n/2, n-1, n}, deduplicated (small n collapses some)."""
    return sorted({0, 1, n // 2, n - 1, n})


GRID = [(n_a, n, a) for n in NS for a in ALPHAS for n_a in _grid_counts(n)]


@pytest.mark.parametrize("n_a,n,alpha", GRID)
def test_bound_matches_closed_forms(n_a: int, n: int, alpha: float) -> None:
    p = lower_confidence_bound(n_a, n, alpha)
    assert 0.0 <= p <= 1.0
    if n_a == 0:
        assert p == 0.0
    elif n_a == n:
        # Beta(n, 1) quantile: exactly alpha^(1/n).
        assert p == alpha ** (1.0 / n)
    else:
        # Defining property of the exact lower bound: at p = p_lower the chance of
        # seeing nA or more successes is exactly alpha.
        assert binom.sf(n_a - 1, n, p) == pytest.approx(alpha, rel=1e-6)
        # and the bound lies below the point estimate.
        assert p < n_a / n


@pytest.mark.parametrize("n,alpha", list(itertools.product(NS, ALPHAS)))
def test_bound_monotone_in_count(n: int, alpha: float) -> None:
    counts = _grid_counts(n)
    bounds = [lower_confidence_bound(k, n, alpha) for k in counts]
    assert all(a < b for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("bad", [0, 1, 0.0, 1.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.01", None])
def test_check_level_refuses_what_is_not_a_probability_strictly_inside(bad: object) -> None:
    with pytest.raises(ValueError, match="^futility must"):
        check_level(bad, "futility")  # type: ignore[arg-type]


def test_check_level_returns_plain_floats() -> None:
    assert [type(check_level(x)) for x in (0.001, np.float32(0.25), np.float64(0.5))] == [float] * 3
    assert check_level(np.float64(0.05), "futility") == 0.05


def test_bound_monotone_in_alpha() -> None:
    # A more confident bound (smaller alpha) is lower.
    assert lower_confidence_bound(90, 100, 0.001) < lower_confidence_bound(90, 100, 0.01) < lower_confidence_bound(90, 100, 0.05)


def test_bound_dense_monotone() -> None:
    n = 200
    bounds = np.array([lower_confidence_bound(k, n, 0.001) for k in range(n + 1)])
    assert np.all(np.diff(bounds) > 0)


def test_bound_known_value() -> None:
    # Value cross-checked against statsmodels proportion_confint(990, 1000, alpha=0.002, method="beta")[0]
    # through the equivalent Beta quantile definition.
    from scipy.stats import beta

    assert lower_confidence_bound(990, 1000, 0.001) == pytest.approx(beta.ppf(0.001, 990, 11), rel=1e-12)


@pytest.mark.parametrize("bad", [(-1, 10, 0.01), (11, 10, 0.01), (1, 0, 0.01), (1, 10, 0.0), (1, 10, 1.0), (1, 10, float("nan"))])
def test_bound_rejects_bad_inputs(bad: tuple[int, int, float]) -> None:
    with pytest.raises(ValueError):
        lower_confidence_bound(*bad)


def test_select_class_ties_lowest_index() -> None:
    assert select_class(np.array([3, 7, 7, 1])) == 1
    assert select_class(np.array([5])) == 0


def _counts(k: int, c_a: int, n_a: int, n: int) -> np.ndarray:
    """k-class count vector with n_a votes for c_a and the rest on the next class."""
    out = np.zeros(k, dtype=np.int64)
    out[c_a] = n_a
    out[(c_a + 1) % k] += n - n_a
    return out


@pytest.mark.parametrize("n_a,n,alpha", [g for g in GRID if g[1] >= 10])
def test_certify_radius_and_abstain(n_a: int, n: int, alpha: float) -> None:
    sigma = 0.5
    counts0 = _counts(10, 3, 100, 100)
    counts = _counts(10, 3, n_a, n)
    cert = certify(counts0, counts, 100, n, alpha, sigma)
    p = lower_confidence_bound(n_a, n, alpha)
    assert cert.count == n_a
    assert cert.p_lower == p
    if p < 0.5:
        assert cert == Certificate(prediction=ABSTAIN, count=n_a, p_lower=p, radius=0.0, abstain=True)
    else:
        assert not cert.abstain
        assert cert.prediction == 3
        assert cert.radius == pytest.approx(sigma * norm.ppf(p), rel=1e-12)


def test_certify_abstains_exactly_below_half() -> None:
    n, alpha = 1000, 0.001
    bounds = {k: lower_confidence_bound(k, n, alpha) for k in range(n + 1)}
    first_ok = min(k for k, p in bounds.items() if p >= 0.5)
    counts0 = np.array([0, 100])
    below = certify(counts0, np.array([n - first_ok + 1, first_ok - 1]), 100, n, alpha, 0.25)
    at = certify(counts0, np.array([n - first_ok, first_ok]), 100, n, alpha, 0.25)
    assert below.abstain and below.prediction == -1 and below.radius == 0.0
    assert below.p_lower < 0.5 <= at.p_lower
    assert not at.abstain and at.prediction == 1 and at.radius >= 0.0


def test_certify_max_radius_when_all_votes_agree() -> None:
    n, alpha, sigma = 100000, 0.001, 0.25
    cert = certify(np.array([0, 100, 0]), np.array([0, n, 0]), 100, n, alpha, sigma)
    assert cert.radius == pytest.approx(max_certifiable_radius(n, alpha, sigma), rel=1e-12)
    assert cert.radius == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-12)
    # Known value for CIFAR-10 protocol (Cohen's tables stop near 4 sigma).
    assert 0.95 < cert.radius < 0.97


def test_certify_uses_selection_class_not_estimation_argmax() -> None:
    # Selection picks class 0; estimation favours class 1: nA is the count of class 0.
    cert = certify(np.array([60, 40]), np.array([30, 70]), 100, 100, 0.001, 0.5)
    assert cert.count == 30 and cert.abstain and cert.prediction == -1


def test_certify_validates_sums() -> None:
    with pytest.raises(ValueError, match="counts0"):
        certify(np.array([1, 2]), np.array([5, 5]), 4, 10, 0.001, 0.5)
    with pytest.raises(ValueError, match="counts sums"):
        certify(np.array([1, 3]), np.array([5, 4]), 4, 10, 0.001, 0.5)
    with pytest.raises(ValueError, match="classes"):
        certify(np.array([1, 3]), np.array([5, 4, 1]), 4, 10, 0.001, 0.5)


def test_predict_clear_and_tied() -> None:
    assert predict(np.array([2, 95, 3]), 100, 0.001) == 1
    assert predict(np.array([50, 50, 0]), 100, 0.001) == ABSTAIN
    # Close but not significant at alpha = 0.001.
    assert predict(np.array([55, 45]), 100, 0.001) == ABSTAIN
    # Single class: nB = 0 and binomtest(n, n) is significant for n >= 11.
    assert predict(np.array([20]), 20, 0.001) == 0


def test_predict_matches_binomial_test_threshold() -> None:
    from scipy.stats import binomtest

    for n_a in range(50, 101):
        counts = np.array([n_a, 100 - n_a])
        expected = 0 if binomtest(n_a, 100, 0.5).pvalue <= 0.01 else -1
        assert predict(counts, 100, 0.01) == expected


def test_max_certifiable_radius_tiny_n_is_zero() -> None:
    # alpha^(1/1) = 0.05 < 0.5: CERTIFY can never certify with one draw.
    assert max_certifiable_radius(1, 0.05, 0.5) == 0.0


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        (dict(n0=0, n=10, alpha=0.001), "--n0"),
        (dict(n0=10, n=0, alpha=0.001), "--n "),
        (dict(n0=10, n=10, alpha=0.0), "--alpha"),
        (dict(n0=10, n=10, alpha=1.5), "--alpha"),
        (dict(n0=10, n=10, alpha=0.001, sigma=0.0), "--sigma"),
        (dict(n0=10, n=10, alpha=0.001, sigma=-1.0), "--sigma"),
        (dict(n0=1.5, n=10, alpha=0.001), "--n0"),
    ],
)
def test_validate_protocol_errors(kwargs: dict, flag: str) -> None:
    with pytest.raises(UserError) as info:
        validate_protocol(**kwargs)
    msg = str(info.value)
    assert flag in msg and "\n" not in msg


def test_validate_protocol_accepts_standard() -> None:
    validate_protocol(100, 100000, 0.001, 0.25)
    validate_protocol(100, 10000, 0.001)
