"""pipeline.rundir: --overwrite deletes only our files, damaged unit-log parts are quarantined,
the unit log is compacted without readers ever missing or doubling a unit. Local and on moto S3."""

from __future__ import annotations

import dataclasses
import json
import typing
import warnings
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.lock import Holder, LeaseHeldError, RunLock
from pipeline.manifest import Manifest
from pipeline.rundir import DamagedPartWarning, RunDir
from workers import storage
from workers.contract import UnitRecord
from workers.errors import UserError


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.system)])
def run_uri(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/r1"


_SAMPLE: dict[Any, Any] = {int: 3, float: 1.5, str: "x", list[int]: [1], list[list[int]]: [[0, 5, 0]]}


def record(unit_id: str, finished_at: float, **values: Any) -> UnitRecord:
    """A UnitRecord with every field filled by type (so the test follows the contract's fields)."""
    hints = typing.get_type_hints(UnitRecord)
    fields = {f.name: _SAMPLE[hints[f.name]] for f in dataclasses.fields(UnitRecord)}
    fields.update(unit_id=unit_id, finished_at=finished_at, **values)
    return UnitRecord(**fields)


def ours(run: RunDir) -> RunDir:
    run.write_manifest(Manifest(run_id="r1", config={"n0": 1}))
    return run


def names(uri: str, recursive: bool = True) -> list[str]:
    base = uri.rstrip("/")
    return [e.uri[len(base) + 1:] for e in storage.list_entries(uri, recursive=recursive, include_hidden=True)]


# --------------------------------------------------------------------------
# --overwrite: clear() deletes only our files
# --------------------------------------------------------------------------


def test_clear_deletes_only_our_files(run_uri: str) -> None:
    run = ours(RunDir(run_uri))
    run.append_units([record("u1", 10.0)])
    run.append_units([record("u2", 11.0)])
    storage.write_parquet(run.table_uri, pa.table({"x": [1]}))
    for name in ("certified_accuracy.png", "driver.log", "units/quarantine/part-1.parquet.0123abcd",
                 "units/.part-9.parquet.tmp-" + "0" * 32):
        storage.write_bytes(storage.join(run_uri, name), b"ours")
    # Things we did not write: they must survive.
    foreign = ["notes.txt", "units/README.md", "units/other.parquet", "units/quarantine/keep.bin", "data/part-1.parquet"]
    for name in foreign:
        storage.write_bytes(storage.join(run_uri, name), b"theirs")
    lock = RunLock.acquire(run_uri, Holder("h", 1, "r1"), stale_after_s=60, heartbeat=False)

    deleted = run.clear()
    assert storage.join(run_uri, "manifest.json") == deleted[-1]  # last: an interrupted clear can resume
    left = [n for n in names(run_uri) if not n.startswith(".lock.json")]
    assert sorted(left) == sorted(foreign + ["lock.json"])  # the lease stays with its holder
    for name in foreign:
        assert storage.read_bytes(storage.join(run_uri, name)) == b"theirs"
    lock.release()


def test_clear_removes_empty_folders_but_keeps_the_run_folder(tmp_path) -> None:
    run = ours(RunDir(str(tmp_path / "run")))
    run.append_units([record("u1", 10.0)])
    run.clear()
    assert (tmp_path / "run").is_dir() and not (tmp_path / "run" / "units").exists()


def test_clear_refuses_a_folder_that_is_not_ours(run_uri: str) -> None:
    storage.write_bytes(storage.join(run_uri, "manifest.json"), json.dumps({"name": "someone else's"}).encode())
    storage.write_bytes(storage.join(run_uri, "units", "part-1.parquet"), b"theirs")
    with pytest.raises(UserError, match=r"was not written by densepure: --overwrite only replaces densepure runs; "
                                        r"choose another --out"):
        RunDir(run_uri).clear()
    assert sorted(names(run_uri)) == ["manifest.json", "units/part-1.parquet"]


def test_clear_keep_lock_false(run_uri: str) -> None:
    run = ours(RunDir(run_uri))
    lock = RunLock.acquire(run_uri, Holder("h", 1, "r1"), stale_after_s=60, heartbeat=False)
    with pytest.raises(LeaseHeldError, match="is held by h:1"):
        run.clear(keep_lock=False)
    assert run.has_manifest()  # refused before deleting anything
    lock.release()
    storage.write_bytes(run.lock_uri, b"{damaged")
    run.clear(keep_lock=False)
    assert not storage.exists(run.lock_uri) and not run.has_manifest()


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "42", '{"format": "densepure-run", "version": 2, "run_id": "r", '
                                     '"config": {}, "cost": [1]}', '{"format": "densepure-run", "version": 2, '
                                     '"run_id": "r", "config": {}, "units_total": "many"}'])
