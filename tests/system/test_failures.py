"""Units that fail the same way every time end the run with the underlying error."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from workers.errors import UserError
from pipeline.pool import UnitFailedError
from pipeline.rundir import RunDir
from pipeline.run import certify_run
from tests.fixtures.runs import quiet, tiny


class Broken(torch.nn.Module):
    """A classifier that loads fine and fails on every batch, as a real bug would."""

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 10  # so loading needs no probe forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("classifier exploded")


def test_a_unit_failing_repeatedly_fails_the_run_with_its_error(tmp_path, ray_driver):
    model = tmp_path / "broken.pt"
    torch.jit.script(Broken()).save(str(model))
    config = tiny(tmp_path / "run", classifier=f"torchscript:{model}", methods=["cohen"], workers=1, max_retries=2)
    with pytest.raises(UnitFailedError, match="classifier exploded"):
        certify_run(config, log=quiet)
    manifest = RunDir(config.out).read_manifest()
    assert manifest.status == "failed" and "classifier exploded" in manifest.error
    assert not RunDir(config.out).has_table()


def test_a_corrupt_image_fails_the_run_naming_the_image(tmp_path, ray_driver):
    def png(value: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    data = tmp_path / "images.parquet"
    pd.DataFrame({"image": [png(0), png(255), b"\x89PNG broken"], "label": [0, 1, 2]}).to_parquet(data)
    config = tiny(tmp_path / "run", data=f"parquet:{data}", methods=["cohen"], every=1, workers=1)
    # Found in preflight, before Ray starts or anything is written: not after compute was spent.
    with pytest.raises(UserError, match="image_id=2"):
        certify_run(config, log=quiet)
    assert not RunDir(config.out).has_manifest()


def test_sigterm_stops_the_run_cleanly_and_keeps_finished_units(tmp_path, ray_driver):
    """``ray job stop`` sends SIGTERM: finished units are flushed and the run is marked stopped."""
    import os
    import signal
    import threading
    import time

    from tests.fixtures.runs import LONGER

    config = tiny(tmp_path / "run", workers=1, **LONGER)
    run = RunDir(config.out)

    def stop_when_started() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not (run.has_manifest() and run.read_manifest().status == "running"):
            time.sleep(0.1)
        time.sleep(3.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        certify_run(config, log=quiet)
    assert run.read_manifest().status == "stopped"
    assert not run.has_table()
