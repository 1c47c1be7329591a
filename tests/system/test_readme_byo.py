"""README.md's "Bring your own model and data" runs exactly as written.

Every ```python and ```bash block of the section is run, in order, in one empty folder, as a user
would (python blocks as scripts, bash blocks with ``densepure`` on the PATH, no network), with
RAY_ADDRESS pointing at the session's Ray head as ``ray job submit`` sets it (a private local Ray
per command would cost minutes and test nothing more: other tests start one). Then the section's claim is checked: ``Smooth`` gives
the prediction and radius of image 0's row in the run of the same certification.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[2]
SECTION = "## Bring your own model and data"


def section_blocks() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    body = text[start:end if end != -1 else len(text)]
    return re.findall(r"```(python|bash)\n(.*?)```", body, flags=re.S)


def test_every_block_runs_and_smooth_matches_the_cli_row(tmp_path: Path, ray_cluster) -> None:
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "densepure").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pipeline.cli "$@"\n')
    (shim / "densepure").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    env.update(PATH=f"{shim}:{env['PATH']}", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               MPLBACKEND="Agg")
    blocks = section_blocks()
    assert [kind for kind, _ in blocks].count("bash") >= 2 and len(blocks) >= 8
    outputs = []
    for kind, code in blocks:
        cmd = [sys.executable, "-c", code] if kind == "python" else ["bash", "-euo", "pipefail", "-c", code]
        result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{kind} block failed:\n{code}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        outputs.append((kind, code, result))

    # What the blocks say they make.
    for path in ("digits.parquet", "imagenet-val/n01443537/1.JPEG", "my-classifier/preprocessor_config.json",
                 "my-denoiser/scheduler/scheduler_config.json", "my-unet.flags.json", "byo.tsv",
                 "runs/byo/certification.parquet", "runs/one/certification.parquet"):
        assert (work / path).exists(), path
    assert len(list((work / "byo-tsv").glob("*.tsv"))) == 2 * (1 + 1 + 2)  # sigmas x (cohen, dds, densepure K=1,2)
    assert not (work / "runs" / "byo-openai").exists() and not (work / "runs" / "folder").exists()  # dry runs
    certify_out = next(r.stdout for k, c, r in outputs if k == "bash" and "--dry-run" in c)
    assert "cost estimate" in certify_out and "GPU-hours" in certify_out
    report_out = next(r.stdout for k, c, r in outputs if k == "bash" and "densepure report" in c)
    assert "ACR" in report_out

    # The notebook block prints "label prediction radius"; the run's row of image 0 must agree.
    smooth_out = next(r.stdout for k, c, r in outputs if k == "python" and "Smooth(" in c)
    label, prediction, radius = smooth_out.split()[-3:]
    row = pd.read_parquet(work / "runs" / "one" / "certification.parquet").set_index("image_id").loc[0]
    assert (int(label), int(prediction), float(radius)) == (row["label"], row["prediction"], row["radius"])
