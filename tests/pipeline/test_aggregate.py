"""table_from_units: only complete (image, sigma, method) groups become rows, counted once."""

from __future__ import annotations

import pandas as pd

from pipeline.aggregate import table_from_units
from pipeline.config import RunConfig

CONFIG = RunConfig(out="/unused", methods=["cohen", "densepure"], sigmas=[0.25], votes=[1, 3], n0=10, n=100,
                   alpha=0.001, chunk=50)


def _unit(image: int, method: str, phase: str, start: int, draws: int, counts: list[list[int]], votes=(1,)) -> dict:
    return {"unit_id": f"{image}/0.25/{method}/{phase}/{start}", "image_id": image, "label": 1, "sigma": 0.25,
            "method": method, "steps": 0, "phase": phase, "start": start, "num_draws": draws, "votes": list(votes),
            "counts": counts, "t_star": 0.0, "seconds": 1.0, "unet_forwards": 0, "classifier_calls": draws,
            "votes_computed": draws, "votes_skipped": 0,
            "worker": "w", "engine": "cpu fp32 batch 8", "finished_at": 1.0}


def test_incomplete_groups_are_left_out_and_complete_ones_summed():
    units = pd.DataFrame([
        _unit(0, "cohen", "select", 0, 10, [[0, 10]]),
        _unit(0, "cohen", "estimate", 0, 50, [[0, 50]]),
        _unit(0, "cohen", "estimate", 50, 50, [[1, 49]]),
        # Image 1 lacks half of its estimation draws: no row yet.
        _unit(1, "cohen", "select", 0, 10, [[0, 10]]),
        _unit(1, "cohen", "estimate", 0, 50, [[0, 50]]),
        # Image 2 has no selection draws: no row either.
        _unit(2, "cohen", "estimate", 0, 50, [[0, 50]]),
        _unit(2, "cohen", "estimate", 50, 50, [[0, 50]]),
    ])
    table = table_from_units(units, CONFIG)
    assert table["image_id"].tolist() == [0]
    row = table.iloc[0]
    assert (row["prediction"], row["count"], row["n"]) == (1, 99, 100)
    assert row["seconds"] == 3.0 and row["classifier_calls"] == 110


def test_a_duplicated_unit_counts_once():
    unit = [_unit(0, "cohen", "select", 0, 10, [[0, 10]]), _unit(0, "cohen", "estimate", 0, 50, [[0, 50]]),
            _unit(0, "cohen", "estimate", 50, 50, [[0, 50]])]
    twice = table_from_units(pd.DataFrame(unit + unit[1:]), CONFIG)
    once = table_from_units(pd.DataFrame(unit), CONFIG)
    pd.testing.assert_frame_equal(twice, once)


def test_vote_prefixes_become_one_row_each():
    units = pd.DataFrame([
        _unit(0, "densepure", "select", 0, 10, [[0, 10], [0, 10]], votes=(1, 3)),
        _unit(0, "densepure", "estimate", 0, 50, [[5, 45], [1, 49]], votes=(1, 3)),
        _unit(0, "densepure", "estimate", 50, 50, [[5, 45], [1, 49]], votes=(1, 3)),
    ])
    table = table_from_units(units, CONFIG)
    assert table["votes"].tolist() == [1, 3] and table["count"].tolist() == [90, 98]
