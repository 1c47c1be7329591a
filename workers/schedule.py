"""Noise schedules, timestep respacing, the choice of the starting timestep t*, the DensePure
respaced scheduler, and the validation of (schedule, sigma, steps, method) combinations.

Modelled on diffusers: the network predicts, a scheduler object holds the schedule and steps.
Nothing here draws random numbers: the caller passes the noise for a step explicitly, drawn from
its own ``torch.Generator``. All schedule arithmetic is float64 numpy (or Python floats), as in
OpenAI's code, and only scalars cross into torch (every sample of a batch shares one timestep).

What is matched to the reference, and where it comes from:

- ``space_timesteps`` / ``NoiseSchedule.respace``: OpenAI's ``respace.space_timesteps`` and
  ``SpacedDiffusion`` (guided-diffusion and improved-diffusion are identical here). The base chain
  becomes the chain of the kept timesteps, betas recomputed from the kept abar's; the network is
  fed the original timestep ``timestep_map[t]`` (``_WrappedModel``), rescaled by 1000 / original T.
  OpenAI's ``create_gaussian_diffusion`` sends *every* flag set through ``SpacedDiffusion`` (an
  empty ``timestep_respacing`` keeps all T steps), so ``openai_schedule`` does too: ``''`` and
  ``'1000'`` (DensePure's ImageNet config, T = 1000) are then the same object, bit for bit.
- t* (``timestep_for_sigma``): DensePure's runners search the *spaced* diffusion's
  ``sqrt_recipm1_alphas_cumprod`` (nearest of the two bracketing indices), or use the closed form
  of the continuous cosine schedule (CIFAR-10 runner); DDS uses Carlini's first index at or above.
- ``DensePureScheduler``: DensePure's modified ``GaussianDiffusion.p_sample``. Linear/discrete
  chains use the spaced diffusion's ``alphas_cumprod`` at the (spaced) indices tau; the cosine
  chain (improved-diffusion) uses the continuous f(tau / T) at the *rounded* integer tau.

Refusals (``check_sampler``): combinations that the reference would silently turn into NaN
images, pure-noise starts or clamped timesteps raise ``ValueError`` with one line saying what
works. See ``shared/reference/ALGORITHM.md`` sections 2 and 3 for the maths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from workers.unet_flags import diffusion_settings

TimestepRule = Literal["densepure", "carlini"]
VarianceType = Literal["learned_range", "fixed_large", "fixed_small"]
METHOD_RULES: dict[str, TimestepRule | None] = {"cohen": None, "dds": "carlini", "densepure": "densepure"}

# Cosine schedule offset of Nichol & Dhariwal (improved-diffusion). 1 + 0.008 == 1.008 exactly in
# float64, so writing 1.008 below computes the reference's expressions bit for bit.
COSINE_S = 0.008


def _cosine_f(v: float) -> float:
    """f(v) = cos^2(((v + s) / (1 + s)) pi / 2), *not* divided by f(0).

    DensePure's cosine chain only ever uses ratios f(t2) / f(t1) with t1 = 0 first, so the
    normalisation cancels; the expression and its evaluation order are the reference's.
    """
    return math.cos((v + COSINE_S) / 1.008 * math.pi / 2) ** 2


def _cosine_abar(u: float, T: int) -> float:
    """The continuous cosine abar at real timestep u of a T-step chain: f(u / T) / f(0)."""
    return _cosine_f(u / T) / _cosine_f(0.0)


def space_timesteps(T: int, spec: str | Sequence[int]) -> list[int]:
    """The timesteps OpenAI's ``space_timesteps(T, spec)`` keeps, ascending.

    ``spec``: ``""`` (all T steps: what ``create_gaussian_diffusion`` substitutes for an empty
    flag), ``"ddimN"`` (the smallest integer stride giving exactly N steps, from 0), or section
    counts ``"a,b,c"`` / a sequence of ints: T is cut into len(counts) near-equal sections (the
    first T % len sections one longer) and section i keeps counts[i] steps at the rounded
    positions 0, s, 2s, ... (s = (size - 1) / (count - 1), accumulated as a float and rounded half
    to even with Python's round, exactly as OpenAI does, so the kept sets agree to the index).
    Raises ``ValueError`` for specs OpenAI refuses and for a spec that keeps no timestep.
    """
    if T < 1:
        raise ValueError(f"diffusion_steps must be >= 1, got {T}")
    if isinstance(spec, str):
        text = spec
        if text == "":
            return list(range(T))
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"timestep_respacing {spec!r}: use ddimN with an integer N") from None
            for stride in range(1, T):
                if len(range(0, T, stride)) == desired:
                    return list(range(0, T, stride))
            raise ValueError(
                f"timestep_respacing {spec!r}: no integer stride gives exactly {desired} of the {T} "
                f"timesteps; use a ddimN that some stride reaches, or section counts such as '{min(T, 250)}'"
            )
        try:
            counts = [int(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep_respacing {spec!r}: use '' (all steps), comma-separated section counts such as "
                f"'250' or '10,15,20', or ddimN"
            ) from None
    else:
        counts = [int(x) for x in spec]
        text = ",".join(str(c) for c in counts)
    if not counts:
        raise ValueError("timestep_respacing: no section counts given")
    size_per, extra = divmod(T, len(counts))
    start = 0
    kept: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(
                f"timestep_respacing {text!r}: section {i} has {size} of the {T} timesteps and cannot keep {count}; "
                f"use at most {size} steps per section"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride  # accumulated, not i * stride: OpenAI's rounding depends on it
        start += size
    steps = sorted(set(kept))
    if not steps:
        raise ValueError(f"timestep_respacing {text!r} keeps no timestep of {T}; use positive section counts")
    return steps


@dataclass(frozen=True)
class NoiseSchedule:
    """The chain a diffusion model is sampled on: ``betas[t]`` for t = 0..T-1 (float64).

    For an OpenAI flag set this is the *spaced* chain of ``SpacedDiffusion``: ``timestep_map[t]``
    is the original (training) timestep of chain index t, ``original_T`` the training chain's
    length and ``respacing`` the flag string (for messages). ``timestep_map`` None means a chain
    that was never respaced (the identity map over ``original_T == T`` steps).
    """

    name: str
    betas: np.ndarray = field(repr=False)
    timestep_map: tuple[int, ...] | None = field(default=None, repr=False)
    original_T: int | None = None
    respacing: str = ""

    def __post_init__(self) -> None:
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 1 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must be a 1-D array of values in (0, 1)")
        object.__setattr__(self, "betas", betas)
        original = len(betas) if self.original_T is None else int(self.original_T)
        object.__setattr__(self, "original_T", original)
        if self.timestep_map is None:
            if original != len(betas):
                raise ValueError("a schedule with original_T != len(betas) needs its timestep_map")
            return
        tmap = tuple(int(t) for t in self.timestep_map)
        increasing = all(b > a for a, b in zip(tmap, tmap[1:]))
        if len(tmap) != len(betas) or not increasing or tmap[0] < 0 or tmap[-1] >= original:
            raise ValueError("timestep_map must hold len(betas) strictly increasing timesteps in [0, original_T)")
        object.__setattr__(self, "timestep_map", tmap)

    @classmethod
    def from_name(cls, name: str, T: int) -> "NoiseSchedule":
        """OpenAI's named schedules for any number of steps T (the raw training chain).

        ``linear``: betas from 1e-4 to 0.02 scaled by 1000 / T (so that any T spans the same
        noise range); ``cosine``: abar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), betas capped at 0.999.
        """
        if T < 1:
            raise ValueError(f"diffusion_steps must be >= 1, got {T}")
        if name == "linear":
            scale = 1000.0 / T
            return cls("linear", np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64))
        if name == "cosine":
            betas = [min(1 - _cosine_f((i + 1) / T) / _cosine_f(i / T), 0.999) for i in range(T)]
            return cls("cosine", np.array(betas, dtype=np.float64))
        raise ValueError(f"unknown noise schedule {name!r}: use 'linear' or 'cosine'")

    def respace(self, spec: str | Sequence[int]) -> "NoiseSchedule":
        """``SpacedDiffusion``: the chain of the timesteps ``space_timesteps(T, spec)`` keeps.

        Betas are recomputed as 1 - abar_i / abar_prev over the kept i (no 0.999 cap, as OpenAI),
        so the kept abar's are the base ones; the original timesteps go into ``timestep_map``.
        """
        if self.timestep_map is not None:
            raise ValueError("this schedule is already respaced: respace the training chain")
        keep = space_timesteps(self.T, spec)
        keep_set = set(keep)
        last = 1.0
        betas = []
        for i, abar in enumerate(self.alphas_cumprod):
            if i in keep_set:
                betas.append(1 - abar / last)
                last = abar
        text = spec if isinstance(spec, str) else ",".join(str(int(c)) for c in spec)
        # A spacing that keeps every step is no respacing: label it '' so that '' and 'T' are equal objects.
        return NoiseSchedule(self.name, np.array(betas), tuple(keep), self.T, text if len(keep) < self.T else "")

    @property
    def T(self) -> int:
        """Length of this (possibly spaced) chain: timesteps t = 0..T-1 index it."""
        return len(self.betas)

    @property
    def is_respaced(self) -> bool:
        """True when chain indices are not the training timesteps (the map is not the identity)."""
        return self.timestep_map is not None and self.T != self.original_T

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    @property
    def noise_ratio(self) -> np.ndarray:
        """sqrt((1 - abar_t) / abar_t): the noise std of x_t / sqrt(abar_t), per t.

        Written as the reference's ``sqrt(1 / abar - 1)`` (``sqrt_recipm1_alphas_cumprod``), the
        array its t* search reads, so that the bracketing comparisons agree bit for bit.
        """
        return np.sqrt(1.0 / self.alphas_cumprod - 1)

    @property
    def continuous_cosine(self) -> bool:
        """Whether DensePure's closed-form t* and continuous chain apply (cosine schedule)."""
        return self.name == "cosine"

    def describe(self) -> str:
        """E.g. 'linear schedule, T = 1000' or 'linear schedule, 250 of 1000 timesteps (timestep_respacing '250')'."""
        if self.is_respaced:
            return (
                f"{self.name} schedule, {self.T} of {self.original_T} timesteps "
                f"(timestep_respacing {self.respacing!r})"
            )
        return f"{self.name} schedule, T = {self.T}"


