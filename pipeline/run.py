"""The driver of a certification run: validate, plan, resume, schedule, aggregate, write the table.

``certify_run`` is the one entry point: the ``densepure certify`` command, the three jobs in
``jobs/`` and the tests all call it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pandas as pd

from pipeline.aggregate import Aggregator, table_from_units
from pipeline.config import RunConfig, differing_fields
from pipeline.lock import Holder, RunLock
from pipeline.manifest import Cost, Manifest
from pipeline.plan import GroupKey, GroupState, group_key, groups_of, plan_units
from pipeline.rundir import LOG_FILES, RunDir
from pipeline.sequential import STOPPING_RULE
from workers import storage
from workers.contract import ModelSpec, UnitRecord
from workers.errors import UserError, first_line

Log = Callable[[str], None]
DRIVER_LOG = LOG_FILES[0]
"""Where the traceback of an unexpected error goes, in the run folder (the last one only)."""

__all__ = ["RunSummary", "certify_run", "model_spec", "preflight", "read_flags"]


@dataclass
class RunSummary:
    """What a finished run reports back to its caller."""

    out: str
    units_total: int
    units_skipped: int
    units_run: int
    table: pd.DataFrame
    seconds: float
    workers: int


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_version() -> str:
    try:
        return metadata.version("densepure-pipeline")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def read_flags(config: RunConfig) -> dict | None:
    """The denoiser's OpenAI flags, read once on the driver: from --model-flags, or the bundled
    digits model's. They travel to the workers as a dict (the file need not exist on worker nodes)."""
    from workers.unet_flags import unet_flags_from_json

    path = config.model_flags
    if not path and config.denoiser == "digits":
        from workers.digits import ASSET_DIR, DENOISER_FLAGS_FILE

        path = str(ASSET_DIR / DENOISER_FLAGS_FILE)
    if not path:
        return None
    local = storage.fetch(path)
    try:
        return unet_flags_from_json(local)
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot read model flags {path}: {first_line(exc)}") from None


def _absolute(source: str | None) -> str | None:
    """``scheme:relative/path`` -> ``scheme:/absolute/path`` when the path exists here: workers run
    in other directories (and a cluster's nodes on this machine's paths only if absolute)."""
    if not source:
        return source
    scheme, sep, rest = source.partition(":")
    if sep and "://" not in source and rest and os.path.exists(rest):
        return f"{scheme}:{os.path.abspath(rest)}"
    return source


def model_spec(config: RunConfig, flags: dict | None) -> ModelSpec:
    """What each worker loads."""
    from workers.models import pin_source

    return ModelSpec(
        dataset=_absolute(config.data),
        # A Hub id is pinned to the commit it resolves to now: every worker loads the same files.
        classifier=_absolute(pin_source(config.classifier)),
        denoiser=_absolute(pin_source(config.denoiser)),
        model_flags=flags if config.model_flags else None,
        device=config.device,
        batch_size=config.batch_size,
        precision=config.precision,
        compile=config.compile,
        needs_denoiser=config.needs_denoiser,
        early_majority=config.early_majority,
    )


def preflight(config: RunConfig, log: Log) -> tuple[list[tuple[int, int]], dict[str, Any], dict | None]:
    """Everything that can fail on bad input, checked on the driver before any GPU time.

    Returns the selected (image_id, label) pairs, the model descriptions (with sha256) for the
    manifest, and the denoiser's flags. The sampler is checked from the flags alone, then the
    models are loaded once on the driver's CPU so that a wrong checkpoint, flags file or
    classifier directory fails here with one line, not on a GPU node.
    """
    from workers.data import check_images, load_dataset, select_indices

    config.validate()
    flags = read_flags(config)
    config.validate_sampler(flags)
    dataset = load_dataset(config.data)
    ids = select_indices(len(dataset), config.skip, config.max_images, config.every, config.indices)
    if not ids:
        raise UserError(f"no images selected from {config.data} ({len(dataset)} images): check --skip/--max/--every/--indices")
    # Every selected image decoded and shape-checked now: a corrupt or odd-sized one deep in the
    # selection would otherwise fail a worker after GPU time was spent.
    check_images(dataset, ids)
    images = [(i, int(dataset.label(i))) for i in ids]
    created = not storage.is_s3(config.out) and not os.path.exists(config.out)
    storage.check_access(config.out)  # before any model is loaded: a bad bucket costs seconds
    try:
        models = _check_models(config, dataset)
    except BaseException:
        if created and os.path.isdir(config.out) and not os.listdir(config.out):
            os.rmdir(config.out)  # leave nothing behind for a run that never started
        raise
    log(f"preflight ok: {len(images)} images from {config.data}, models loaded")
    return images, models, flags


