"""The distributed pipeline with real parts: a local Ray head, moto S3, the bundled digits models.

Every run here is checked against one uninterrupted reference run: whatever the number of
workers, kills, restarts or storage, the certification table must be identical.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from workers import storage
from workers.errors import UserError
from pipeline.rundir import RunDir
from pipeline.run import certify_run

from tests.fixtures.runs import LONGER, LONGER_ARGS, LONGER_UNITS, REPO, TINY_ARGS, TINY_UNITS, comparable, quiet, tiny


def test_reference_table_has_the_documented_columns(reference):
    for column in ["image_id", "label", "sigma", "method", "votes", "steps", "n0", "n", "alpha", "prediction",
                   "count", "p_lower", "radius", "correct", "abstain"]:
        assert column in reference.columns
    # One row per (image, sigma, method, votes): cohen and dds report K=1, densepure K=1 and K=2.
    assert len(reference) == 3 * (1 + 1 + 2)
    assert set(reference["steps"]) == {0, 1, 2}


def test_two_workers_give_the_same_table(tmp_path, ray_driver, reference):
    summary = certify_run(tiny(tmp_path, workers=2), log=quiet)
    assert summary.workers == 2
    pd.testing.assert_frame_equal(comparable(summary.table), reference)
    # Both workers ran with the same settings, which the unit log records ("auto" resolved).
    engines = set(RunDir(str(tmp_path)).read_units()["engine"])
    assert len(engines) == 1 and engines.pop().split()[:2] in (["cpu", "fp32"], ["cpu", "bf16"])


def test_rerun_resumes_and_recomputes_nothing(tmp_path, ray_driver, reference):
    certify_run(tiny(tmp_path, workers=1), log=quiet)
    messages: list[str] = []
    again = certify_run(tiny(tmp_path, workers=1), log=messages.append)
    assert again.units_run == 0 and again.units_skipped == TINY_UNITS
    assert any(f"{TINY_UNITS} of {TINY_UNITS} units already done" in m for m in messages)
    pd.testing.assert_frame_equal(comparable(again.table), reference)
    manifest = RunDir(str(tmp_path)).read_manifest()
    assert manifest.status == "complete" and manifest.attempts == 2
    assert manifest.models["denoiser"]["files"] and manifest.package_version


def test_a_different_config_on_the_same_out_is_refused_unless_overwrite(tmp_path, ray_driver):
    certify_run(tiny(tmp_path, workers=1, max_images=1), log=quiet)
    with pytest.raises(UserError, match="differs in: n"):
        certify_run(tiny(tmp_path, workers=1, max_images=1, n=41), log=quiet)
    summary = certify_run(tiny(tmp_path, workers=1, max_images=1, n=41, overwrite=True), log=quiet)
    assert summary.units_skipped == 0 and set(summary.table["n"]) == {41}


def test_worker_killed_mid_run_is_replaced_and_the_table_is_unchanged(tmp_path, ray_driver, longer_reference):
    from ray.util.state import list_actors

    def workers() -> list:
        return list_actors(address=ray_driver.dashboard, filters=[("class_name", "=", "CertifyWorker")], limit=10_000)

    before = {a.actor_id for a in workers()}
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = certify_run(tiny(tmp_path, workers=1, **LONGER), log=quiet)
        except BaseException as exc:  # surfaced by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.time() + 120
    while killed is None and time.time() < deadline and thread.is_alive():
        fresh = [a for a in workers() if a.actor_id not in before and a.state == "ALIVE" and a.pid]
        if fresh and RunDir(str(tmp_path)).has_manifest():
            time.sleep(1.0)  # let it get going on its units
            os.kill(fresh[0].pid, signal.SIGKILL)
            killed = fresh[0].pid
        time.sleep(0.1)
    thread.join(timeout=300)
    assert killed is not None, "no worker of this run was seen alive"
    assert "error" not in result, result.get("error")
    assert len([a for a in workers() if a.actor_id not in before]) >= 2  # the dead one was replaced
    pd.testing.assert_frame_equal(comparable(result["summary"].table), longer_reference)


def _job_env(ray_cluster) -> dict:
    return {**os.environ, "RAY_ADDRESS": ray_cluster.address, "PYTHONUNBUFFERED": "1"}


def test_driver_killed_mid_run_then_rerun_gives_the_same_table(tmp_path, ray_cluster, longer_reference):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "jobs" / "certify_digits.py"), "--out", str(out), "--workers", "1", *LONGER_ARGS]
    proc = subprocess.Popen(cmd, env=_job_env(ray_cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if storage.list_files(str(out / "units"), suffix=".parquet"):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = RunDir(str(out)).read_units()
    total = LONGER_UNITS
    assert 0 < len(partial) < total and not RunDir(str(out)).has_table()
    # The manifest still says running; status knows better (the lease's holder is gone).
    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(out)], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert status.returncode == 0 and "stale (driver lost?)" in status.stdout and "none (no live driver)" in status.stdout, status.stdout

    rerun = subprocess.run(cmd, env=_job_env(ray_cluster), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(partial)} of {total} units already done" in rerun.stderr
    pd.testing.assert_frame_equal(comparable(RunDir(str(out)).read_table()), longer_reference)


def test_ray_job_submit_writes_the_run_to_s3(tmp_path, ray_cluster, s3_server, reference):
    bucket = s3_server.make_bucket()
    out = f"s3://{bucket}/runs/digits"
    cmd = [
        "ray", "job", "submit", "--address", ray_cluster.dashboard, "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps({"env_vars": {k: os.environ[k] for k in os.environ if k.startswith("AWS_")},
                                          "excludes": [".git", "runs", "*.egg-info"]}),
        "--", "python", "jobs/certify_digits.py", "--out", out, "--workers", "2", *TINY_ARGS,
    ]
    job = subprocess.run(cmd, env={**os.environ, "RAY_ADDRESS": ray_cluster.dashboard}, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout.lower()
    manifest = storage.read_json(f"{out}/manifest.json")
    assert manifest["status"] == "complete" and manifest["units_done"] == TINY_UNITS
    assert "testing" not in json.dumps(manifest)  # no credential reaches the manifest
    pd.testing.assert_frame_equal(comparable(storage.read_parquet(f"{out}/certification.parquet")), reference)


def test_unreachable_s3_fails_before_any_work(tmp_path, monkeypatch, s3_server):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "certify_digits.py"), "--out", "s3://nowhere/run", *TINY_ARGS],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "error:" in result.stderr and "Traceback" not in result.stderr