def openai_schedule(noise_schedule: str, diffusion_steps: int, timestep_respacing: str = "") -> NoiseSchedule:
    """The chain OpenAI's ``create_gaussian_diffusion`` builds from these three flags.

    Always through ``SpacedDiffusion``, like the reference: an empty respacing keeps all steps
    (recomputed betas differ from the raw ones by ~1e-12 relative, abar's are identical), and
    ``'1000'`` on T = 1000 is then exactly the same schedule as ``''``.
    """
    return NoiseSchedule.from_name(noise_schedule, diffusion_steps).respace(timestep_respacing)


def schedule_from_flags(flags: Mapping[str, Any]) -> NoiseSchedule:
    """The sampling chain of an OpenAI flag set (script_util names), before any model is loaded.

    Reads ``noise_schedule``, ``diffusion_steps`` and ``timestep_respacing`` with OpenAI's
    defaults (``workers.unet.diffusion_settings``); the result carries the timestep map, so
    ``check_sampler(schedule_from_flags(flags), sigma, steps, method)`` validates a run from its
    flags file alone. Raises ``ValueError`` for bad flags or respacing.
    """

    s = diffusion_settings(flags)
    return openai_schedule(s.noise_schedule, s.diffusion_steps, s.timestep_respacing)


def start_scale(sigma: float) -> float:
    """sqrt(a), a = 1 / (1 + 4 sigma^2): scales x' = 2(x + delta) - 1 onto the chain at t*.

    x' carries noise of std 2 sigma; sqrt(a) x' then has signal weight sqrt(abar) and noise std
    sqrt(1 - abar) for abar = a, i.e. it is exactly a sample of q(x_t | x) at the continuous t*.
    Evaluated as the runners do, a ** 0.5 of a = 1 / (1 + (2 sigma)^2).
    """
    return (1 / (1 + (sigma * 2) ** 2)) ** 0.5


