"""The faults and bad inputs of the reliability audit, each through ``densepure`` in a subprocess:
exit status, one line on stderr without a traceback, and the state left behind in the run folder.

Preflight cases fail before Ray starts; the others run against the session's Ray head
(``RAY_ADDRESS``), with a fault injected into the driver by a small wrapper script where the
fault (a full disk, a bug) cannot be produced from outside.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.rundir import RunDir
from tests.fixtures.runs import LONGER, LONGER_ARGS, REPO, TINY_ARGS, comparable, quiet, tiny
from workers import storage
from workers.digits import DIGITS_UNET_FLAGS

# Run the CLI with a fault patched into this process first; argv[1] is the patch's name.
WRAPPER = '''
import errno, os, sys
fault = sys.argv.pop(1)
if fault == "disk-full":
    # Every write of a unit-log part fails the way a full disk fails it (at fsync).
    real_fsync = os.fsync
    def fsync(fd):
        if "/units/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    os.fsync = fsync
elif fault == "bug":
    import pipeline.aggregate as aggregate
    def flush(self):
        raise RuntimeError("an unanticipated bug in the aggregator")
    aggregate.Aggregator.flush = flush
from pipeline.cli import main
sys.argv[0] = "densepure"
main()
'''


def densepure(*args: str, env: dict | None = None, fault: str | None = None, wrapper: Path | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    head = [sys.executable, str(wrapper), fault] if fault else [sys.executable, "-m", "pipeline.cli"]
    return subprocess.run([*head, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def one_line_error(result: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """The error: the last line on stderr and its only ``error:`` line, no traceback (lines before
    it are the driver's progress log, e.g. "preflight ok")."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    lines = result.stderr.strip().splitlines()
    err = lines[-1] if lines else ""
    assert err.startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not any(line.lstrip().startswith('File "') for line in lines), \
        result.stderr[-3000:]
    for needle in needles:
        assert needle in err, err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def ray_env(ray_cluster) -> dict:
    return {"RAY_ADDRESS": ray_cluster.address}


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wrapper") / "densepure_with_fault.py"
    path.write_text(WRAPPER)
    return path


def _png(value: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    return buffer.getvalue()


def _parquet(path: Path, images: list[bytes]) -> str:
    pd.DataFrame({"image": images, "label": [i % 10 for i in range(len(images))]}).to_parquet(path)
    return f"parquet:{path}"


# --------------------------------------------------------------------------
# Refused in preflight: nothing written
# --------------------------------------------------------------------------


def test_overwrite_leaves_a_folder_that_is_not_a_run_of_ours_alone(tmp_path: Path) -> None:
    out = tmp_path / "someone-elses"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "my experiment", "version": 3}))
    (out / "notes.txt").write_text("months of work\n")
    before = snapshot(out)
    one_line_error(densepure("certify", "--out", str(out), "--overwrite", *TINY_ARGS), str(out), "was not written by densepure", "choose another --out")
    assert snapshot(out) == before


@pytest.mark.parametrize("content", ["[1, 2, 3]", "{not json"])
def test_a_manifest_that_is_not_an_object_is_one_line_for_certify_and_status(tmp_path: Path, content: str) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text(content)
    one_line_error(densepure("certify", "--out", str(out), *TINY_ARGS), "manifest.json")
    one_line_error(densepure("status", str(out)), "manifest.json")
    assert (out / "manifest.json").read_text() == content and sorted(os.listdir(out)) == ["manifest.json"]


def test_images_of_another_size_are_found_before_any_work(tmp_path: Path) -> None:
    images = [_png() for _ in range(12)]
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 40).save(buffer, format="PNG")
    images[9] = buffer.getvalue()
    out = tmp_path / "run"
    one_line_error(densepure("certify", "--out", str(out), "--data", _parquet(tmp_path / "d.parquet", images),
                             "--methods", "cohen", "--n0", "8", "--n", "20", "--no-progress"),
                   "image_id 9", "1x16x16", "image_id 0 is 1x8x8")
    assert not out.exists()


