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
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pandas as pd

from pipeline.aggregate import Aggregator, table_from_units
from pipeline.config import RunConfig, differing_fields
from pipeline.manifest import Cost, Manifest, is_ours
from pipeline.plan import plan_units
from pipeline.rundir import RunDir
from workers import storage
from workers.contract import ModelSpec, UnitRecord
from workers.errors import UserError

Log = Callable[[str], None]


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


def model_spec(config: RunConfig) -> ModelSpec:
    """What each worker loads. The flags file is read here, on the driver, and travels as a dict:
    its path need not exist on the worker nodes."""
    flags = None
    if config.model_flags:
        from workers.unet_flags import unet_flags_from_json

        flags = unet_flags_from_json(storage.fetch(config.model_flags))
    return ModelSpec(
        dataset=config.data,
        classifier=config.classifier,
        denoiser=config.denoiser,
        model_flags=flags,
        device=config.device,
        batch_size=config.batch_size,
        precision=config.precision,
        compile=config.compile,
        needs_denoiser=config.needs_denoiser,
    )


def preflight(config: RunConfig, log: Log) -> tuple[list[tuple[int, int]], dict[str, Any]]:
    """Everything that can fail on bad input, checked on the driver before any GPU time.

    Returns the selected (image_id, label) pairs and the model descriptions (with sha256) for
    the manifest. The models are loaded once on the driver's CPU so that a wrong checkpoint,
    flags file or classifier directory fails here with one line, not on a GPU node.
    """
    from workers.data import load_dataset, select_indices

    config.validate()
    dataset = load_dataset(config.data)
    ids = select_indices(len(dataset), config.skip, config.max_images, config.every, config.indices)
    if not ids:
        raise UserError(f"no images selected from {config.data} ({len(dataset)} images): check --skip/--max/--every/--indices")
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
    return images, models


def _check_models(config: RunConfig, dataset: Any) -> dict[str, Any]:
    """Load the models on the driver's CPU; return their descriptions for the manifest."""
    from workers.models import describe_source, load_classifier, load_denoiser

    classifier = load_classifier(config.classifier, input_shape=tuple(dataset.image_shape))
    models: dict[str, Any] = {"classifier": describe_source(config.classifier)}
    if classifier.num_classes < dataset.num_classes:
        raise UserError(
            f"classifier {config.classifier} has {classifier.num_classes} classes but {config.data} has "
            f"{dataset.num_classes}: use a classifier trained for this dataset"
        )
    if config.needs_denoiser:
        denoiser = load_denoiser(config.denoiser, config.model_flags)
        if denoiser.in_channels != dataset.image_shape[0] or denoiser.image_size != dataset.image_shape[-1]:
            raise UserError(
                f"denoiser {config.denoiser} takes {denoiser.in_channels}x{denoiser.image_size}x{denoiser.image_size} images "
                f"but {config.data} has {'x'.join(map(str, dataset.image_shape))}: use the denoiser trained at this resolution"
            )
        models["denoiser"] = describe_source(config.denoiser, config.model_flags)
    return models


def _open_run(config: RunConfig, log: Log) -> tuple[RunDir, Manifest | None]:
    """Resume, refuse, or clear the run folder at ``config.out``."""
    run = RunDir(config.out)
    if not run.has_manifest():
        return run, None
    if config.overwrite:
        if not is_ours(run.read_manifest_data()):
            raise UserError(
                f"{run.manifest_uri} was not written by densepure: --overwrite only replaces densepure runs; "
                "choose another --out"
            )
        log(f"--overwrite: removing the previous run at {config.out}")
        run.clear()
        return run, None
    previous = run.read_manifest()
    diff = differing_fields(previous.config, config.to_dict())
    if diff:
        raise UserError(
            f"{config.out} holds a run with a different configuration (differs in: {', '.join(diff)}); "
            "use another --out, or --overwrite to replace it"
        )
    return run, previous


def certify_run(config: RunConfig, log: Log = print, ray_address: str | None = None) -> RunSummary:
    """Certify every selected image under every (sigma, method, votes), resuming if possible."""
    from pipeline.pool import ElasticPool, connect

    started = time.time()
    images, models = preflight(config, log)
    run, previous = _open_run(config, log)
    units = plan_units(config, images)
    logged = run.read_units() if previous is not None else None
    done = set(logged["unit_id"]) if logged is not None else set()
    todo = [u for u in units if u.unit_id not in done]
    skipped = len(units) - len(todo)
    if previous is not None:
        log(f"resuming {config.out}: {skipped} of {len(units)} units already done, {len(todo)} to run")

    manifest = Manifest(
        run_id=previous.run_id if previous else uuid.uuid4().hex[:12],
        status="running",
        config=config.to_dict(),
        fingerprint=config.fingerprint(),
        models=models,
        package_version=package_version(),
        created_at=previous.created_at if previous else _now(),
        updated_at=_now(),
        units_total=len(units),
        units_done=skipped,
        images_total=len(images),
        attempts=(previous.attempts if previous else 0) + 1,
        cost=_cost(logged),
        error=None,
    )
    run.write_manifest(manifest)

    workers = 0
    if todo:
        connect(ray_address)
        aggregator = Aggregator(run, done)
        progress = _Progress(len(units), skipped, config.progress)
        pool = ElasticPool(model_spec(config), config.workers, config.max_workers, config.max_retries)
        log(f"running {len(todo)} units on {'GPU' if pool.gpu else 'CPU'} workers")

        def on_result(record: UnitRecord) -> None:
            if aggregator.add(record):
                progress.update(record, pool.num_workers)

        try:
            with _stop_on_sigterm():
                pool.run(todo, on_result, on_tick=lambda: progress.refresh(pool.num_workers))
        except BaseException as exc:
            aggregator.flush()
            manifest.status = "stopped" if isinstance(exc, KeyboardInterrupt) else "failed"
            manifest.error = f"{type(exc).__name__}: {exc}"[:2000]
            manifest.updated_at = _now()
            run.write_manifest(manifest)
            raise
        finally:
            progress.close()
        aggregator.flush()
        workers = pool.peak_workers

    logged = run.read_units()
    table = table_from_units(logged, config.to_dict())
    run.write_table(table)
    manifest.status, manifest.units_done, manifest.updated_at, manifest.cost = "complete", len(units), _now(), _cost(logged)
    run.write_manifest(manifest)
    elapsed = time.time() - started
    log(f"done: {len(table)} rows in {storage.join(config.out, 'certification.parquet')} ({elapsed:.1f} s)")
    return RunSummary(config.out, len(units), skipped, len(todo), table, elapsed, workers)


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
    """Totals of the unit log: worker busy seconds, network evaluations, draws."""
    if units is None or len(units) == 0:
        return Cost()
    return Cost(
        gpu_seconds=float(units["seconds"].sum()),
        unet_forwards=int(units["unet_forwards"].sum()),
        classifier_calls=int(units["classifier_calls"].sum()),
        draws=int(units["num_draws"].sum()),
    )


class _Progress:
    """A tqdm bar on the driver: units done/total, draws per second, ETA."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        # In a log (``ray job submit``, CI) a line per unit would bury everything else: redraw
        # at most every 30 s there, twice a second on a terminal.
        interval = 0.5 if sys.stderr.isatty() else 30.0
        self.bar = tqdm(total=total, initial=initial, unit="unit", desc="certify", disable=not enabled,
                        dynamic_ncols=True, mininterval=interval, maxinterval=max(interval, 10.0))
        self.draws = 0
        self.start = time.monotonic()

    def update(self, record: UnitRecord, workers: int) -> None:
        self.draws += record.num_draws
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