# --------------------------------------------------------------------------------------------
# t* and its limits


def _cosine_t_star(T: int, target: float) -> float:
    """The closed-form inverse of the continuous cosine abar at noise ratio ``target`` (real t*).

    Same expression and evaluation order as DensePure's CIFAR-10 runner.
    """
    return T * (1 - (2 * 1.008 * math.asin(math.sin(math.pi / (2 * 1.008)) / (1 + target**2) ** 0.5)) / math.pi)


def _cosine_sigma_at(u: float, T: int) -> float:
    """The sigma whose closed-form t* is u (the inverse of ``_cosine_t_star``)."""
    abar = _cosine_abar(u, T)
    return math.sqrt((1 - abar) / abar) / 2


def _cosine_applies(schedule: NoiseSchedule) -> bool:
    """DensePure's cosine path (closed-form t*, continuous chain), refused on a respaced chain.

    The reference computes t* and f(tau / T) on the original T-step timescale but feeds the
    network ``timestep_map[tau]``: with fewer kept steps that indexes past the map or feeds the
    wrong timestep. Only the identity spacing ('' or 'T') is coherent.
    """
    if not schedule.continuous_cosine:
        return False
    if schedule.is_respaced:
        raise ValueError(
            f"DensePure on the cosine schedule computes t* and its chain on the original {schedule.original_T}-step "
            f"timescale and cannot run on {schedule.describe()}; use timestep_respacing '' or '{schedule.original_T}'"
        )
    return True


