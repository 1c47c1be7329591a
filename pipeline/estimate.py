"""What a run will cost, before it runs: units, draws, network evaluations, FLOPs, GPU-hours.

``estimate(config, images)`` counts from the plan itself (``pipeline.plan.plan_units``), so its
units and draws are the run's exactly, and its network evaluations follow the engine's rules
(``workers.contract``): per draw, DensePure evaluates the UNet 1 + K (b - 1) times (the K votes
share the first step) and the classifier K times, with K = max(votes); DDS evaluates each once;
Cohen only the classifier. FLOPs per evaluation come from the checkpoint manifests in
``configs/checkpoints`` for the two paper UNets (``forward_flops_per_image``), else from
``torch.utils.flop_counter.FlopCounterMode`` on one forward pass of batch 1 (on the meta device
when the network allows it, so even an ImageNet UNet costs no compute; else on the CPU). GPU-hours
are FLOPs / the sustained throughput you assume.

``dry_run(config)`` is ``densepure certify --dry-run``: it validates the configuration, loads the
dataset and the models on the CPU (never a GPU) and estimates, writing nothing (no run folder, no
probe object). Its FLOP counts use the same convention as the manifests: a multiply-add is two
FLOPs; elementwise work (normalisation, activations, the sampler's arithmetic) is not counted.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.config import RunConfig
from pipeline.plan import plan_units
from workers.contract import WorkUnit, copies, needs_denoiser, unet_forwards_per_draw
from workers.errors import UserError, first_line

__all__ = [
    "CHECKPOINT_MANIFESTS",
    "DEFAULT_TFLOPS",
    "CostEstimate",
    "MethodCost",
    "NetworkFlops",
    "classifier_flops",
    "dry_run",
    "estimate",
    "format_estimate",
    "measure_flops",
    "unet_flops",
]

DEFAULT_TFLOPS = 200.0
"""Sustained TFLOP/s per GPU assumed for GPU-hours: 20% of an H100 SXM's 989 dense bf16/fp16
TFLOP/s (NVIDIA's datasheet figure without sparsity). 20% is the utilisation this workload is
known to reach: Carlini et al. (2023) report about 469 s per ImageNet image on one A100 for
n = 10,000 one-shot draws, i.e. 10,100 x (2.24 TFLOP guided-diffusion UNet + about 0.72 TFLOP
BEiT-large/16 at 512) = 3.0e16 FLOP in 469 s = 64 TFLOP/s, 20% of the A100's 312. Diffusion
UNets are not matmul-bound end to end (GroupNorm, SiLU, softmax and the sampler's elementwise
steps are memory-bound and uncounted). Calibrate it on your hardware: after a short run,
``densepure status`` gives draws per GPU-second; times this estimate's FLOPs per draw, that is
your sustained throughput."""

CHECKPOINT_MANIFESTS = Path(__file__).resolve().parents[1] / "configs" / "checkpoints"
"""Manifests of the paper checkpoints: their flags and ``forward_flops_per_image``."""


@dataclass(frozen=True)
class MethodCost:
    """One method's share of a run: work units, noisy draws and network evaluations."""

    method: str
    units: int
    draws: int
    unet_forwards: int
    classifier_calls: int


@dataclass(frozen=True)
class NetworkFlops:
    """FLOPs of one network evaluation on one image, and where the number comes from."""

    flops: float
    source: str


@dataclass(frozen=True)
class CostEstimate:
    """The cost of a run (see the module docstring for how each number is made).

    ``methods`` holds one line per method in the configuration's order; the totals are their
    sums. ``unet`` is None when no method purifies; a network whose FLOPs are unknown makes
    ``flops`` and ``gpu_hours`` None rather than a wrong number.
    """

    images: int
    sigmas: int
    methods: tuple[MethodCost, ...]
    unet: NetworkFlops | None
    classifier: NetworkFlops | None
    assume_tflops: float

    @property
    def units(self) -> int:
        return sum(m.units for m in self.methods)

    @property
    def draws(self) -> int:
        return sum(m.draws for m in self.methods)

    @property
    def unet_forwards(self) -> int:
        return sum(m.unet_forwards for m in self.methods)

    @property
    def classifier_calls(self) -> int:
        return sum(m.classifier_calls for m in self.methods)

    def method_flops(self, cost: MethodCost) -> float | None:
        """FLOPs of one method's evaluations; None when a network it uses has no FLOP count."""
        if cost.unet_forwards and self.unet is None:
            return None
        if cost.classifier_calls and self.classifier is None:
            return None
        unet = cost.unet_forwards * (self.unet.flops if self.unet else 0.0)
        return unet + cost.classifier_calls * (self.classifier.flops if self.classifier else 0.0)

    @property
    def flops(self) -> float | None:
        parts = [self.method_flops(m) for m in self.methods]
        return None if any(p is None for p in parts) else float(sum(parts))  # type: ignore[arg-type]

    @property
    def gpu_hours(self) -> float | None:
        """FLOPs / (assume_tflops x 1e12) / 3600: GPU-hours at the assumed sustained throughput."""
        flops = self.flops
        return None if flops is None else flops / (self.assume_tflops * 1e12) / 3600.0


def _method_costs(units: Sequence[WorkUnit], order: Sequence[str]) -> tuple[MethodCost, ...]:
    totals: dict[str, list[int]] = {m: [0, 0, 0, 0] for m in order}
    for u in units:
        t = totals.setdefault(u.method, [0, 0, 0, 0])
        t[0] += 1
        t[1] += u.num_draws
        # The engine's own rules (workers.contract), per draw of the unit's max(votes) votes.
        t[2] += unet_forwards_per_draw(u.method, u.steps, u.max_votes) * u.num_draws
        t[3] += copies(u.method, u.max_votes) * u.num_draws
    return tuple(MethodCost(m, *t) for m, t in totals.items())


def estimate(
    config: RunConfig,
    images: list[tuple[int, int]],
    *,
    unet: NetworkFlops | None = None,
    classifier: NetworkFlops | None = None,
    assume_tflops: float = DEFAULT_TFLOPS,
) -> CostEstimate:
    """The cost of certifying ``images`` = [(image_id, label), ...] under ``config``.

    Guarantee: ``units`` and ``draws`` equal ``len(plan_units(config, images))`` and the sum of
    its units' ``num_draws``; the evaluation counts equal what the engine reports for those
    units (``UnitRecord.unet_forwards`` / ``classifier_calls``). ``unet`` / ``classifier`` give the
    FLOPs per evaluation (see :func:`unet_flops`, :func:`classifier_flops`).
    """
    if not assume_tflops > 0:
        raise UserError(f"the assumed throughput must be a positive number of TFLOP/s, got {assume_tflops!r}")
    units = plan_units(config, images)
    return CostEstimate(
        images=len(images), sigmas=len(config.sigmas), methods=_method_costs(units, config.methods),
        unet=unet if config.needs_denoiser else None, classifier=classifier, assume_tflops=float(assume_tflops),
    )


# --------------------------------------------------------------------------------------------
# FLOPs


def measure_flops(module: Any, *inputs: Any) -> float:
    """FLOPs of ``module(*inputs)`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them.

    Runs on the meta device first (shapes only: no compute, no memory for activations) through
    ``torch.func.functional_call`` with meta copies of the parameters and buffers; networks that
    cannot (TorchScript, tensors made on the CPU inside ``forward``) run once on the CPU instead.
    Both give the same count, which depends on shapes only.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        state = {name: torch.empty_like(t, device="meta")
                 for name, t in itertools.chain(module.named_parameters(), module.named_buffers())}
        meta_inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            torch.func.functional_call(module, state, meta_inputs)
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - any meta failure: count on the CPU instead
        pass
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return float(counter.get_total_flops())


def _manifest_flops(model_flags: str | dict) -> NetworkFlops | None:
    """The manifest whose network is the one ``model_flags`` builds, if any."""
    from workers.models import read_model_flags
    from workers.unet_flags import unet_config_from_flags

    try:
        wanted = unet_config_from_flags(read_model_flags(model_flags))
    except (ValueError, UserError):
        return None
    for path in sorted(CHECKPOINT_MANIFESTS.glob("*.json")):
        manifest = json.loads(path.read_text())
        flops = manifest.get("forward_flops_per_image", manifest.get("flops_per_forward"))
        if not isinstance(manifest.get("flags"), dict) or flops is None:
            continue
        if unet_config_from_flags(manifest["flags"]) == wanted:
            return NetworkFlops(float(flops), f"configs/checkpoints/{path.name}")
    return None


def unet_flops(denoiser: Any, model_flags: str | dict | None = None) -> NetworkFlops:
    """FLOPs of one UNet evaluation on one image.

    OpenAI UNets whose flags build the network of a checkpoint manifest
    (``configs/checkpoints/*.json``) take the manifest's ``forward_flops_per_image``; any other
    denoiser (``workers.denoiser.Denoiser``) is counted on one forward pass at batch 1.
    """
    import torch

    if model_flags is not None:
        known = _manifest_flops(model_flags)
        if known is not None:
            return known
    x = torch.zeros(1, denoiser.in_channels, denoiser.image_size, denoiser.image_size)
    t = torch.full((1,), denoiser.schedule.T // 2, dtype=torch.long)
    return NetworkFlops(measure_flops(denoiser, x, t), "FlopCounterMode on one forward pass")


def classifier_flops(classifier: Any, image_shape: Sequence[int]) -> NetworkFlops:
    """FLOPs of one classifier call on one (C, H, W) image, its preprocessing included."""
    import torch

    flops = measure_flops(classifier, torch.zeros(1, *image_shape))
    return NetworkFlops(flops, "FlopCounterMode on one forward pass")


# --------------------------------------------------------------------------------------------
# the dry run


def dry_run(config: RunConfig, assume_tflops: float = DEFAULT_TFLOPS) -> CostEstimate:
    """Validate ``config``, load its dataset and models on the CPU, and estimate the run.

    Guarantee: writes nothing (no run folder, no probe object under ``config.out``, which is not
    even read) and never touches a GPU. Raises UserError for everything the run's preflight
    would refuse (options, data, models, their compatibility) and for combinations the sampler
    would refuse on the workers (a sigma outside the denoiser's chain, too many steps).
    """
    from workers.data import load_dataset, select_indices
    from workers.models import load_classifier, load_denoiser
    from workers.schedule import check_sampler

    config.validate()
    if not assume_tflops > 0:
        raise UserError(f"the assumed throughput must be a positive number of TFLOP/s, got {assume_tflops!r}")
    dataset = load_dataset(config.data)
    ids = select_indices(len(dataset), config.skip, config.max_images, config.every, config.indices)
    if not ids:
        raise UserError(f"no images selected from {config.data} ({len(dataset)} images): check skip/max/every/indices")
    images = [(i, int(dataset.label(i))) for i in ids]
    shape = tuple(dataset.image_shape)
    classifier = load_classifier(config.classifier, device="cpu", input_shape=shape)
    if classifier.num_classes < dataset.num_classes:
        raise UserError(
            f"classifier {config.classifier} has {classifier.num_classes} classes but {config.data} has "
            f"{dataset.num_classes}: use a classifier trained for this dataset"
        )
    unet = None
    if config.needs_denoiser:
        denoiser = load_denoiser(config.denoiser, config.model_flags, device="cpu")
        if (denoiser.in_channels, denoiser.image_size, denoiser.image_size) != shape:
            raise UserError(
                f"denoiser {config.denoiser} takes {denoiser.in_channels}x{denoiser.image_size}x{denoiser.image_size} "
                f"images but {config.data} has {'x'.join(map(str, shape))}: use the denoiser trained at this resolution"
            )
        for method in config.methods:
            if needs_denoiser(method):
                for sigma in config.sigmas:
                    try:
                        check_sampler(denoiser.schedule, sigma, config.steps, method)
                    except ValueError as exc:
                        raise UserError(f"{method} at sigma {sigma:g}: {first_line(exc)}") from exc
        unet = unet_flops(denoiser, config.model_flags)
    try:
        # The FLOP count is also the first time the classifier sees data of this shape.
        clf_flops = classifier_flops(classifier, shape)
    except Exception as exc:  # noqa: BLE001 - e.g. 3-channel images into a 1-channel network
        raise UserError(
            f"classifier {config.classifier} fails on {config.data}'s {'x'.join(map(str, shape))} images: {first_line(exc)}"
        ) from exc
    return estimate(config, images, unet=unet, classifier=clf_flops, assume_tflops=assume_tflops)


# --------------------------------------------------------------------------------------------
# text


def _flops_text(flops: float | None) -> str:
    if flops is None:
        return "unknown"
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP"


def format_estimate(est: CostEstimate) -> str:
    """The estimate as a small table, one line per method and a total, then the assumptions.

    Counts are printed in full (thousands separated by commas), so they can be compared with
    the plan or with ``densepure status`` exactly.
    """
    head = ("method", "units", "draws", "UNet forwards", "classifier calls", "FLOPs")
    rows = [(m.method, f"{m.units:,}", f"{m.draws:,}", f"{m.unet_forwards:,}", f"{m.classifier_calls:,}",
             _flops_text(est.method_flops(m))) for m in est.methods]
    rows.append(("total", f"{est.units:,}", f"{est.draws:,}", f"{est.unet_forwards:,}", f"{est.classifier_calls:,}",
                 _flops_text(est.flops)))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [f"cost estimate: {est.images:,} images x {est.sigmas} sigmas", line(head)]
    out += [line(r) for r in rows]
    if est.unet is not None:
        out.append(f"  UNet: {_flops_text(est.unet.flops)} per forward per image ({est.unet.source})")
    if est.classifier is not None:
        out.append(f"  classifier: {_flops_text(est.classifier.flops)} per call per image ({est.classifier.source})")
    if est.draws and est.flops is not None:
        out.append(f"  per draw: {_flops_text(est.flops / est.draws)} on average")
    hours = est.gpu_hours
    hours_text = "unknown" if hours is None else f"{hours:,.3g}"
    out.append(f"  GPU-hours: {hours_text} at {est.assume_tflops:g} sustained TFLOP/s per GPU")
    out.append("  (every vote of every draw of the budget: early majority and sequential sampling only lower these)")
    return "\n".join(out)
