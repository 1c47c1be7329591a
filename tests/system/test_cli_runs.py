"""``densepure export/report/status`` as a user meets them: one-line errors, exit status 2.

Through the real command line in a subprocess; the S3 cases use the moto server, then point the
commands at an endpoint that is down.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline.test_analysis import known_table, write_run

REPO = Path(__file__).resolve().parents[2]


def densepure(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=180, cwd=REPO, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    err = result.stderr.strip()
    assert "Traceback" not in err and err.count("\n") == 0 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def run(tmp_path: Path) -> str:
    return write_run(tmp_path / "run", known_table())


def test_export_to_a_missing_directory_or_s3_is_one_line(tmp_path: Path, run: str) -> None:
    missing = tmp_path / "no" / "such"
    assert_one_line_error(densepure("export", run, "--tsv", str(missing / "x.tsv")), str(missing), "does not exist")
    assert_one_line_error(densepure("export", run, "--per-group", str(missing / "dir")), str(missing), "does not exist")
    assert_one_line_error(densepure("export", run, "--tsv", "s3://bucket/x.tsv"), "s3://bucket/x.tsv", "local")
    assert_one_line_error(densepure("export", run, "--per-group", "s3://bucket/tsv"), "s3://bucket/tsv", "local")
    assert not (tmp_path / "no").exists()
    ok = densepure("export", run, "--tsv", str(tmp_path / "all.tsv"))
    assert ok.returncode == 0 and (tmp_path / "all.tsv").is_file(), ok.stderr


def test_plot_to_a_missing_directory_or_s3_is_one_line(tmp_path: Path, run: str) -> None:
    missing = tmp_path / "no" / "such"
    assert_one_line_error(densepure("report", run, "--plot", str(missing / "p.png")), str(missing), "does not exist")
    assert_one_line_error(densepure("report", run, "--plot", "s3://bucket/p.png"), "s3://bucket/p.png", "local")
    assert not (tmp_path / "no").exists()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: nothing listens there


def test_status_and_report_of_an_s3_run_whose_endpoint_is_down(tmp_path: Path, run: str, s3_server) -> None:
    bucket = s3_server.make_bucket()
    for name in ("manifest.json", "certification.parquet"):
        s3_server.client().upload_file(str(Path(run) / name), bucket, f"runs/r1/{name}")
    uri = f"s3://{bucket}/runs/r1"
    up = densepure("status", uri)
    assert up.returncode == 0 and "complete" in up.stdout, up.stderr
    assert densepure("report", uri, "--radii", "0").returncode == 0
    exported = densepure("export", uri, "--tsv", str(tmp_path / "from-s3.tsv"))
    assert exported.returncode == 0, exported.stderr

    down = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_dead_port()}"}
    for command in (["status", uri], ["report", uri, "--radii", "0"], ["export", uri, "--tsv", str(tmp_path / "x.tsv")]):
        assert_one_line_error(densepure(*command, env=down), uri, "AWS_ENDPOINT_URL", "127.0.0.1")
    assert not (tmp_path / "x.tsv").exists()
