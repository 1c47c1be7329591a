"""The driver at scale: plan, aggregate and resume a run of 10^5 units, locally and on S3.

    python benchmarks/bench_scale.py [--units 100000] [--json] [--skip-s3]

A real run through ``certify_run``, the real aggregator and the real storage layer, with nearly
free work in the actors: ``--methods cohen`` with the bundled digits CNN, one draw per unit
(``--chunk 1``), over the 297 held-out digits and as many sigmas as ``--units`` needs
(297 x sigmas x (n0 + n) units, n0 = 1, n = 33). Run once on a local folder and once on a moto S3
server on 127.0.0.1 (started here), each followed by a resume of the complete run (everything
logged: it plans, reads the whole unit log, replays it and rewrites the table). Prints driver
units/s while units arrive (first result to last), the peak resident memory of the driver
process, the number of unit-log parts at the end (compaction keeps it at a few hundred) and the
resume times. ``--json``: one object with ``units``, ``units_per_s``, ``units_per_s_s3``,
``resume_s_local``, ``resume_s_s3``, ``peak_driver_mib``, ``parts``, ``parts_s3``.
Targets (BENCHMARKS.md): >= 2,000 units/s, resume <= 10 s locally and <= 30 s on moto, driver
memory <= 1 GiB.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import dump, env_facts, load_average  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.run import certify_run  # noqa: E402
from pipeline.rundir import RunDir  # noqa: E402
from workers import storage  # noqa: E402

IMAGES = 297
UNITS_PER_GROUP = 34  # n0 = 1 and n = 33 draws, one draw per unit


def scale_config(out: str, units: int, workers: int | None = None) -> RunConfig:
    """A cohen run of about ``units`` one-draw units over the held-out digits."""
    sigmas = max(1, round(units / (IMAGES * UNITS_PER_GROUP)))
    return RunConfig(out=out, data="digits", classifier="digits", denoiser=None, methods=["cohen"],
                     sigmas=[round(0.1 + 0.05 * i, 4) for i in range(sigmas)], n0=1, n=UNITS_PER_GROUP - 1,
                     alpha=0.01, chunk=1, progress=False, workers=workers, batch_size=8)


def _peak_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(out: str, units: int, workers: int | None) -> dict[str, Any]:
    config = scale_config(out, units, workers)
    start = time.perf_counter()
    summary = certify_run(config, log=lambda _: None)
    total = time.perf_counter() - start
    logged = RunDir(out).read_units()
    first = float((logged["finished_at"] - logged["seconds"]).min())
    window = float(logged["finished_at"].max()) - first
    parts = len(storage.list_files(storage.join(out, "units"), suffix=".parquet"))
    start = time.perf_counter()
    again = certify_run(config, log=lambda _: None)
    resume = time.perf_counter() - start
    assert again.units_run == 0 and len(again.table) == len(summary.table)
    return {"units": summary.units_total, "seconds": round(total, 2), "units_per_s": summary.units_total / window,
            "parts": parts, "resume_s": round(resume, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--skip-s3", action="store_true", help="local folder only")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result: dict[str, Any] = {**env_facts(), "load_avg_1min_before": round(load_average(), 2)}
    root = tempfile.mkdtemp(prefix="bench-scale-")
    try:
        local = measure(f"{root}/local", args.units, args.workers)
        result.update(units=local["units"], units_per_s=local["units_per_s"], parts=local["parts"],
                      resume_s_local=local["resume_s"], seconds_local=local["seconds"])
        if not args.skip_s3:
            import logging

            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            host, port = server.get_host_and_port()
            os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                               "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_DEFAULT_REGION": "us-east-1"})
            import boto3

            boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="bench")
            try:
                s3 = measure("s3://bench/scale", args.units, args.workers)
            finally:
                server.stop()
            result.update(units_per_s_s3=s3["units_per_s"], parts_s3=s3["parts"], resume_s_s3=s3["resume_s"],
                          seconds_s3=s3["seconds"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["peak_driver_mib"] = round(_peak_mib(), 1)
    if args.json:
        print(dump(result))
    else:
        for key in ("units", "units_per_s", "parts", "resume_s_local", "units_per_s_s3", "parts_s3", "resume_s_s3", "peak_driver_mib"):
            if key in result:
                value = result[key]
                print(f"{key:>16}: {value:,.1f}" if isinstance(value, float) else f"{key:>16}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