def _check_models(config: RunConfig, dataset: Any) -> dict[str, Any]:
    """Load the models on the driver's CPU; return their descriptions for the manifest."""
    from workers.models import describe_source, load_classifier, load_denoiser
    from workers.purify import Purifier, PurifySpec

    classifier = load_classifier(config.classifier, input_shape=tuple(dataset.image_shape))
    models: dict[str, Any] = {"classifier": describe_source(config.classifier)}
    if classifier.num_classes < dataset.num_classes:
        raise UserError(
            f"classifier {config.classifier} has {classifier.num_classes} classes but {config.data} has "
            f"{dataset.num_classes}: use a classifier trained for this dataset"
        )
    if config.needs_denoiser:
        denoiser = load_denoiser(config.denoiser, config.model_flags)
        channels, size = int(dataset.image_shape[0]), int(dataset.image_shape[-1])
        if denoiser.in_channels != channels:
            raise UserError(
                f"denoiser {config.denoiser} takes {denoiser.in_channels}-channel images but {config.data} has "
                f"{channels} channel{'s' if channels != 1 else ''}: use a denoiser trained on {channels}-channel images"
            )
        if denoiser.image_size != size:
            raise UserError(
                f"denoiser {config.denoiser} takes {denoiser.image_size}x{denoiser.image_size} images but {config.data} "
                f"has {size}x{size}: use the denoiser trained at this resolution"
            )
        # The schedule of the loaded model (diffusers folders carry their own): every
        # (sigma, method) must be samplable before any GPU time is spent.
        for sigma in config.sigmas:
            for method in config.methods:
                if method != "cohen":
                    try:
                        Purifier(PurifySpec(method, sigma, config.steps, config.max_votes(method)), denoiser)
                    except ValueError as exc:
                        raise UserError(str(exc)) from None
        models["denoiser"] = describe_source(config.denoiser, config.model_flags)
    return models


def _same_source(spelling_a: Any, spelling_b: Any) -> bool:
    """Whether two spellings of a source name the same place: ``scheme:path`` with local paths
    compared as real absolute paths (``./x`` and ``/abs/x``), URIs as written."""
    if not isinstance(spelling_a, str) or not isinstance(spelling_b, str):
        return spelling_a == spelling_b

    def norm(spelling: str) -> str:
        scheme, sep, rest = spelling.partition(":")
        if not sep or "://" in spelling or scheme.lower() not in ("openai", "diffusers", "hf", "torchscript", "cifar10", "imagenet", "parquet"):
            return os.path.realpath(spelling) if os.path.exists(spelling) else spelling
        return f"{scheme.lower()}:{os.path.realpath(rest) if os.path.exists(rest) else rest}"

    return norm(spelling_a) == norm(spelling_b)


def _files(models: dict[str, Any], role: str) -> Any:
    description = models.get(role) or {}
    return description.get("files"), description.get("revision")


def _result_differences(previous: Manifest, config: RunConfig, models: dict[str, Any]) -> list[str]:
    """The result fields on which a resumed run differs from the folder's, comparing models by the
    sha256 of their files (and Hub commit) and data by where it is, not by how they are spelled."""
    diff = differing_fields(previous.config, config.to_dict())
    same = {
        "data": _same_source(previous.config.get("data"), config.data),
        "denoiser": _files(previous.models, "denoiser") == _files(models, "denoiser"),
        "classifier": _files(previous.models, "classifier") == _files(models, "classifier"),
        # The flags file is hashed with the denoiser's files.
        "model_flags": _files(previous.models, "denoiser") == _files(models, "denoiser"),
    }
    diff = [f for f in diff if not same.get(f, False)]
    # Sequential draws stopped under another rule would be mixed with ones stopped under this one.
    if config.sampling == "sequential" == previous.config.get("sampling") and previous.stopping_rule != STOPPING_RULE:
        diff.append("stopping rule")
    return diff


def _open_run(config: RunConfig, log: Log, models: dict[str, Any]) -> tuple[RunDir, Manifest | None]:
    """Resume, refuse, or clear the run folder at ``config.out``."""
    run = RunDir(config.out)
    if not run.has_manifest():
        return run, None
    if config.overwrite:
        # clear() refuses a folder whose manifest is not ours, and deletes only our files.
        removed = run.clear()
        log(f"--overwrite: removed the previous run at {config.out} ({len(removed)} files of densepure's)")
        return run, None
    previous = run.read_manifest()
    diff = _result_differences(previous, config, models)
    if diff:
        raise UserError(
            f"{config.out} holds a run with a different configuration (differs in: {', '.join(diff)}); "
            "use another --out, or --overwrite to replace it"
        )
    return run, previous