def timestep_for_sigma(schedule: NoiseSchedule, sigma: float, rule: TimestepRule = "densepure") -> float:
    """The timestep t* (an index of ``schedule``'s possibly spaced chain) matching smoothing noise sigma.

    The noise in model scale has std 2 sigma. ``densepure``: on the cosine schedule the closed
    form of the continuous schedule (a real number); otherwise the nearer of the two indices whose
    ratios bracket 2 sigma (ratio[t] < 2 sigma <= ratio[t+1]; ties to the lower one), searched on
    the spaced chain as the runner does. ``carlini``: the first index whose ratio is >= 2 sigma.

    Where the reference silently falls back to T - 1 (pure noise) or clamps, this raises
    ``ValueError``: 2 sigma below the chain's smallest ratio or above its largest (for the cosine
    closed form: round(t*) past T - 1).
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if rule not in ("densepure", "carlini"):
        raise ValueError(f"unknown timestep rule {rule!r}: use 'densepure' or 'carlini'")
    target = sigma * 2
    T = schedule.T
    if rule == "densepure" and _cosine_applies(schedule):
        t_star = _cosine_t_star(T, target)
        if round(t_star) > T - 1:
            reason = f"t* = {t_star:.2f} rounds past T - 1 = {T - 1}"
            raise ValueError(_sigma_message(schedule, sigma, "densepure", reason))
        return t_star
    ratio = schedule.noise_ratio
    if rule == "carlini":
        if not ratio[0] <= target <= ratio[-1]:
            raise ValueError(_sigma_message(schedule, sigma, "dds", _ratio_range_reason(ratio, target)))
        return float(np.nonzero(ratio >= target)[0][0])
    for t in range(T - 1):
        if ratio[t] < target and ratio[t + 1] >= target:
            return float(t + 1 if target - ratio[t] > ratio[t + 1] - target else t)
    raise ValueError(_sigma_message(schedule, sigma, "densepure", _ratio_range_reason(ratio, target)))


def _ratio_range_reason(ratio: np.ndarray, target: float) -> str:
    if target <= ratio[0]:
        return (
            f"2 sigma = {target:g} is not above the chain's smallest noise ratio {ratio[0]:.4g} "
            "(t* would fall back to pure noise)"
        )
    return f"2 sigma = {target:g} is above the chain's largest noise ratio {ratio[-1]:.4g}"


def _fmt_up(x: float) -> str:
    """x rounded *up* to 4 significant digits, so 'sigma > shown' is never looser than the truth."""
    return _fmt_round(x, math.ceil)


def _fmt_down(x: float) -> str:
    return _fmt_round(x, math.floor)


def _fmt_round(x: float, op: Any) -> str:
    if not math.isfinite(x) or x <= 0:
        return f"{x:g}"
    q = 10.0 ** (math.floor(math.log10(x)) - 3)
    return f"{op(x / q) * q:.4g}"


def sigma_range(schedule: NoiseSchedule, method: str) -> tuple[float, float]:
    """(smallest, largest) smoothing sigma ``method`` can use on ``schedule``.

    ``densepure``: sigma must be *above* the first value (below it t* < 1, which allows no reverse
    step; on discrete chains that is 2 sigma > (ratio[0] + ratio[1]) / 2, on the cosine closed
    form t* > 0.5) and at most the second (2 sigma <= ratio[T-1]; cosine: round(t*) <= T - 1,
    strictly below). ``dds``: ratio[0] <= 2 sigma <= ratio[T-1], both inclusive. ``cohen``:
    (0, inf). ``check_sampler`` is the exact test; these numbers are for messages and docs.
    """
    rule = _rule(method)
    if rule is None:
        return 0.0, math.inf
    if rule == "densepure" and _cosine_applies(schedule):
        T = schedule.T
        return _cosine_sigma_at(0.5, T), _cosine_sigma_at(T - 0.5, T)
    ratio = schedule.noise_ratio
    if rule == "carlini":
        return float(ratio[0]) / 2, float(ratio[-1]) / 2
    low = (float(ratio[0]) + float(ratio[1])) / 4 if schedule.T > 1 else math.inf
    return low, float(ratio[-1]) / 2


def _timesteps_ok(timesteps: Sequence[int], T: int) -> bool:
    """Strictly decreasing, last >= 1, first <= T - 1: what the respaced chain needs.

    A repeated timestep gives beta' = 0 (NaN at the last step when it is 0 = the chain's start),
    a timestep 0 gives beta'_0 = 0 and a division by 1 - abar' = 0.
    """
    return (
        len(timesteps) >= 1
        and all(a > b for a, b in zip(timesteps, timesteps[1:]))
        and timesteps[-1] >= 1
        and timesteps[0] <= T - 1
    )


def max_steps(schedule: NoiseSchedule, sigma: float) -> int:
    """The largest DensePure b for ``sigma`` on ``schedule`` (0 if none; raises for an unusable sigma).

    Every b <= floor(t*) is valid (the step t*/b >= 1 keeps the rounded timesteps distinct and
    round(t*/b) >= 1), and no b > round(t*) is (fewer distinct integers in [1, round(t*)] than
    steps), so only round(t*) itself needs checking beyond floor(t*).
    """
    t_star = timestep_for_sigma(schedule, sigma, "densepure")
    for b in range(min(round(t_star), schedule.T), 0, -1):
        if _timesteps_ok(reverse_timesteps(t_star, b), schedule.T):
            return b
    return 0


def _min_sigma_for_steps(schedule: NoiseSchedule, steps: int) -> float | None:
    """A sigma above which DensePure can take ``steps`` steps (t* >= steps), None if no sigma can."""
    T = schedule.T
    if steps > T - 1:
        return None
    if _cosine_applies(schedule):
        # t* >= b is enough for b steps; for b = 1 the exact condition is round(t*) >= 1, t* > 0.5.
        return _cosine_sigma_at(0.5 if steps == 1 else steps, T)
    ratio = schedule.noise_ratio
    # The nearest-bracketing rule gives t* = steps once 2 sigma passes the midpoint of the bracket.
    return (float(ratio[steps - 1]) + float(ratio[steps])) / 4


def _rule(method: str) -> TimestepRule | None:
    if method not in METHOD_RULES:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHOD_RULES)}")
    return METHOD_RULES[method]


def _sigma_message(schedule: NoiseSchedule, sigma: float, method: str, reason: str) -> str:
    lo, hi = sigma_range(schedule, method)
    if method == "densepure":
        works = f"use sigma > {_fmt_up(lo)} and sigma {'<' if _cosine_applies(schedule) else '<='} {_fmt_down(hi)}"
    else:
        works = f"use {_fmt_up(lo)} <= sigma <= {_fmt_down(hi)}"
    return f"sigma {sigma:g} cannot be used for {method} on the {schedule.describe()}: {reason}; {works}"


def check_sampler(schedule: NoiseSchedule, sigma: float, steps: int, method: str) -> None:
    """Raise ``ValueError`` (one line: the combination, why, what works) unless it can run.

    ``method``: ``cohen`` (nothing to check beyond sigma > 0), ``dds`` (t* by Carlini's rule must
    be a real match on the chain; ``steps`` is ignored, DDS is one step) or ``densepure`` (t* by
    DensePure's rule must be a real match, 1 <= steps <= T, and the b timesteps
    round(t* - i t*/b) must strictly decrease down to >= 1). ``schedule`` is the sampling chain,
    e.g. ``schedule_from_flags(flags)`` or a loaded ``Denoiser.schedule``.
    """
    rule = _rule(method)
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if rule is None:
        return
    if rule == "densepure":
        if steps < 1:
            raise ValueError(f"--steps must be >= 1 for densepure, got {steps}")
        if steps > schedule.T:
            raise ValueError(
                f"--steps {steps} exceeds the {schedule.T} timesteps of the {schedule.describe()}; "
                f"use --steps <= {schedule.T - 1}"
            )
    t_star = timestep_for_sigma(schedule, sigma, rule)  # raises for sigma outside the chain
    if rule != "densepure":
        return
    if _timesteps_ok(reverse_timesteps(t_star, steps), schedule.T):
        return
    most = max_steps(schedule, sigma)
    t_text = f"{t_star:.2f}" if _cosine_applies(schedule) else f"{t_star:g}"
    low = _min_sigma_for_steps(schedule, steps)
    reachable = low is not None and low <= sigma_range(schedule, method)[1]
    larger = f"sigma > {_fmt_up(low)}" if reachable else "no sigma reaches that many"
    if most == 0:
        raise ValueError(
            f"sigma {sigma:g}: t* = {t_text} on the {schedule.describe()} allows no DensePure step; use {larger}"
        )
    raise ValueError(
        f"sigma {sigma:g} with --steps {steps}: t* = {t_text} on the {schedule.describe()} allows at most "
        f"{most} steps (more would repeat a timestep or reach 0); use --steps <= {most} or {larger}"
    )


# --------------------------------------------------------------------------------------------
# the sampler


def reverse_timesteps(t_star: float, steps: int) -> list[int]:
    """DensePure's b descending timesteps tau_i = round(t* - i t*/b), i = 0..b-1.

    Python's round (half to even) is the reference's rounding, kept on purpose. For the cosine
    closed form t* is real and only these rounded integers reach the chain and the network.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    inter = t_star / steps
    return [round(t_star - i * inter) for i in range(steps)]


