"""Cohen et al. (2019) CERTIFY and PREDICT, computed from class counts.

The sampling (noise draws, purification, classification) happens elsewhere; what
arrives here are the per-class vote counts of the selection draws (``counts0``, n0
of them) and of the independent estimation draws (``counts``, n of them). Every
function is a pure function of those numbers, so a certificate can be recomputed
from the unit log at any time and compared with the reference implementation.

Conventions (see the shared reference ALGORITHM.md, section 1):

* ``p_lower`` is the one-sided (1 - alpha) Clopper-Pearson lower bound on the top
  class probability, i.e. the alpha quantile of Beta(nA, n - nA + 1).
* abstention is prediction ``-1`` with radius ``0.0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta, binomtest, norm

from workers.errors import UserError

ABSTAIN: int = -1
"""Prediction value used when the smoothed classifier abstains (as in Cohen's code)."""

__all__ = [
    "ABSTAIN",
    "Certificate",
    "certify",
    "check_level",
    "lower_confidence_bound",
    "max_certifiable_radius",
    "predict",
    "select_class",
    "validate_protocol",
    "validate_sigma",
]


@dataclass(frozen=True)
class Certificate:
    """Outcome of CERTIFY for one input.

    ``count`` (nA) and ``p_lower`` are those of the class chosen on the selection
    draws even when abstaining, so an abstention can still be inspected.
    """

    prediction: int
    """Certified class, or ``-1`` (ABSTAIN)."""
    count: int
    """nA: estimation draws that voted for the selected class."""
    p_lower: float
    """One-sided (1 - alpha) Clopper-Pearson lower bound on P[f(x + delta) = cA]."""
    radius: float
    """Certified L2 radius sigma * Phi^-1(p_lower); 0.0 on abstention."""
    abstain: bool


def check_level(level: float, name: str = "alpha") -> float:
    """Return a probability level (alpha, or sequential sampling's futility beta) as a float after
    checking it lies strictly between 0 and 1; ValueError otherwise (bools and non-numbers too)."""
    if isinstance(level, bool) or not isinstance(level, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number in (0, 1), got {level!r}")
    # NaN fails both comparisons, hence the negated form.
    if not (0.0 < level < 1.0):
        raise ValueError(f"{name} must lie in (0, 1), got {level!r}")
    return float(level)


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion.

    Guarantee: for ``n_a ~ Binomial(n, p)``, P[returned value <= p] >= 1 - alpha.
    It is the alpha quantile of Beta(n_a, n - n_a + 1), equal to
    ``statsmodels.proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0]``
    and to Cohen's ``_lower_confidence_bound``. With ``n_a = 0`` the bound is 0;
    with ``n_a = n`` it is alpha ** (1 / n), which is returned in closed form
    because the Beta quantile routine only matches it to rounding.
    """
    n_a = int(n_a)
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= n_a <= n:
        raise ValueError(f"n_a must lie in [0, n] = [0, {n}], got {n_a}")
    check_level(alpha)
    if n_a == 0:
        return 0.0
    if n_a == n:
        # Beta(n, 1) has CDF p^n, so its alpha quantile is alpha^(1/n).
        return float(alpha ** (1.0 / n))
    return float(beta.ppf(alpha, n_a, n - n_a + 1))


def select_class(counts0: np.ndarray) -> int:
    """Cohen's selection step: the class with most selection votes.

    Guarantee: deterministic; ties go to the lowest class index (np.argmax),
    which is what makes a certificate reproducible from the stored counts.
    """
    counts0 = np.asarray(counts0)
    if counts0.ndim != 1 or counts0.size == 0:
        raise ValueError(f"counts0 must be a non-empty 1-D array, got shape {counts0.shape}")
    return int(np.argmax(counts0))


def _check_counts(counts: np.ndarray, total: int, name: str, total_name: str) -> np.ndarray:
    """Return ``counts`` as a 1-D int64 array after checking it sums to ``total``."""
    arr = np.asarray(counts)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        # Float counts that are whole numbers are accepted (e.g. read back from CSV).
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold whole numbers, got {arr!r}")
    arr = arr.astype(np.int64)
    if np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative, got {arr!r}")
    if int(arr.sum()) != int(total):
        raise ValueError(f"{name} sums to {int(arr.sum())} but {total_name} = {int(total)}")
    return arr


def certify(
    counts0: np.ndarray,
    counts: np.ndarray,
    n0: int,
    n: int,
    alpha: float,
    sigma: float,
) -> Certificate:
    """Cohen et al. CERTIFY on precomputed counts.

    cA = argmax(counts0); nA = counts[cA]; pA = lower_confidence_bound(nA, n, alpha).
    If pA < 0.5 abstain, else return (cA, sigma * Phi^-1(pA)).

    Guarantee (Cohen et al., Thm. 1 and Prop. 2): provided ``counts0`` and
    ``counts`` come from independent draws, with probability >= 1 - alpha over
    those draws, a non-abstaining result is correct: the smoothed classifier
    predicts cA everywhere within L2 distance ``radius`` of x.
    """
    c0 = _check_counts(counts0, n0, "counts0", "n0")
    c = _check_counts(counts, n, "counts", "n")
    if c0.size != c.size:
        raise ValueError(f"counts0 has {c0.size} classes but counts has {c.size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    c_a = select_class(c0)
    n_a = int(c[c_a])
    p_a = lower_confidence_bound(n_a, n, alpha)
    if p_a < 0.5:
        return Certificate(prediction=ABSTAIN, count=n_a, p_lower=p_a, radius=0.0, abstain=True)
    # p_a == 0.5 certifies radius 0 (not an abstention), as in Cohen's code.
    return Certificate(
        prediction=c_a,
        count=n_a,
        p_lower=p_a,
        radius=float(sigma * norm.ppf(p_a)),
        abstain=False,
    )


def predict(counts: np.ndarray, n: int, alpha: float) -> int:
    """Cohen et al. PREDICT on precomputed counts.

    Take the two most frequent classes (nA >= nB); abstain (-1) if the two-sided
    binomial test of nA out of nA + nB against 1/2 has p-value > alpha, else return
    the top class.

    Guarantee (Cohen et al., Prop. 1): the probability of returning a class other
    than the smoothed classifier's prediction g(x) is at most alpha. Ties between
    the top two classes always abstain (p-value 1). Among tied maxima np.argmax
    picks the lowest index, which only matters if the test passes anyway.
    """
    c = _check_counts(counts, n, "counts", "n")
    check_level(alpha)
    top = int(np.argmax(c))
    n_a = int(c[top])
    # Second largest count: the largest once the top class is removed.
    n_b = int(np.max(np.delete(c, top))) if c.size > 1 else 0
    p_value = binomtest(n_a, n_a + n_b, 0.5).pvalue
    if p_value > alpha:
        return ABSTAIN
    return top


def max_certifiable_radius(n: int, alpha: float, sigma: float) -> float:
    """Largest radius CERTIFY can return with n estimation draws: sigma * Phi^-1(alpha^(1/n)).

    This is the radius when every estimation draw votes for cA (nA = n), so no
    image can be certified beyond it, whatever the classifier. If even nA = n
    gives a bound below 1/2 (tiny n), CERTIFY always abstains and 0.0 is returned.
    """
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    check_level(alpha)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    p = lower_confidence_bound(int(n), int(n), alpha)
    if p < 0.5:
        return 0.0
    return float(sigma * norm.ppf(p))


def _is_whole(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer()


def validate_protocol(n0: int, n: int, alpha: float, sigma: float | None = None) -> None:
    """Check CERTIFY parameters given by a user; raise UserError with a one-line fix.

    Guarantee: returns only if n0 >= 1, n >= 1 (whole numbers), 0 < alpha < 1 and,
    when given, sigma > 0, i.e. exactly the inputs on which ``certify`` is defined.
    """
    if not _is_whole(n0) or n0 < 1:
        raise UserError(f"--n0 must be a whole number >= 1 (got {n0!r}); the standard protocol uses --n0 100")
    if not _is_whole(n) or n < 1:
        raise UserError(
            f"--n must be a whole number >= 1 (got {n!r}); the standard protocol uses "
            "--n 100000 (CIFAR-10) or --n 10000 (ImageNet)"
        )
    try:
        alpha_ok = 0.0 < float(alpha) < 1.0
    except (TypeError, ValueError):
        alpha_ok = False
    if not alpha_ok:
        raise UserError(f"--alpha must lie strictly between 0 and 1 (got {alpha!r}); the standard protocol uses --alpha 0.001")
    if sigma is not None:
        validate_sigma(sigma)


def validate_sigma(sigma: float) -> None:
    """Check a smoothing noise level given by a user; raise UserError with a one-line fix.

    Guarantee: returns only if sigma is a finite number > 0.
    """
    try:
        sigma_ok = math.isfinite(float(sigma)) and float(sigma) > 0.0
    except (TypeError, ValueError):
        sigma_ok = False
    if not sigma_ok:
        raise UserError(f"sigma must be a positive number (got {sigma!r}), e.g. --sigmas 0.25,0.5,1.0")
