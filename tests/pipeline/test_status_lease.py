"""``status`` tells a run whose driver is gone (lease stale or missing) from a running one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline.status import format_status, run_status
from tests.pipeline.test_analysis import PARTIAL_CONFIG, partial_units, write_run


def running_run(tmp_path: Path, heartbeat_age_s: float | None) -> str:
    """A hand-built running run; a lease with that heartbeat age (None: no lock.json at all)."""
    run = write_run(tmp_path / "run", None, status="running", units=partial_units(), config=PARTIAL_CONFIG,
                    units_total=6, units_done=3, images_total=2)
    if heartbeat_age_s is not None:
        now = time.time()
        (Path(run) / "lock.json").write_text(json.dumps({
            "format": "densepure-lock", "host": "gpu-7", "pid": 31337, "run_id": "abc", "token": "0" * 32,
            "started_at": now - 3600, "heartbeat_at": now - heartbeat_age_s, "stale_after_s": 120.0,
        }))
    return run


def test_live_driver_is_running_with_eta(tmp_path: Path) -> None:
    s = run_status(running_run(tmp_path, heartbeat_age_s=5))
    assert (s.status, s.manifest_status, s.lease) == ("running", "running", "held")
    assert s.eta_seconds == pytest.approx(100 / 3.0)
    text = format_status(s)
    assert text.splitlines()[0].endswith(": running")
    assert "driver:     gpu-7:31337 (run abc, heartbeat 5 s ago)" in text


@pytest.mark.parametrize("age, why", [(None, "no driver holds its lease"), (600, "its lease is stale: gpu-7:31337")])
def test_killed_driver_is_stale_without_eta(tmp_path: Path, age: float | None, why: str) -> None:
    s = run_status(running_run(tmp_path, heartbeat_age_s=age))
    assert s.status == "stale" and s.stale and s.manifest_status == "running"
    assert s.eta_seconds is None
    assert s.to_dict()["status"] == "stale"
    text = format_status(s)
    assert text.splitlines()[0].endswith(": stale (driver lost?)")
    assert why in text
    assert "ETA:        none (no live driver)" in text
    assert (s.units_done, s.units_total) == (4, 6)  # progress is still reported


def test_damaged_lease_counts_as_stale(tmp_path: Path) -> None:
    run = running_run(tmp_path, heartbeat_age_s=None)
    (Path(run) / "lock.json").write_text("garbage")
    s = run_status(run)
    assert s.status == "stale" and s.lease == "stale" and s.driver is None
    assert "its lease is damaged" in format_status(s)


def test_finished_runs_need_no_lease(tmp_path: Path) -> None:
    for status in ("complete", "failed", "stopped"):
        run = write_run(tmp_path / status, None, status=status, units=partial_units(), config=PARTIAL_CONFIG,
                        units_total=6, units_done=4, images_total=2)
        s = run_status(run)
        assert s.status == status and not s.stale
        assert "stale" not in format_status(s)
