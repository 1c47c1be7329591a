"""Draws per second of the Ray pipeline against the engine alone, on the same work.

    python benchmarks/bench_pipeline.py [--images 4] [--n0 100] [--n 1000] [--repeats 5] [--json]

The pipeline side is ``certify_run`` on a private local Ray instance with ``--workers`` actors
(default 1), a temporary output folder and the bundled digits models; the engine side runs the
very same work units (``plan_units`` of the same config: same images, sigmas, methods, n0, n,
seeds) one after the other through ``run_units`` on an ``Engine`` built like the worker's
(``build_engine``), in a fresh process per run as the pipeline's actor is (model loading is not
timed on either side). Both sides get one untimed warm-up run first.

Reported per side (medians of ``--repeats`` runs, alternating which side goes first):

- ``pipeline_draws_per_s`` (steady state): draws / (last unit finished - first unit started),
  from the unit log; it includes scheduling, serialisation, the driver's aggregation and
  parquet flushes between units, but not Ray's start, the driver's preflight model loading or
  the actor's model loading, which a long run pays once;
- ``pipeline_end_to_end_draws_per_s``: draws / the whole ``certify_run`` call (everything);
- ``engine_draws_per_s``: draws / the engine's total time;
- ``overhead_share``: (window - busy) / window, where busy is the actor's time inside
  ``Engine.count`` summed over units: the share of the window spent outside the engine.

``ratio`` = steady pipeline / engine (target >= 0.95). ``counts_identical`` checks that both
sides produced the same counts (same seeds, same batch size).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from benchmarks.common import dump, env_facts, load_average, median  # noqa: E402
from pipeline import pool  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from workers.data import load_dataset, select_indices  # noqa: E402
from pipeline.plan import plan_units  # noqa: E402
from pipeline.rundir import RunDir  # noqa: E402
from pipeline.run import certify_run, model_spec, read_flags  # noqa: E402
from workers.worker import build_engine, run_units  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4, help="held-out digits images (default 4)")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--methods", default="cohen,dds,densepure")
    p.add_argument("--sigmas", default="0.25")
    p.add_argument("--votes", default="1,4")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--chunk", type=int, default=10_000, help="draws per work unit (the pipeline's default)")
    p.add_argument("--batch-size", type=int, help="images per UNet batch (default: the engine's own)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--actor-cpus", type=int,
                   help="override the CPUs each actor reserves (= its thread count), e.g. 1 for a single-thread actor "
                        "(BENCHMARKS.md, 'Actor threads'); default: the pool's own choice")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def _config(args: argparse.Namespace, out: str) -> RunConfig:
    return RunConfig(
        out=out,
        data="digits",
        denoiser="digits",
        classifier="digits",
        methods=args.methods.split(","),
        sigmas=[float(s) for s in args.sigmas.split(",")],
        votes=[int(v) for v in args.votes.split(",")],
        steps=args.steps,
        n0=args.n0,
        n=args.n,
        max_images=args.images,
        chunk=args.chunk,
        batch_size=args.batch_size,
        device="cpu",
        workers=args.workers,
        progress=False,
    )


def _pipeline_once(config: RunConfig) -> dict[str, Any]:
    start = time.perf_counter()
    certify_run(config, log=lambda _msg: None)
    total = time.perf_counter() - start
    units = RunDir(config.out).read_units()
    draws = int(units["num_draws"].sum())
    first_start = float((units["finished_at"] - units["seconds"]).min())
    window = float(units["finished_at"].max()) - first_start
    counts = {row.unit_id: row.counts for row in units.itertuples()}
    return {"draws": draws, "window": window, "total": total, "busy": float(units["seconds"].sum()),
            "counts": {k: [list(map(int, c)) for c in v] for k, v in counts.items()}}


def _engine_once(config: RunConfig, engine: Any, dataset: Any, units: list) -> dict[str, Any]:
    start = time.perf_counter()
    counts = {}
    for unit in units:
        image, _ = dataset.get(unit.image_id)
        counts[unit.unit_id] = run_units(engine, lambda _, image=image: image, [unit])[0].counts
    total = time.perf_counter() - start
    return {"draws": sum(u.num_draws for u in units), "total": total, "counts": counts}


def _engine_in_fresh_process(config: RunConfig, units: list) -> dict[str, Any]:
    """The engine alone on ``units``, in a new process like the pipeline's actor (models loaded
    untimed).

    Each pipeline run gets a fresh actor process, so the engine side gets a fresh process too:
    on this 2-core machine the speed of the same code differed by up to 15% from one process to
    the next, and one long-lived process would compare one sample of that against many.
    """
    dataset = load_dataset(config.data)
    engine = build_engine(model_spec(config, read_flags(config)), tuple(dataset.image_shape))
    out = _engine_once(config, engine, dataset, units)
    out["batch_size"] = engine.batch_size
    return out


def _engine_side(config: RunConfig, units: list) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as executor:
        return executor.submit(_engine_in_fresh_process, config, units).result()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from workers.digits import ASSET_DIR, CLASSIFIER_FILE, DENOISER_FILE

    for name in (DENOISER_FILE, CLASSIFIER_FILE):
        if not (Path(ASSET_DIR) / name).is_file():
            raise SystemExit(f"{Path(ASSET_DIR) / name} is missing: train the digits models first (python scripts/train_digits.py)")
    if args.actor_cpus:
        pool.ElasticPool._cpus_per_cpu_actor = lambda self: args.actor_cpus  # type: ignore[method-assign]
    tmp = tempfile.mkdtemp(prefix="bench_pipeline_")
    # A private Ray instance (its own temp dir, so it never meets another local cluster), with
    # every core of this machine; certify_run's connect() then uses it.
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # Ray's socket paths must stay short
    ray_start = time.perf_counter()
    pool.start_local(num_cpus=len(os.sched_getaffinity(0)), _temp_dir=ray_tmp, log_to_driver=True)
    ray_seconds = time.perf_counter() - ray_start
    try:
        probe = _config(args, os.path.join(tmp, "probe"))
        probe.validate()
        dataset = load_dataset(probe.data)
        ids = select_indices(len(dataset), probe.skip, probe.max_images, probe.every, probe.indices)
        units = plan_units(probe, [(i, int(dataset.label(i))) for i in ids])
        load_before = load_average()
        for w in range(args.warmup):
            _engine_side(probe, units)
            _pipeline_once(_config(args, os.path.join(tmp, f"warmup{w}")))
        pipe: list[dict[str, Any]] = []
        eng: list[dict[str, Any]] = []
        for r in range(args.repeats):
            sides = [("engine", lambda: eng.append(_engine_side(probe, units))),
                     ("pipeline", lambda: pipe.append(_pipeline_once(_config(args, os.path.join(tmp, f"run{r}")))))]
            for _, fn in sides if r % 2 == 0 else sides[::-1]:
                fn()
        load_after = load_average()
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    draws = eng[0]["draws"]
    steady = [p["draws"] / p["window"] for p in pipe]
    end_to_end = [p["draws"] / p["total"] for p in pipe]
    alone = [e["draws"] / e["total"] for e in eng]
    result = {
        "mode": "pipeline",
        "model": "digits",
        "device": "cpu",
        "workers": args.workers,
        "actor_cpus": args.actor_cpus or "pool default",
        "images": len(ids),
        "methods": probe.methods,
        "sigmas": probe.sigmas,
        "votes": probe.votes,
        "steps": probe.steps,
        "n0": probe.n0,
        "n": probe.n,
        "units": len(units),
        "draws_per_run": draws,
        "engine_batch_size_images": eng[0]["batch_size"],
        "repeats": args.repeats,
        "warmup": args.warmup,
        "ray_init_seconds": round(ray_seconds, 2),
        "load_avg_1min_before": round(load_before, 2),
        "load_avg_1min_after": round(load_after, 2),
        **env_facts(),
        "engine_draws_per_s": median(alone),
        "pipeline_draws_per_s": median(steady),
        "pipeline_end_to_end_draws_per_s": median(end_to_end),
        "engine_seconds": [round(e["total"], 3) for e in eng],
        "pipeline_window_seconds": [round(p["window"], 3) for p in pipe],
        "pipeline_total_seconds": [round(p["total"], 3) for p in pipe],
        "pipeline_busy_seconds": [round(p["busy"], 3) for p in pipe],
        "counts_identical": all(p["counts"] == eng[0]["counts"] for p in pipe) and all(e["counts"] == eng[0]["counts"] for e in eng),
    }
    result["overhead_share"] = median([(p["window"] - p["busy"]) / p["window"] for p in pipe])
    result["ratio"] = result["pipeline_draws_per_s"] / result["engine_draws_per_s"]
    result["ratio_end_to_end"] = result["pipeline_end_to_end_draws_per_s"] / result["engine_draws_per_s"]
    result["ratio_per_repeat"] = [round(s / a, 3) for s, a in zip(steady, alone)]
    return result


def format_table(r: dict[str, Any]) -> str:
    return "\n".join([
        f"digits pipeline vs engine on {r['cpu']}, torch {r['torch']}, {r['threads']} threads (driver)",
        f"work per run: {r['images']} images x sigmas {r['sigmas']} x {','.join(r['methods'])}, n0={r['n0']}, n={r['n']}, "
        f"votes {r['votes']}, b={r['steps']}: {r['units']} units, {r['draws_per_run']} draws; {r['workers']} worker(s), "
        f"actor CPUs: {r['actor_cpus']}; engine batch {r['engine_batch_size_images']} images",
        f"load average (1 min) {r['load_avg_1min_before']} before, {r['load_avg_1min_after']} after; "
        f"median of {r['repeats']} after {r['warmup']} warm-up",
        "",
        f"engine alone            {r['engine_draws_per_s']:9.1f} draws/s   seconds {r['engine_seconds']}",
        f"pipeline (steady)       {r['pipeline_draws_per_s']:9.1f} draws/s   window  {r['pipeline_window_seconds']}",
        f"pipeline (end to end)   {r['pipeline_end_to_end_draws_per_s']:9.1f} draws/s   total   {r['pipeline_total_seconds']}",
        f"ratio pipeline/engine: steady {r['ratio']:.3f} (per repeat {r['ratio_per_repeat']}), end to end {r['ratio_end_to_end']:.3f}",
        f"pipeline time outside the engine (window - busy) / window: {100 * r['overhead_share']:.2f}% (median)",
        f"counts identical on both sides: {r['counts_identical']}",
    ])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="ray")
    result = run(args)
    print(dump(result) if args.json else format_table(result), flush=True)


if __name__ == "__main__":
    main()
