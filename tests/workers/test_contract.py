"""The driver/actor contract: seeds computed from numbers alone, and the unit log schema."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from workers.contract import UnitRecord, WorkUnit, copies, table_steps, unet_forwards_per_draw, vote_counts
from workers.seeds import draw_seeds


def test_a_sub_range_of_draw_seeds_is_the_slice_of_the_full_range():
    full = draw_seeds(7, 3, 0.25, "estimate", 0, 1000)
    for start, count in [(0, 1), (10, 90), (999, 1), (500, 500)]:
        np.testing.assert_array_equal(draw_seeds(7, 3, 0.25, "estimate", start, count), full[start:start + count])
    assert len(set(full.tolist())) == 1000 and full.dtype == np.uint64


def test_seeds_differ_by_phase_image_sigma_and_run_seed():
    base = draw_seeds(0, 0, 0.25, "estimate", 0, 100)
    for other in [draw_seeds(0, 0, 0.25, "select", 0, 100), draw_seeds(0, 1, 0.25, "estimate", 0, 100),
                  draw_seeds(0, 0, 0.5, "estimate", 0, 100), draw_seeds(1, 0, 0.25, "estimate", 0, 100)]:
        assert not set(base.tolist()) & set(other.tolist())


def test_a_unit_carries_its_own_seeds():
    unit = WorkUnit(4, 2, 0.5, "dds", 1, (1,), "estimate", 20, 10, 9)
    np.testing.assert_array_equal(unit.draw_seeds(), draw_seeds(9, 4, 0.5, "estimate", 20, 10))
    assert unit.unit_id == "4/0.5/dds/estimate/20"
    assert WorkUnit(4, 2, 0.1234567, "dds", 1, (1,), "estimate", 0, 1, 9).unit_id == "4/0.123457/dds/estimate/0"


def test_the_unit_log_schema_is_derived_from_the_record_fields():
    schema = UnitRecord.arrow_schema()
    assert schema.names == [f.name for f in dataclasses.fields(UnitRecord)]
    assert schema.field("counts").type == pa.list_(pa.list_(pa.int64()))
    record = UnitRecord("u", 0, 1, 0.25, "cohen", 0, "select", 0, 3, [1], [[1, 2]], 0.0, 0.1, 0, 3, 3, 0, "w", "cpu", 1.0)
    table = pa.Table.from_pylist([record.to_dict()], schema=schema)
    assert table.num_rows == 1 and table.column("counts").to_pylist() == [[[1, 2]]]


def test_method_rules():
    assert [table_steps(m, 10) for m in ("cohen", "dds", "densepure")] == [0, 1, 10]
    assert [copies(m, 40) for m in ("cohen", "dds", "densepure")] == [1, 1, 40]
    assert vote_counts("densepure", [5, 1, 5]) == [1, 5] and vote_counts("dds", [1, 5]) == [1]
    assert unet_forwards_per_draw("densepure", 10, 40) == 1 + 40 * 9
    assert unet_forwards_per_draw("dds", 10, 40) == 1 and unet_forwards_per_draw("cohen", 10, 40) == 0
