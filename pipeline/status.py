"""Where a run stands: progress, cost, throughput and ETA, from its manifest and unit log."""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipeline.analysis import load_units, read_manifest, read_table
from pipeline.lock import lease_state
from pipeline.metrics import DEFAULT_BY, certified_accuracy, sampling_savings

__all__ = ["RunStatus", "format_status", "run_status"]


@dataclass
class RunStatus:
    """What ``densepure status`` shows (``to_dict`` is its ``--json``).

    * ``units_done``: distinct unit ids in the log (the log is the source of truth; the
      manifest's own counter, which may lag, is ``units_done_manifest``).
    * ``gpu_seconds``, ``unet_forwards``, ``classifier_calls``: sums over the log (the manifest's
      cost when there is no log).
    * ``draws_per_second``: draws of logged units divided by the wall span from the start of the
      earliest unit (``finished_at - seconds``) to the last ``finished_at``: the whole cluster's
      throughput; ``draws_per_gpu_second`` (draws / summed unit seconds) is the per-worker speed.
      Pauses inside the span (a resumed run) lower the rate.
    * ``eta_seconds``: remaining draws / draws_per_second, with total draws =
      images x sigmas x methods x (n0 + n).
    * ``engines``: the distinct engine settings (device, precision, batch size) of the logged
      units; more than one means the counts are valid but not reproducible bit for bit.
    * ``accuracy_r0``: certified accuracy at radius 0 on finished images, per group.
    * ``status``: the manifest's status, except ``stale`` for a run whose manifest says
      ``running`` while no driver renews its lease (``lock.json`` stale or missing: the driver
      was killed or lost its node); such a run has no ETA. ``manifest_status`` is the manifest's
      own word; ``lease`` is ``held``/``stale``/``none`` and ``driver`` names the lease holder
      (``host:pid (run ..., heartbeat N s ago)``) when there is one.
    """

    run: str
    run_id: str
    status: str
    error: str | None
    created_at: str
    updated_at: str
    partial: bool
    units_done: int
    units_done_manifest: int
    units_total: int
    images_done: int
    images_total: int
    draws_done: int
    draws_total: int
    gpu_seconds: float
    unet_forwards: int
    classifier_calls: int
    wall_seconds: float | None
    workers: int
    engines: list[str] = field(default_factory=list)
    draws_per_second: float | None = None
    draws_per_gpu_second: float | None = None
    eta_seconds: float | None = None
    accuracy_r0: list[dict[str, Any]] = field(default_factory=list)
    manifest_status: str = ""
    lease: str = "none"
    driver: str | None = None
    groups_done: int = 0
    groups_total: int = 0
    votes_computed: int = 0
    votes_skipped: int = 0
    sampling: str = "fixed"
    savings: str | None = None
    """What sequential sampling saved on the finished groups (``pipeline.metrics.Savings``)."""
    remaining: dict[str, Any] = field(default_factory=dict)
    """Upper bound of the work left (every vote of the budget): draws, UNet forwards, classifier
    calls, and worker-hours at this run's own measured seconds per draw of each method."""

    @property
    def stale(self) -> bool:
        """The manifest says running but no driver is alive to finish the run."""
        return self.status == "stale"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _images_finished(table: pd.DataFrame, pairs: int) -> int:
    """Images whose every (sigma, method) certificate is done."""
    if table.empty:
        return 0
    per_image = table[["image_id", "sigma", "method"]].drop_duplicates().groupby("image_id").size()
    return int((per_image >= pairs).sum())