def densepure_chain_betas(schedule: NoiseSchedule, timesteps: Sequence[int]) -> np.ndarray:
    """beta'_j of DensePure's respaced chain over the ascending list [0, tau_{b-1}, ..., tau_0].

    beta'_j = min(1 - g(list[j+1]) / g(list[j]), 0.999) with, as in DensePure's p_sample:
    discrete chains (guided-diffusion, linear): g = the (spaced) chain's alphas_cumprod at the
    index, so beta'_0 is relative to abar_0, not 1; cosine (improved-diffusion): g(tau) =
    f(tau / T), the continuous schedule at the rounded integer tau (f(0) first, so the chain's
    abar' is f(tau)/f(0), the continuous value, not alphas_cumprod[tau], which is one step later).
    """
    chain = [0] + [int(t) for t in timesteps][::-1]
    if _cosine_applies(schedule):
        T = schedule.original_T
        level = [_cosine_f(t / T) for t in chain]
    else:
        abar = schedule.alphas_cumprod
        level = [abar[t] for t in chain]
    return np.array([min(1 - level[j + 1] / level[j], 0.999) for j in range(len(chain) - 1)], dtype=np.float64)


def _abridged(values: Sequence[int]) -> str:
    if len(values) <= 6:
        return str(list(values))
    return f"[{values[0]}, {values[1]}, {values[2]}, ..., {values[-2]}, {values[-1]}]"


