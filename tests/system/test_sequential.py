"""Sequential sampling through the real pipeline: deterministic rounds, resumable, fewer draws."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from pipeline.run import certify_run
from pipeline.rundir import RunDir
from pipeline.sequential import STOPPING_RULE
from tests.fixtures.runs import REPO, SEQUENTIAL, SEQUENTIAL_ARGS, comparable, quiet, tiny
from workers import storage
from workers.errors import UserError


@pytest.fixture(scope="module")
def sequential_reference(tmp_path_factory, ray_cluster):
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.address)
    summary = certify_run(tiny(tmp_path_factory.mktemp("seq-ref"), workers=1, **SEQUENTIAL), log=quiet)
    return comparable(summary.table), str(summary.out)


def test_sequential_rows_stop_early_and_say_what_they_used(sequential_reference):
    table, _ = sequential_reference
    assert set(table["sampling"]) == {"sequential"} and (table["n"] == 3000).all()
    assert (table["n_used"] <= 3000).all() and (table["n_used"] < 3000).any()
    # A row certified at 0.5 lists both requested radii; its radius is at least 0.5.
    both = table[table["radii_certified"] == "0.25,0.5"]
    assert len(both) and (both["radius"] >= 0.5).all() and not both["abstain"].any()
    # The bound is the sequential one (alpha spread over the looks): never above the fixed bound.
    from pipeline.stats import lower_confidence_bound

    for r in table.itertuples():
        assert r.p_lower <= lower_confidence_bound(r.count, r.n_used, r.alpha) + 1e-12


def test_two_workers_give_the_same_sequential_table(tmp_path, ray_driver, sequential_reference):
    table, _ = sequential_reference
    summary = certify_run(tiny(tmp_path, workers=2, **SEQUENTIAL), log=quiet)
    pd.testing.assert_frame_equal(comparable(summary.table), table)


def test_a_run_made_with_one_sampling_mode_is_refused_for_the_other(ray_driver, sequential_reference):
    _, out = sequential_reference
    fixed = {**SEQUENTIAL, "sampling": "fixed", "radii": None}
    with pytest.raises(UserError, match="differs in: .*sampling"):
        certify_run(tiny(out, workers=1, **fixed), log=quiet)


def test_a_sequential_run_stopped_under_an_earlier_rule_is_refused(tmp_path, ray_driver, sequential_reference):
    _, out = sequential_reference
    assert RunDir(out).read_manifest().stopping_rule == STOPPING_RULE
    older = tmp_path / "older"
    shutil.copytree(out, older)
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["stopping_rule"]  # as written before the rule was recorded
    (older / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"differs in: stopping rule\)"):
        certify_run(tiny(older, workers=1, **SEQUENTIAL), log=quiet)


def test_driver_killed_mid_sequential_run_then_rerun_gives_the_same_table(tmp_path, ray_cluster, sequential_reference):
    table, _ = sequential_reference
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "jobs" / "certify_digits.py"), "--out", str(out), "--workers", "1", *SEQUENTIAL_ARGS]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if storage.list_files(str(out / "units"), suffix=".parquet"):
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not RunDir(str(out)).has_table()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "units already done" in rerun.stderr
    pd.testing.assert_frame_equal(comparable(RunDir(str(out)).read_table()), table)


def test_report_of_a_sequential_run_shows_its_radii_and_says_when_others_are_not_comparable(sequential_reference):
    from click.testing import CliRunner

    from pipeline.cli import main

    _, out = sequential_reference
    from pipeline.analysis import load_runs

    assert load_runs([out]).attrs["decided_radii"] == {out: (0.25, 0.5)}
    plain = CliRunner().invoke(main, ["report", out])
    assert plain.exit_code == 0, plain.output
    header = next(line for line in plain.stdout.splitlines() if line.startswith("| method"))
    assert header.endswith("| r=0.25 | r=0.5 |")  # the radii the run decided, not the generic grid
    assert "decided" not in plain.stderr
    wider = CliRunner().invoke(main, ["report", out, "--radii", "0", "0.25", "0.5", "0.75"])
    assert wider.exit_code == 0, wider.output
    assert "r=0.75" in wider.stdout
    note = next(line for line in wider.stderr.splitlines() if "decided" in line)
    assert "decided r = 0.25, 0.5 only" in note and "r = 0, 0.75 in the table" in note and "plot" not in note