def _replay(groups: dict[GroupKey, GroupState], logged: pd.DataFrame) -> None:
    """Feed the unit log to its groups (units of groups no longer planned are ignored)."""
    # Plain lists, not itertuples: at 10^5 units pandas' per-row access is most of a resume.
    columns = [logged[c].tolist() for c in ("image_id", "sigma", "method", "unit_id", "phase", "start", "num_draws", "counts")]
    for image_id, sigma, method, unit_id, phase, start, num_draws, counts in zip(*columns):
        group = groups.get(group_key(image_id, sigma, method))
        if group is not None:
            group.add(unit_id, phase, start, num_draws, counts)


def certify_run(config: RunConfig, log: Log = print, ray_address: str | None = None) -> RunSummary:
    """Certify every selected image under every (sigma, method, votes), resuming if possible.

    One driver per run folder: the run's lease (``pipeline/lock.py``) is taken before the folder
    is touched and renewed while the run lasts; a second driver is refused, and a driver whose
    lease was taken over stops writing.
    """
    started = time.time()
    images, models, flags = preflight(config, log)
    existing = RunDir(config.out)
    if existing.has_manifest():
        # A folder that is not a run of ours (or whose manifest is damaged) is refused before the
        # lease writes anything into it.
        existing.require_ours() if config.overwrite else existing.read_manifest()
    lock = RunLock.acquire(config.out, Holder.current(run_id=""), stale_after_s=config.lease_timeout,
                           force=config.force_unlock, log=log)
    try:
        return _certify_locked(config, log, ray_address, images, models, flags, lock, started)
    finally:
        lock.release()


def _certify_locked(config: RunConfig, log: Log, ray_address: str | None, images: list, models: dict,
                    flags: dict | None, lock: RunLock, started: float) -> RunSummary:
    run, previous = _open_run(config, log, models)
    groups = groups_of(config, images)
    logged = _read_log(run, log) if previous is not None else None
    if logged is not None:
        _replay(groups, logged)
    pending = [u for g in groups.values() for u in g.pending()]
    budget_units = len(plan_units(config, images))
    skipped = int(logged["unit_id"].nunique()) if logged is not None else 0
    if previous is not None:
        if config.sampling == "fixed":
            log(f"resuming {config.out}: {skipped} of {budget_units} units already done, {len(pending)} to run")
        else:
            done_groups = sum(g.finished for g in groups.values())
            log(f"resuming {config.out}: {skipped} units already done, {done_groups} of {len(groups)} groups "
                f"finished, {len(pending)} units to run now (later rounds as groups need them)")

    manifest = Manifest(
        run_id=previous.run_id if previous else uuid.uuid4().hex[:12],
        status="running",
        config=config.to_dict(),
        fingerprint=config.fingerprint(),
        models=models,
        package_version=package_version(),
        created_at=previous.created_at if previous else _now(),
        updated_at=_now(),
        units_total=budget_units,
        units_done=skipped,
        images_total=len(images),
        groups_total=len(groups),
        groups_done=sum(g.finished for g in groups.values()),
        attempts=(previous.attempts if previous else 0) + 1,
        cost=_cost(logged),
        error=None,
        stopping_rule=STOPPING_RULE if config.sampling == "sequential" else "",
    )
    lock.set_run_id(manifest.run_id)
    lock.check()
    run.write_manifest(manifest)
    try:
        workers = _compute(config, run, groups, pending, flags, log, ray_address, lock)
        if pending or logged is None:  # a resume of a complete run already holds the whole log
            logged = _read_log(run, log)
        table = table_from_units(logged, config)
        lock.check()
        run.write_table(table)
    except BaseException as exc:
        if not lock.lost:  # another driver owns the folder now: leave its files alone
            _record_failure(run, manifest, exc)
        raise
    manifest.status, manifest.units_done, manifest.updated_at = "complete", int(logged["unit_id"].nunique()), _now()
    manifest.groups_done, manifest.cost = len(groups), _cost(logged)
    lock.check()
    run.write_manifest(manifest)
    elapsed = time.time() - started
    log(f"done: {len(table)} rows in {storage.join(config.out, 'certification.parquet')} ({elapsed:.1f} s)")
    return RunSummary(config.out, budget_units, skipped, int(logged["unit_id"].nunique()) - skipped, table, elapsed, workers)