def test_a_corrupt_image_other_than_the_first_is_found_before_any_work(tmp_path: Path) -> None:
    images = [_png() for _ in range(12)]
    images[7] = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    out = tmp_path / "run"
    one_line_error(densepure("certify", "--out", str(out), "--data", _parquet(tmp_path / "d.parquet", images),
                             "--methods", "cohen", "--n0", "8", "--n", "20", "--no-progress"),
                   "image_id 7", "cannot decode image")
    assert not out.exists()


@pytest.mark.parametrize("flags_content", [None, "{not json", '["a list"]'])
def test_a_cohen_only_run_still_checks_the_denoiser_files(tmp_path: Path, flags_content: str | None) -> None:
    from safetensors.torch import save_file

    from workers.unet import build_openai_unet

    checkpoint = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in build_openai_unet(DIGITS_UNET_FLAGS).state_dict().items()}, str(checkpoint))
    flags = tmp_path / "flags.json"
    if flags_content is not None:
        flags.write_text(flags_content)
    out = tmp_path / "run"
    one_line_error(densepure("certify", "--out", str(out), "--methods", "cohen", "--denoiser", f"openai:{checkpoint}",
                             "--model-flags", str(flags), "--n0", "8", "--n", "20", "--no-progress"), str(flags))
    assert not out.exists()


def test_pickled_weights_are_refused_without_advice_to_unpickle(tmp_path: Path) -> None:
    checkpoint = tmp_path / "unet.pt"
    state = {k: v for k, v in __import__("workers.unet", fromlist=["x"]).build_openai_unet(DIGITS_UNET_FLAGS).state_dict().items()}
    state["extra"] = Path("an object, not a tensor")
    torch.save(state, checkpoint)
    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps(DIGITS_UNET_FLAGS))
    out = tmp_path / "run"
    err = one_line_error(densepure("certify", "--out", str(out), "--denoiser", f"openai:{checkpoint}",
                                   "--model-flags", str(flags), *TINY_ARGS), str(checkpoint), "re-save")
    assert "weights_only" not in err and "if you trust" not in err
    assert not out.exists()


def test_out_naming_a_file_and_bad_selection_values_are_named(tmp_path: Path) -> None:
    afile = tmp_path / "results.txt"
    afile.write_text("keep me\n")
    one_line_error(densepure("certify", "--out", str(afile), *TINY_ARGS), str(afile), "is a file")
    assert afile.read_text() == "keep me\n"
    one_line_error(densepure("certify", "--out", str(tmp_path / "r"), *TINY_ARGS, "--every", "0"), "--every", "got 0")
    one_line_error(densepure("certify", "--out", str(tmp_path / "r"), *TINY_ARGS, "--sigmas", "0"), "--sigmas")
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------
# Faults during a run: one line, the run marked failed (never left "running"), resumable
# --------------------------------------------------------------------------


