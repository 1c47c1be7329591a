"""Simulated estimation draws of fixed-n against sequential CERTIFY on the paper's protocols.

    python benchmarks/simulate_sequential.py [--trials 20] [--images 100] [--seed 0] [--json]
        [--first 100] [--growth 1.5] [--futility 0.05] [--pa-file FILE] [--protocols cifar10,imagenet,targets]

No model is run: each image gets a probability p_A that a noisy draw votes for its true class,
and the estimation draws are Bernoulli(p_A). Both modes see the *same* draws (the sequential
row reads a prefix of the fixed row's draws), so their difference is the stopping rule alone:

- fixed: n draws, Cohen's bound ``pipeline.stats.lower_confidence_bound`` at alpha;
- sequential: the looks of ``SequentialPlan.make(n, alpha, sigma, radii, first, growth, futility)``,
  stopping at the first look where ``should_stop`` holds, bound ``lower_bound_at_look`` there.

An image is "certified correct at r" when its row's bound reaches Phi(r / sigma) (the row counts
votes for the true class, so an image with p_A < 1/2 is, up to alpha, never certified: it
abstains or would be wrong). One row per group (one vote count K); a group of several rows stops
when its slowest row does, so real savings with several K lie a little below these.

p_A spread (default): 60 % at 1.0, 10 % each uniform in [0.99, 1), [0.9, 0.99), [0.6, 0.9) and
[0.2, 0.6), drawn afresh per trial; ``--pa-file`` (a .npy or a text file of numbers) uses the
given values instead, the same in every trial (only the draws change).

Reported per protocol (sums over trials): estimation draws fixed and sequential, their ratio,
certified accuracy at each radius for both, and the largest per-trial deficit of sequential
against fixed in images per 100. ``ratio_clairvoyant_futility`` bounds what any futility rule
could add to this look schedule and bound: every image stops at the first look whose bound
reaches the largest radius the fixed run certifies on the same draws, as if it knew that
outcome. ``ratio_information_bound`` caps *every* sound procedure, whatever its bound, looks or
stopping rule, that certifies each image as often as fixed sampling does
(``information_bound``). ``--first``/``--growth``/``--futility`` accept comma-separated
lists: every combination is simulated (this is how the defaults FIRST_LOOK, GROWTH and FUTILITY
were chosen).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from scipy.special import rel_entr  # noqa: E402
from scipy.stats import binom  # noqa: E402

from pipeline.sequential import (  # noqa: E402
    FIRST_LOOK,
    FUTILITY,
    GROWTH,
    SequentialPlan,
    certifiable_within_budget,
    lower_bound_at_look,
    should_stop,
)
from pipeline.stats import lower_confidence_bound  # noqa: E402

#: (weight, low, high) of the default p_A mix; low == high is a point mass.
DEFAULT_MIX: tuple[tuple[float, float, float], ...] = (
    (0.6, 1.0, 1.0),
    (0.1, 0.99, 1.0),
    (0.1, 0.9, 0.99),
    (0.1, 0.6, 0.9),
    (0.1, 0.2, 0.6),
)

IMAGENET_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


@dataclass(frozen=True)
class Protocol:
    name: str
    budget: int
    alpha: float
    sigma: float
    radii: tuple[float, ...]


def protocols(groups: list[str], first: int, growth: float) -> list[Protocol]:
    """The paper protocols (and the issue's targets), ImageNet's grid cut to what the budget can certify."""
    out: list[Protocol] = []
    if "cifar10" in groups:
        for sigma, radii in ((0.25, (0.0, 0.25, 0.5, 0.75)), (0.5, (0.5, 1.0, 1.5)), (1.0, (1.0, 2.0, 3.0))):
            out.append(Protocol(f"cifar10 n=100000 sigma={sigma}", 100_000, 0.001, sigma, radii))
    if "imagenet" in groups:
        for sigma in (0.25, 0.5, 1.0):
            radii = tuple(r for r in IMAGENET_GRID if certifiable_within_budget(r, sigma, 10_000, 0.001, first, growth))
            out.append(Protocol(f"imagenet n=10000 sigma={sigma}", 10_000, 0.001, sigma, radii))
    if "targets" in groups:
        out.append(Protocol("target n=20000 sigma=0.25", 20_000, 0.001, 0.25, (0.25, 0.5)))
        out.append(Protocol("target n=100000 sigma=0.25", 100_000, 0.001, 0.25, (0.25, 0.5, 0.75)))
    return out


def sample_pa(rng: np.random.Generator, images: int) -> np.ndarray:
    """p_A of ``images`` images from DEFAULT_MIX."""
    weights = np.array([w for w, _, _ in DEFAULT_MIX])
    which = rng.choice(len(DEFAULT_MIX), size=images, p=weights / weights.sum())
    low = np.array([lo for _, lo, _ in DEFAULT_MIX])[which]
    high = np.array([hi for _, _, hi in DEFAULT_MIX])[which]
    return low + (high - low) * rng.random(images)


def load_pa(path: str) -> np.ndarray:
    values = np.load(path) if path.endswith(".npy") else np.loadtxt(path, ndmin=1)
    values = np.asarray(values, dtype=float).ravel()
    if values.size == 0 or not np.all((values >= 0.0) & (values <= 1.0)):
        raise SystemExit(f"{path}: expected a non-empty list of probabilities in [0, 1]")
    return values


def _memo(func: Callable[[int, int], Any]) -> Callable[[int, int], Any]:
    """Cache a pure function of (n_a, n): the same counts recur across images and trials."""
    cache: dict[tuple[int, int], Any] = {}

    def wrapped(n_a: int, n: int) -> Any:
        key = (n_a, n)
        if key not in cache:
            cache[key] = func(n_a, n)
        return cache[key]

    return wrapped


def _kl(p: np.ndarray, q: np.ndarray | float) -> np.ndarray:
    """Kullback-Leibler divergence KL(Bernoulli(p) || Bernoulli(q)), elementwise."""
    return rel_entr(p, q) + rel_entr(1.0 - p, 1.0 - q)


def information_bound(pa: np.ndarray, proto: Protocol) -> np.ndarray:
    """Per image, a lower bound on the expected draws of *any* sound sequential procedure that
    certifies each radius as often as fixed sampling does.

    A procedure with P_q[certify r] <= alpha for every q < Phi(r / sigma) (what a certificate
    with P[p_lower > p_A] <= alpha implies) that certifies r with probability pi under p_A = p
    needs E_p[draws] >= kl(pi, alpha) / KL(p || Phi(r / sigma)) whenever pi >= alpha: the
    change-of-measure inequality for stopped i.i.d. samples (Wald's identity with the data-
    processing inequality; E. Kaufmann, O. Cappe, A. Garivier, "On the complexity of best-arm
    identification in multi-armed bandit models", JMLR 17, 2016, Lemma 1). pi is the fixed run's
    probability of certifying r, P[Bin(n, p) >= k_fixed(r)]; the bound is the largest over the
    radii, capped at the budget. It holds for every stopping rule and every bound, not just this
    project's, so draws_fixed / sum(bound) caps the saving of any of them that matches fixed
    sampling image by image.
    """
    fixed = SequentialPlan(proto.budget, proto.alpha, proto.sigma, proto.radii, (proto.budget,))  # L = 1: Cohen's bound
    best = np.zeros(pa.size)
    for t, k in zip(fixed.thresholds, fixed.needed_counts):
        pi = binom.sf(k - 1, proto.budget, pa) if k <= proto.budget else np.zeros(pa.size)
        useful = (pa > t) & (pi > proto.alpha)
        with np.errstate(divide="ignore", invalid="ignore"):
            need = np.where(useful, _kl(pi, proto.alpha) / _kl(pa, t), 0.0)
        best = np.maximum(best, need)
    return np.minimum(best, proto.budget)


def simulate(proto: Protocol, first: int, growth: float, futility: float, pas: list[np.ndarray],
             rng: np.random.Generator) -> dict[str, Any]:
    """Simulate ``proto`` once per p_A vector in ``pas`` (one trial each), draws from ``rng``."""
    plan = SequentialPlan.make(proto.budget, proto.alpha, proto.sigma, proto.radii, first, growth, futility)
    thresholds = np.array(plan.thresholds)
    looks = np.array(plan.looks)
    stop = _memo(lambda n_a, n: should_stop([n_a], n, plan))
    seq_bound = _memo(lambda n_a, n: lower_bound_at_look(n_a, n, plan))
    fixed_bound = _memo(lambda n_a, n: lower_confidence_bound(n_a, n, proto.alpha))

    draws_fixed = draws_seq = draws_clairvoyant = 0
    draws_information = 0.0
    cert_fixed = np.zeros(len(proto.radii))
    cert_seq = np.zeros(len(proto.radii))
    images_total = 0
    worst_deficit = 0.0  # largest per-trial (fixed - sequential) certified share, over radii
    stop_looks: list[int] = []
    for pa in pas:
        m = pa.size
        draws_information += float(np.maximum(information_bound(pa, proto), 1.0).sum())
        # Cumulative counts at every look: binomial increments between looks, same draws for both.
        steps = np.diff(np.concatenate(([0], looks)))
        counts = np.cumsum(rng.binomial(steps[None, :], pa[:, None]), axis=1)  # (m, L)
        n_a_fixed = counts[:, -1]
        lf = np.array([fixed_bound(int(k), proto.budget) for k in n_a_fixed])
        stop_idx = np.full(m, len(looks) - 1)
        for i in range(m):
            for j, n in enumerate(looks):
                if stop(int(counts[i, j]), int(n)):
                    stop_idx[i] = j
                    break
        n_stop = looks[stop_idx]
        # Clairvoyant futility, a bound on what any futility rule could add: each image stops at
        # the first look whose sequential bound reaches the largest radius the fixed run
        # certifies on the same draws (the first look if it certifies none); nothing is lost.
        for i in range(m):
            reached = np.flatnonzero(lf[i] >= thresholds)
            if reached.size == 0:
                draws_clairvoyant += int(looks[0])
                continue
            t = thresholds[reached[-1]]
            j = next((j for j, n in enumerate(looks) if seq_bound(int(counts[i, j]), int(n)) >= t), len(looks) - 1)
            draws_clairvoyant += int(looks[j])
        ls = np.array([seq_bound(int(counts[i, stop_idx[i]]), int(n_stop[i])) for i in range(m)])
        cf = (lf[:, None] >= thresholds[None, :]).sum(axis=0)
        cs = (ls[:, None] >= thresholds[None, :]).sum(axis=0)
        cert_fixed += cf
        cert_seq += cs
        worst_deficit = max(worst_deficit, float(np.max((cf - cs) / m)))
        draws_fixed += proto.budget * m
        draws_seq += int(n_stop.sum())
        images_total += m
        stop_looks.extend(int(x) for x in n_stop)
    return {
        "protocol": proto.name,
        "budget": proto.budget,
        "alpha": proto.alpha,
        "sigma": proto.sigma,
        "radii": list(proto.radii),
        "first": first,
        "growth": growth,
        "futility": futility,
        "looks": len(plan.looks),
        "trials": len(pas),
        "images": images_total,
        "draws_fixed_per_image": draws_fixed / images_total,
        "draws_sequential_per_image": draws_seq / images_total,
        "ratio": draws_fixed / draws_seq,
        "ratio_clairvoyant_futility": draws_fixed / draws_clairvoyant,
        "ratio_information_bound": draws_fixed / draws_information,
        "median_stop": float(np.median(stop_looks)),
        "certified_fixed": [round(float(c / images_total), 4) for c in cert_fixed],
        "certified_sequential": [round(float(c / images_total), 4) for c in cert_seq],
        "mean_deficit_per_100": [round(float(100 * (f - s) / images_total), 3) for f, s in zip(cert_fixed, cert_seq)],
        "worst_trial_deficit_per_100": round(100 * worst_deficit, 2),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20, help="independent sets of images (default 20)")
    p.add_argument("--images", type=int, default=100, help="images per trial with the default mix (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first", default=str(FIRST_LOOK), help=f"first look(s), comma-separated (default {FIRST_LOOK})")
    p.add_argument("--growth", default=str(GROWTH), help=f"growth(s), comma-separated (default {GROWTH})")
    p.add_argument("--futility", default=str(FUTILITY), help=f"futility level(s), comma-separated (default {FUTILITY})")
    p.add_argument("--pa-file", help="a .npy or text file of p_A values to use instead of the default mix")
    p.add_argument("--protocols", default="cifar10,imagenet,targets", help="any of cifar10, imagenet, targets")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    groups = [g.strip() for g in args.protocols.split(",") if g.strip()]
    pa_fixed = load_pa(args.pa_file) if args.pa_file else None
    firsts = [int(x) for x in args.first.split(",")]
    growths = [float(x) for x in args.growth.split(",")]
    futilities = [float(x) for x in args.futility.split(",")]
    # Separate streams: the same images (p_A) in every protocol and every (first, growth), so
    # settings are compared on paired data; the draws get a stream per protocol.
    pa_rng = np.random.default_rng([args.seed, 0])
    pas = [pa_fixed if pa_fixed is not None else sample_pa(pa_rng, args.images) for _ in range(args.trials)]
    for first, growth, futility in itertools.product(firsts, growths, futilities):
        for k, proto in enumerate(protocols(groups, first, growth)):
            rng = np.random.default_rng([args.seed, 1, k])
            start = time.perf_counter()
            row = simulate(proto, first, growth, futility, pas, rng)
            row["seconds"] = round(time.perf_counter() - start, 2)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(
                    f"{row['protocol']:<28} first={first:<4} growth={growth:<5} futility={futility:<5} L={row['looks']:<3} "
                    f"draws/image fixed {row['draws_fixed_per_image']:>8.0f} seq {row['draws_sequential_per_image']:>8.0f} "
                    f"ratio {row['ratio']:6.2f}x (clairvoyant futility {row['ratio_clairvoyant_futility']:6.2f}x, any procedure <= {row['ratio_information_bound']:6.2f}x)  radii {row['radii']}  cert fixed {row['certified_fixed']} "
                    f"seq {row['certified_sequential']}  worst deficit/100 {row['worst_trial_deficit_per_100']}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