def _read_log(run: RunDir, log: Log) -> pd.DataFrame:
    """The unit log; damaged parts are moved aside (their units are recomputed), with a note."""
    unit_log = run.read_unit_log(heal=True)
    for damaged in unit_log.damaged:
        log(damaged.describe())
    return unit_log.units


def _compute(config: RunConfig, run: RunDir, groups: dict[GroupKey, GroupState], pending: list, flags: dict | None,
             log: Log, ray_address: str | None, lock: RunLock) -> int:
    """Run the pending units, and every round they lead to, on the Ray pool; returns peak workers."""
    if not pending:
        return 0
    from pipeline.pool import ElasticPool, UnitQueue, connect

    connect(ray_address)
    aggregator = Aggregator(run, {uid for g in groups.values() for uid in g.logged}, before_write=lock.check)
    progress = _Progress(len(groups), sum(g.finished for g in groups.values()), config.progress)
    queue = UnitQueue(pending)
    pool = ElasticPool(model_spec(config, flags), config.workers, config.max_workers, config.max_retries,
                       call_draws=config.chunk, gpu_wait=config.gpu_wait)
    log(f"running {len(pending)} units on {'GPU' if pool.gpu else 'CPU'} workers"
        + (" (sequential: more rounds as groups need them)" if config.sampling == "sequential" else ""))

    def on_results(records: list[UnitRecord]) -> None:
        for record in records:
            if not aggregator.add(record):
                continue
            group = groups[group_key(record.image_id, record.sigma, record.method)]
            group.add(record.unit_id, record.phase, record.start, record.num_draws, record.counts)
            was_finished = group.finished
            queue.put_front(group.advance())
            progress.update(record, group.finished and not was_finished, pool.num_workers)

    try:
        with _stop_on_sigterm():
            pool.run(queue, on_results, on_tick=lambda: (lock.check(), progress.refresh(pool.num_workers)))
    finally:
        progress.close()
        if not lock.lost:
            aggregator.flush()
    return pool.peak_workers


def _record_failure(run: RunDir, manifest: Manifest, exc: BaseException) -> None:
    """Mark the manifest failed (or stopped, for Ctrl-C / SIGTERM) with the reason, and keep the
    traceback of unexpected errors in the run folder; never let the bookkeeping hide the error."""
    stopped = isinstance(exc, KeyboardInterrupt)
    manifest.status = "stopped" if stopped else "failed"
    manifest.error = f"{type(exc).__name__}: {first_line(exc, 1000)}"
    manifest.updated_at = _now()
    log_uri = None
    if not stopped and not isinstance(exc, UserError):
        log_uri = storage.join(run.uri, DRIVER_LOG)
        with contextlib.suppress(Exception):
            storage.write_bytes(log_uri, "".join(traceback.format_exception(exc)).encode())
        manifest.error += f" (traceback: {log_uri})"
        exc.log_uri = log_uri  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):
        run.write_manifest(manifest)


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Treat SIGTERM (``ray job stop``, a preempted head) like Ctrl-C: flush finished units and
    mark the run stopped instead of dying mid-write. Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cost(units: pd.DataFrame | None) -> Cost:
    """Totals of the unit log: worker busy seconds, network evaluations, draws, votes."""
    if units is None or len(units) == 0:
        return Cost()
    return Cost(
        gpu_seconds=float(units["seconds"].sum()),
        unet_forwards=int(units["unet_forwards"].sum()),
        classifier_calls=int(units["classifier_calls"].sum()),
        draws=int(units["num_draws"].sum()),
        votes_computed=int(units["votes_computed"].sum()),
        votes_skipped=int(units["votes_skipped"].sum()),
    )


class _Progress:
    """A tqdm bar on the driver: (image, sigma, method) groups finished, draws per second, ETA."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        # In a log (``ray job submit``, CI) a line per unit would bury everything else: redraw
        # at most every 30 s there, twice a second on a terminal.
        interval = 0.5 if sys.stderr.isatty() else 30.0
        self.bar = tqdm(total=total, initial=initial, unit="group", desc="certify", disable=not enabled,
                        dynamic_ncols=True, mininterval=interval, maxinterval=max(interval, 10.0))
        self.draws = 0
        self.start = time.monotonic()

    def update(self, record: UnitRecord, group_finished: bool, workers: int) -> None:
        self.draws += record.num_draws
        if group_finished:
            self.bar.update(1)
        self.refresh(workers)

    def refresh(self, workers: int) -> None:
        if self.bar.disable:
            return
        rate = self.draws / max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix(draws_per_s=f"{rate:.1f}", workers=workers, refresh=False)
        if time.time() - self.bar.last_print_t >= self.bar.mininterval:
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