def run_status(run: str) -> RunStatus:
    """Progress, cost and throughput of a run, from its manifest and unit log (see :class:`RunStatus`)."""
    manifest = read_manifest(run)
    config = manifest.config
    table, units = read_table(run, manifest)
    partial = units is not None
    if units is None:
        # Complete run: the log is still there for throughput figures.
        units = load_units(run)

    has_log = not units.empty
    cost = manifest.cost
    units_done = int(units["unit_id"].nunique()) if has_log else manifest.units_done
    gpu_seconds = float(units["seconds"].sum()) if has_log else cost.gpu_seconds
    unet_forwards = int(units["unet_forwards"].sum()) if has_log else cost.unet_forwards
    classifier_calls = int(units["classifier_calls"].sum()) if has_log else cost.classifier_calls
    draws_done = int(units["num_draws"].sum()) if has_log else cost.draws

    wall = None
    workers = 0
    engines: list[str] = []
    if has_log:
        wall = max(float(units["finished_at"].max()) - float((units["finished_at"] - units["seconds"]).min()), 0.0)
        workers = int(units["worker"].nunique())
        engines = sorted(units["engine"].dropna().unique().tolist())
    draws_per_second = draws_done / wall if wall and draws_done else None
    draws_per_gpu_second = draws_done / gpu_seconds if gpu_seconds > 0 and draws_done else None

    lease, holder = lease_state(run)
    driver = holder.describe() if holder is not None else None
    status = manifest.status
    if status == "running" and lease != "held":
        status = "stale"

    pairs = len(config["sigmas"]) * len(config["methods"])
    draws_total = manifest.images_total * pairs * (int(config["n0"]) + int(config["n"]))
    eta = None
    if manifest.status == "complete":
        eta = 0.0
    elif draws_per_second and status != "stale":
        # A run whose driver is gone makes no progress: an ETA would be a guess about a resume.
        eta = max(draws_total - draws_done, 0) / draws_per_second

    accuracy_r0: list[dict[str, Any]] = []
    if not table.empty:
        acc = certified_accuracy(table, [0.0])
        images = acc.attrs["images"]
        for key, value in acc[0.0].items():
            row = dict(zip(DEFAULT_BY, key))
            row["sigma"] = float(row["sigma"])
            row["votes"], row["steps"] = int(row["votes"]), int(row["steps"])
            row.update(accuracy=float(value), images=int(images[key]))
            accuracy_r0.append(row)

    votes_computed = int(units["votes_computed"].sum()) if has_log else cost.votes_computed
    votes_skipped = int(units["votes_skipped"].sum()) if has_log else cost.votes_skipped
    groups_done = int(table[["image_id", "sigma", "method"]].drop_duplicates().shape[0]) if not table.empty else 0
    savings = sampling_savings(table) if not table.empty else None
    kind = "CPU" if engines and all(e.startswith("cpu") for e in engines) else "GPU"
    return RunStatus(
        run=run, run_id=manifest.run_id, status=status, error=manifest.error,
        created_at=manifest.created_at, updated_at=manifest.updated_at, partial=partial,
        units_done=units_done, units_done_manifest=manifest.units_done, units_total=manifest.units_total,
        images_done=_images_finished(table, pairs), images_total=manifest.images_total,
        draws_done=draws_done, draws_total=draws_total, gpu_seconds=gpu_seconds,
        unet_forwards=unet_forwards, classifier_calls=classifier_calls, wall_seconds=wall,
        workers=workers, engines=engines, draws_per_second=draws_per_second,
        draws_per_gpu_second=draws_per_gpu_second, eta_seconds=eta, accuracy_r0=accuracy_r0,
        manifest_status=manifest.status, lease=lease, driver=driver,
        groups_done=groups_done, groups_total=manifest.groups_total or manifest.images_total * pairs,
        votes_computed=votes_computed, votes_skipped=votes_skipped, sampling=str(config.get("sampling", "fixed")),
        savings=savings.describe(kind) if savings is not None else None,
        remaining=_remaining(config, manifest.images_total, units) if manifest.status != "complete" else {},
    )


def _remaining(config: dict[str, Any], images: int, units: pd.DataFrame) -> dict[str, Any]:
    """The work a run has left at most: its budget minus its logged draws, per method, with every
    vote computed (early majority and sequential stops only lower it)."""
    from workers.contract import copies, unet_forwards_per_draw

    per_group = int(config["n0"]) + int(config["n"])
    out = {"draws": 0, "unet_forwards": 0, "classifier_calls": 0, "worker_hours": 0.0, "hours_known": True}
    for method in config["methods"]:
        done = units[units["method"] == method] if len(units) else units
        left = max(images * len(config["sigmas"]) * per_group - int(done["num_draws"].sum() if len(done) else 0), 0)
        k = max(config["votes"]) if method == "densepure" else 1
        out["draws"] += left
        out["unet_forwards"] += left * unet_forwards_per_draw(method, int(config["steps"]), k)
        out["classifier_calls"] += left * copies(method, k)
        if len(done) and int(done["num_draws"].sum()):
            out["worker_hours"] += left * float(done["seconds"].sum()) / int(done["num_draws"].sum()) / 3600
        elif left:
            out["hours_known"] = False  # not measured yet for this method
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return str(datetime.timedelta(seconds=round(float(seconds))))