class DensePureScheduler:
    """The b-step respaced ancestral sampler of DensePure, for one (schedule, t*, b).

    The chain is the ascending list [0, tau_{b-1}, ..., tau_0] with betas from
    ``densepure_chain_betas``; posterior mean and variance are DDPM's over that chain, as in
    OpenAI's ``GaussianDiffusion`` (clipped log posterior variance: entry 0 replaced by entry 1).
    Evaluation order is i = 0..b-1 at timestep tau_i (an index of ``schedule``; the network gets
    its original timestep from the ``Denoiser``), which is chain index j = b-1-i; the last step
    (j = 0) adds no noise. ``betas`` and ``alphas_cumprod`` hold the chain (float64).

    Raises ``ValueError`` when the b timesteps do not strictly decrease to >= 1 (the reference
    would produce NaN images there) or start past the chain.
    """

    def __init__(self, schedule: NoiseSchedule, t_star: float, steps: int, variance: VarianceType):
        self.schedule = schedule
        self.t_star = float(t_star)
        self.timesteps = reverse_timesteps(t_star, steps)
        if not _timesteps_ok(self.timesteps, schedule.T):
            raise ValueError(
                f"{steps} DensePure steps from t* = {t_star:g} give timesteps {_abridged(self.timesteps)} that repeat, "
                f"reach 0 or pass T - 1 = {schedule.T - 1}; use fewer steps or a larger sigma (see check_sampler)"
            )
        self.variance = variance
        betas = densepure_chain_betas(schedule, self.timesteps)
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        self.betas = betas
        self.alphas_cumprod = abar
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # The posterior variance is 0 at j = 0; OpenAI replaces it by the next entry before the log.
        post_var_for_log = np.append(post_var[1], post_var[1:]) if steps > 1 else post_var.copy()
        with np.errstate(divide="ignore"):
            self._post_log_var_clipped = np.log(post_var_for_log)
        self._log_betas = np.log(betas)
        if variance == "fixed_large":
            fixed = np.append(post_var[1], betas[1:]) if steps > 1 else betas.copy()
            with np.errstate(divide="ignore"):
                self._fixed_log_var = np.log(fixed)
        elif variance == "fixed_small":
            self._fixed_log_var = self._post_log_var_clipped
        elif variance != "learned_range":
            raise ValueError(f"unknown variance type {variance!r}")
        self._sqrt_recip_abar = np.sqrt(1.0 / abar)
        self._sqrt_recipm1_abar = np.sqrt(1.0 / abar - 1.0)
        self._coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
        self._coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(
        self,
        eps: torch.Tensor,
        i: int,
        sample: torch.Tensor,
        noise: torch.Tensor | None,
        var_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step at evaluation index i (timestep ``self.timesteps[i]``).

        Returns (previous sample, clipped predicted x0). ``noise`` (standard normal, shape of
        ``sample``) is required except at the last step, where none is added. ``var_values`` is
        the network's v in [-1, 1] for learned-range variance.
        """
        j = len(self.timesteps) - 1 - i
        pred_x0 = (self._sqrt_recip_abar[j] * sample - self._sqrt_recipm1_abar[j] * eps).clamp(-1.0, 1.0)
        mean = self._coef1[j] * pred_x0 + self._coef2[j] * sample
        if j == 0:
            return mean, pred_x0
        if noise is None:
            raise ValueError("noise is required before the last step")
        if self.variance == "learned_range":
            if var_values is None:
                raise ValueError("learned-range variance needs the network's variance output")
            # At least float32 (bf16 network outputs), float64 kept when the sample is float64.
            frac = (var_values.to(torch.promote_types(var_values.dtype, torch.float32)) + 1.0) / 2.0
            log_var = frac * self._log_betas[j] + (1.0 - frac) * self._post_log_var_clipped[j]
            std = torch.exp(0.5 * log_var).to(sample.dtype)
        else:
            std = math.exp(0.5 * self._fixed_log_var[j])
        return mean + std * noise, pred_x0


def one_shot_denoise(schedule: NoiseSchedule, t: int, sample: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Carlini et al.'s one-shot denoiser: x0 = clip((x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), -1, 1).

    ``t`` indexes ``schedule`` (the spaced chain, whose abar_t is the training abar at
    ``timestep_map[t]``).
    """
    abar = float(schedule.alphas_cumprod[int(t)])
    return ((sample - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)).clamp(-1.0, 1.0)