def test_a_full_disk_fails_in_one_line_then_the_rerun_completes_and_heals_a_damaged_part(tmp_path, ray_env, wrapper, reference) -> None:
    out = tmp_path / "run"
    err = one_line_error(densepure("certify", "--out", str(out), "--workers", "1", *TINY_ARGS, env=ray_env,
                                   fault="disk-full", wrapper=wrapper), "No space left on device", "run the same command again")
    manifest = RunDir(str(out)).read_manifest()
    assert manifest.status == "failed" and "No space left on device" in manifest.error, manifest
    assert not RunDir(str(out)).has_table() and not (out / "lock.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "a temp file was left behind"
    status = densepure("status", str(out))
    assert status.returncode == 0 and "failed" in status.stdout and "running" not in status.stdout, status.stdout + err

    rerun = densepure("certify", "--out", str(out), "--workers", "1", *TINY_ARGS, env=ray_env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    pd.testing.assert_frame_equal(comparable(RunDir(str(out)).read_table()), reference)

    # Later a unit-log part is damaged (a truncated copy, a bad sector): the next run sets it
    # aside, names it, recomputes its units and gives the same table.
    damaged = sorted((out / "units").glob("*.parquet"))[0]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    again = densepure("certify", "--out", str(out), "--workers", "1", *TINY_ARGS, env=ray_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert damaged.name in again.stderr and "quarantine" in again.stderr, again.stderr[-3000:]
    assert any(p.name.startswith(damaged.name) for p in (out / "units" / "quarantine").iterdir())
    pd.testing.assert_frame_equal(comparable(RunDir(str(out)).read_table()), reference)


def test_an_unexpected_error_is_one_line_with_status_1_and_a_traceback_file(tmp_path, ray_env, wrapper) -> None:
    out = tmp_path / "run"
    err = one_line_error(densepure("certify", "--out", str(out), "--workers", "1", *TINY_ARGS, env=ray_env,
                                   fault="bug", wrapper=wrapper), "RuntimeError: an unanticipated bug", code=1)
    log = out / "driver.log"
    assert f"(traceback: {log})" in err
    assert "Traceback" in log.read_text() and "an unanticipated bug" in log.read_text()
    manifest = RunDir(str(out)).read_manifest()
    assert manifest.status == "failed" and "an unanticipated bug" in manifest.error and str(log) in manifest.error


def test_no_gpu_on_the_cluster_fails_fast_naming_the_fix(tmp_path) -> None:
    """No RAY_ADDRESS: the CLI starts its own local Ray, which has this machine's 0 GPUs."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "certify", "--out", str(out), "--device", "cuda",
                             "--gpu-wait", "3", *TINY_ARGS], capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    one_line_error(result, "no GPU worker could be placed in 3 s", "0 GPUs", "--device cpu")
    assert time.monotonic() - start < 120
    manifest = RunDir(str(out)).read_manifest()
    assert manifest.status == "failed" and "no GPU worker" in manifest.error
    assert not (out / "lock.json").exists()


def test_a_gpu_node_without_a_visible_cuda_device_is_one_line(tmp_path, ray_env) -> None:
    """The test cluster advertises 2 (logical) GPUs that CUDA cannot see: a broken GPU node."""
    out = tmp_path / "run"
    one_line_error(densepure("certify", "--out", str(out), "--device", "cuda", "--workers", "1", *TINY_ARGS, env=ray_env),
                   "--device cuda, but no CUDA device is visible", "--device cpu")
    assert RunDir(str(out)).read_manifest().status == "failed"


def test_two_drivers_started_together_never_mix_their_tables(tmp_path, ray_cluster, ray_driver, longer_reference) -> None:
    """Two configs (seeds 0 and 1, the second with --overwrite) on one folder at the same moment:
    one driver holds the lease, the other is refused naming it, and the table is exactly the
    winner's uninterrupted run."""
    from pipeline.run import certify_run

    out = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "PYTHONUNBUFFERED": "1"}
    commands = {
        0: [sys.executable, "-m", "pipeline.cli", "certify", "--out", str(out), "--workers", "1", *LONGER_ARGS],
        1: [sys.executable, "-m", "pipeline.cli", "certify", "--out", str(out), "--workers", "1", *LONGER_ARGS,
            "--seed", "1", "--overwrite"],
    }
    procs = {seed: subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed, cmd in commands.items()}
    results = {seed: (p.wait(timeout=300), p.stderr.read()) for seed, p in procs.items()}
    for p in procs.values():
        p.stdout.close()
        p.stderr.close()
    winners = [seed for seed, (code, _) in results.items() if code == 0]
    losers = [seed for seed, (code, _) in results.items() if code != 0]
    assert len(winners) >= 1, results
    for seed in losers:
        code, stderr = results[seed]
        last = stderr.strip().splitlines()[-1]
        assert code == 2 and last.startswith("error: ") and "is held by" in last and "Traceback" not in stderr, stderr[-3000:]

    manifest = RunDir(str(out)).read_manifest()
    assert manifest.status == "complete"
    table = comparable(RunDir(str(out)).read_table())
    if manifest.config["seed"] == 0:
        expected = longer_reference
    else:
        expected = comparable(certify_run(tiny(tmp_path / "seed1", workers=1, seed=1, **LONGER), log=quiet).table)
    pd.testing.assert_frame_equal(table, expected)
    units = RunDir(str(out)).read_units()
    assert len(units) == len(units["unit_id"].unique())  # every unit logged once, by one driver