def _of(done: Any, total: Any) -> str:
    if total:
        return f"{done:,}/{total:,} ({100.0 * done / total:.1f}%)"
    return f"{done:,}/?"


def format_status(s: RunStatus) -> str:
    """Human-readable, multi-line rendering of :func:`run_status`."""
    head = f"run {s.run}" + (f" (id {s.run_id})" if s.run_id else "")
    lines = [f"{head}: {'stale (driver lost?)' if s.stale else s.status}"]
    if s.stale:
        why = f"its lease is stale: {s.driver}" if s.driver else (
            "its lease is damaged" if s.lease == "stale" else "no driver holds its lease")
        lines.append(f"  driver:     none alive: the manifest says running but {why}; resume it to finish")
    elif s.status == "running" and s.driver:
        lines.append(f"  driver:     {s.driver}")
    if s.error:
        lines.append(f"  error:      {s.error}")
    lines.append(f"  units:      {_of(s.units_done, s.units_total)}")
    lines.append(f"  images:     {_of(s.images_done, s.images_total)} finished")
    lines.append(f"  groups:     {_of(s.groups_done, s.groups_total)} finished (image, sigma, method)")
    lines.append(f"  draws:      {_of(s.draws_done, s.draws_total)}" + (" (the budget: groups stop early)" if s.sampling == "sequential" else ""))
    if s.votes_skipped:
        total = s.votes_computed + s.votes_skipped
        lines.append(f"  votes:      {s.votes_computed:,} computed, {s.votes_skipped:,} skipped by early majority "
                     f"({100.0 * s.votes_skipped / total:.1f}% of {total:,})")
    if s.savings:
        lines.append(f"  sampling:   {s.savings}")
    # Worker time is GPU time unless every logged unit ran on a CPU (the demo, tests).
    kind = "CPU" if s.engines and all(e.startswith("cpu") for e in s.engines) else "GPU"
    lines.append(
        f"  cost:       {s.gpu_seconds / 3600:.2f} {kind}-hours ({s.gpu_seconds:.0f} s), "
        f"{s.unet_forwards:,} UNet forwards, {s.classifier_calls:,} classifier calls"
    )
    if s.draws_per_second:
        per_gpu = f", {s.draws_per_gpu_second:.1f} per {kind}-second" if s.draws_per_gpu_second else ""
        lines.append(
            f"  throughput: {s.draws_per_second:.1f} draws/s over {_duration(s.wall_seconds)} wall "
            f"with {s.workers} workers{per_gpu}"
        )
    else:
        lines.append("  throughput: unknown (no finished units yet)")
    if len(s.engines) == 1:
        lines.append(f"  engine:     {s.engines[0]}")
    elif s.engines:
        # Counts stay valid, but a rerun on one setting would not reproduce them bit for bit.
        lines.append(f"  engine:     MIXED settings across units: {'; '.join(s.engines)}")
    lines.append(f"  ETA:        {'none (no live driver)' if s.stale else _duration(s.eta_seconds)}")
    if s.remaining:
        r = s.remaining
        hours = f"about {r['worker_hours']:.2f} {kind}-hours at this run's measured speed" if r["hours_known"] else (
            "worker-hours unknown until every method has run a unit (densepure certify --dry-run estimates it)")
        lines.append(f"  remaining:  at most {r['draws']:,} draws, {r['unet_forwards']:,} UNet forwards, "
                     f"{r['classifier_calls']:,} classifier calls; {hours}")
    if s.updated_at:
        lines.append(f"  updated:    {s.updated_at}")
    if s.accuracy_r0:
        note = " (finished images only)" if s.partial else ""
        lines.append(f"  certified accuracy at r=0{note}:")
        for row in s.accuracy_r0:
            lines.append(
                f"    {row['method']} sigma={row['sigma']:g} K={row['votes']} steps={row['steps']}: "
                f"{row['accuracy']:.3f} ({row['images']} images)"
            )
    return "\n".join(lines)