def test_manifest_that_is_json_but_not_a_manifest_is_one_line(tmp_path, content: str) -> None:
    run = RunDir(str(tmp_path / "run"))
    storage.write_bytes(run.manifest_uri, content.encode())
    with pytest.raises(UserError) as info:
        run.read_manifest()
    assert "\n" not in str(info.value) and "manifest.json" in str(info.value)
    if content.startswith("{"):
        assert "is damaged" in str(info.value)
    else:
        assert "is not a densepure run manifest" in str(info.value)
        with pytest.raises(UserError, match="was not written by densepure"):
            run.clear()


# --------------------------------------------------------------------------
# Damaged parts
# --------------------------------------------------------------------------


def _damage(run: RunDir) -> dict[str, str]:
    """Three good parts and three damaged ones; returns damaged uri -> what is wrong with it."""
    good = [run.append_units([record(f"g{i}", 10.0 + i)]) for i in range(3)]
    data = storage.read_bytes(good[0])
    truncated = storage.join(run.units_uri, "part-00000000020.000000-aaaaaaaa.parquet")
    storage.write_bytes(truncated, data[: len(data) // 2])
    garbage = storage.join(run.units_uri, "part-00000000021.000000-bbbbbbbb.parquet")
    storage.write_bytes(garbage, b"this is not parquet at all")
    wrong = storage.join(run.units_uri, "part-00000000022.000000-cccccccc.parquet")
    storage.write_parquet(wrong, pa.table({"unit_id": ["w1"], "something": [1]}))
    return {truncated: "not a readable Parquet file", garbage: "not a readable Parquet file", wrong: "wrong schema"}


def test_reader_skips_damaged_parts_with_a_warning(run_uri: str) -> None:
    run = ours(RunDir(run_uri))
    damaged = _damage(run)
    with pytest.warns(DamagedPartWarning) as caught:
        units = run.read_units()
    assert sorted(units["unit_id"]) == ["g0", "g1", "g2"]
    assert len(caught) == 3
    # A reader never moves anything: only the lease holder heals.
    assert all(storage.exists(uri) for uri in damaged)


def test_driver_quarantines_damaged_parts(run_uri: str) -> None:
    run = ours(RunDir(run_uri))
    damaged = _damage(run)
    with pytest.warns(DamagedPartWarning):
        log = run.read_unit_log(heal=True)
    assert sorted(log.units["unit_id"]) == ["g0", "g1", "g2"]
    assert sorted(d.uri for d in log.damaged) == sorted(damaged)
    for d in log.damaged:
        assert damaged[d.uri] in d.reason
        assert d.moved_to is not None and d.moved_to.startswith(run.quarantine_uri)
        assert not storage.exists(d.uri) and storage.exists(d.moved_to)
        assert "moved to" in d.describe() and "recomputed" in d.describe()
    # The folder stays usable: the next read is clean, and new parts append as usual.
    with warnings.catch_warnings():
        warnings.simplefilter("error", DamagedPartWarning)
        again = run.read_unit_log(heal=True)
        assert again.damaged == [] and len(again.units) == 3
        run.append_units([record("g9", 30.0)])
        assert len(run.read_units()) == 4


def test_duplicates_resolve_to_the_first_part(run_uri: str) -> None:
    run = RunDir(run_uri)
    run.append_units([record("u", 10.0, worker="first")])
    run.append_units([record("u", 20.0, worker="second")])
    units = run.read_units()
    assert units["worker"].tolist() == ["first"]


# --------------------------------------------------------------------------
# Compaction
# --------------------------------------------------------------------------


def test_compaction_merges_and_readers_see_every_unit_once(run_uri: str) -> None:
    run = RunDir(run_uri)
    for i in range(12):
        run.append_units([record(f"u{i}a", 100.0 + i), record(f"u{i}b", 100.5 + i)])
    run.append_units([record("u0a", 500.0, worker="late duplicate")])  # a second copy, later part
    before = run.read_units().sort_values("unit_id").reset_index(drop=True)
    assert len(before) == 24

    result = run.compact(max_parts=8, target_parts=4)
    assert result is not None and len(result.merged) == 10
    parts = storage.list_files(run.units_uri, suffix=".parquet")
    assert len(parts) == 4 and result.into in parts
    after = run.read_units().sort_values("unit_id").reset_index(drop=True)
    assert after.equals(before)
    assert after.loc[after["unit_id"] == "u0a", "worker"].tolist() == ["x"]  # the first copy still wins
    assert run.compact(max_parts=8, target_parts=4) is None  # nothing to do now


def test_merged_part_is_read_identically_while_the_originals_still_exist(run_uri: str, monkeypatch) -> None:
    """The instant between writing the merged part and deleting its inputs (or a crash there)."""
    run = RunDir(run_uri)
    run.append_units([record("dup", 1.0, worker="first")])
    for i in range(6):
        run.append_units([record(f"u{i}", 2.0 + i)])
    run.append_units([record("dup", 50.0, worker="second")])
    before = run.read_units().sort_values("unit_id").reset_index(drop=True)
    monkeypatch.setattr(storage, "delete_files", lambda uris: None)  # the crash
    result = run.compact(max_parts=4, target_parts=2)
    assert result is not None
    assert len(storage.list_files(run.units_uri, suffix=".parquet")) == 9  # merged + all originals
    during = run.read_units().sort_values("unit_id").reset_index(drop=True)
    assert during.equals(before)
    monkeypatch.undo()
    # The next compaction merges the leftovers away, still with the same answer.
    while run.compact(max_parts=4, target_parts=2) is not None:
        pass
    assert run.read_units().sort_values("unit_id").reset_index(drop=True).equals(before)


def test_reader_relists_when_a_part_is_compacted_away(run_uri: str, monkeypatch) -> None:
    run = RunDir(run_uri)
    for i in range(6):
        run.append_units([record(f"u{i}", 1.0 + i)])
    stale_listing = run._list_parts()
    run.compact(max_parts=3, target_parts=1)
    calls = {"n": 0}
    real = RunDir._list_parts

    def first_stale(self: RunDir):
        calls["n"] += 1
        return stale_listing if calls["n"] == 1 else real(self)

    monkeypatch.setattr(RunDir, "_list_parts", first_stale)
    assert sorted(RunDir(run_uri).read_units()["unit_id"]) == [f"u{i}" for i in range(6)]
    assert calls["n"] == 2


def test_maybe_compact_keeps_the_part_count_bounded(run_uri: str, monkeypatch) -> None:
    run = RunDir(run_uri)
    listings = {"n": 0}
    real = storage.list_entries

    def counting(*args, **kwargs):
        listings["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(storage, "list_entries", counting)
    peak = 0
    for i in range(60):
        run.append_units([record(f"u{i}", float(i))])
        run.maybe_compact(max_parts=10, target_parts=5)
        peak = max(peak, len(real(run.units_uri, suffix=".parquet")))
    assert peak <= 11
    # Cheap when nothing is to do: far fewer listings than flushes.
    assert listings["n"] < 30
    assert sorted(run.read_units()["unit_id"]) == sorted(f"u{i}" for i in range(60))


def test_compaction_quarantines_a_damaged_part_it_meets(tmp_path) -> None:
    run = RunDir(str(tmp_path / "run"))
    for i in range(6):
        run.append_units([record(f"u{i}", 1.0 + i)])
    bad = storage.join(run.units_uri, "part-00000000001.500000-dddddddd.parquet")
    storage.write_bytes(bad, b"junk")
    with pytest.warns(DamagedPartWarning):
        result = run.compact(max_parts=3, target_parts=1)
    assert result is not None and bad not in result.merged and not storage.exists(bad)
    assert len(storage.list_files(run.quarantine_uri)) == 1
    assert sorted(run.read_units()["unit_id"]) == [f"u{i}" for i in range(6)]
    pq.read_table(result.into)  # the merged part is a valid Parquet file
