"""``benchmarks/bench_scale.py`` at 10^4 units: a run of ten thousand one-draw units through the
real driver, aggregator and storage (a local folder and the moto S3 server), then a resume of the
complete run, must plan, log and replay every unit exactly once and keep the unit log to a bounded
number of parts. The speed targets are the benchmark's (BENCHMARKS.md), not this test's.
"""

from __future__ import annotations

from benchmarks.bench_scale import IMAGES, UNITS_PER_GROUP, measure, scale_config
from pipeline.rundir import MAX_PARTS, RunDir

UNITS = 10_000


def _check(out: str, result: dict) -> None:
    groups = IMAGES * len(scale_config(out, UNITS).sigmas)
    assert result["units"] == groups * UNITS_PER_GROUP >= UNITS
    units = RunDir(out).read_units()
    assert len(units) == result["units"] and units["unit_id"].is_unique
    assert 0 < result["parts"] <= MAX_PARTS
    table = RunDir(out).read_table()
    assert len(table) == groups and (table["n"] == UNITS_PER_GROUP - 1).all()
    manifest = RunDir(out).read_manifest()
    assert manifest.status == "complete" and manifest.units_done == result["units"] and manifest.attempts == 2


def test_ten_thousand_units_locally_and_on_s3(tmp_path, ray_driver, s3_server) -> None:
    local = str(tmp_path / "scale")
    _check(local, measure(local, UNITS, workers=1))  # measure() also asserts the resume ran nothing
    remote = f"s3://{s3_server.make_bucket()}/scale"
    _check(remote, measure(remote, UNITS, workers=1))
