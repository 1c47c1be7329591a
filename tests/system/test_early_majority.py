"""Early majority through the pipeline: the table equals the one with every vote computed, bit for bit."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.run import certify_run
from tests.fixtures.runs import quiet, tiny

COSTS = ["seconds", "unet_forwards", "classifier_calls", "votes_computed", "votes_skipped"]


@pytest.mark.parametrize("votes", [[1, 4], [1, 5, 10, 20, 40]])
def test_early_majority_table_equals_all_votes(tmp_path, ray_driver, votes):
    common = dict(methods=["densepure"], votes=votes, max_images=3, every=13, n0=10, n=30, chunk=40, workers=1, batch_size=32)
    early = certify_run(tiny(tmp_path / "early", **common), log=quiet).table
    full = certify_run(tiny(tmp_path / "full", early_majority=False, **common), log=quiet).table
    pd.testing.assert_frame_equal(early.drop(columns=COSTS), full.drop(columns=COSTS))
    assert (full["votes_skipped"] == 0).all() and (early["votes_skipped"] > 0).any()
    assert (early["unet_forwards"] < full["unet_forwards"]).any()
