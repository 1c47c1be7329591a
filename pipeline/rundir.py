"""The layout of a run folder (local path or s3:// prefix) and its reads and writes.

    RUN/manifest.json            config, model sha256s, package version, status, cost
    RUN/lock.json                the lease of the driver writing the folder (``pipeline.lock``)
    RUN/units/part-*.parquet     log of finished units (immutable files: one per flush, or merged)
    RUN/units/quarantine/        unreadable parts moved aside (their units are recomputed)
    RUN/certification.parquet    the certification table, written once, when every unit is done
    RUN/certified_accuracy.png   the plot the certify command draws at the end

Every write is atomic (temp file + rename locally, one PUT on S3), so a crash leaves either the
old state or the new one. The table exists only for a complete run; a reader of an incomplete run
rebuilds the partial table from the unit log and says so.

The unit log is read part by part in parallel. Reading dedups by ``unit_id`` (the first part in
name order wins), which is what makes compaction safe for readers at every instant: a merged part
is written (atomically) before the parts it replaces are deleted, it holds exactly the rows those
parts resolve to, and its name sorts just before the first of them, so a unit never appears
missing and never resolves to another row while both copies exist.
"""

from __future__ import annotations

import re
import threading
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.lock import LOCK, LeaseHeldError, lease_state
from pipeline.manifest import Manifest, is_ours
from workers import storage
from workers.contract import UnitRecord
from workers.errors import NotFoundError, UserError, first_line

MANIFEST = "manifest.json"
TABLE = "certification.parquet"
UNITS = "units"
QUARANTINE = "quarantine"
PLOT = "certified_accuracy.png"
LOG_FILES = ("driver.log",)
"""Log files a driver may write into the run folder (``clear`` deletes these names only)."""
UNIT_LOG_SCHEMA = UnitRecord.arrow_schema()

MAX_PARTS = 256
"""``maybe_compact`` merges parts once there are more than this many..."""
TARGET_PARTS = 128
"""...down to this many, so a run folder holds O(hundreds) of parts whatever its length."""
READ_THREADS = 16
"""Parts read at once (S3 GETs are latency-bound, so threads help well beyond the core count)."""

# The unit log is units/part-*.parquet (we write part-<first finished_at>-<8 hex>.parquet, and
# compaction appends -m<8 hex> to the stem of the first part it replaces).
_PART_NAME = re.compile(r"^part-[^/]+\.parquet$")
# Temp files of our interrupted atomic writes: .<name>.tmp-<32 hex>
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-[0-9a-f]{32}$")


class DamagedPartWarning(UserWarning):
    """A unit-log part could not be read; its units are not counted (and are recomputed on resume)."""


@dataclass(frozen=True)
class DamagedPart:
    """A part that could not be read: where it was, why, and where it went (None: left in place)."""

    uri: str
    reason: str
    moved_to: str | None = None

    def describe(self) -> str:
        where = f"moved to {self.moved_to}" if self.moved_to else "skipped"
        return f"unit-log part {self.uri} is unreadable ({self.reason}); {where}, its units will be recomputed"


@dataclass(frozen=True)
class UnitLog:
    """The unit log as read: one row per unit, and the parts that could not be read."""

    units: pd.DataFrame
    damaged: list[DamagedPart]
    parts: int


@dataclass(frozen=True)
class Compaction:
    """What one compaction did."""

    merged: list[str]
    into: str
    rows: int


@dataclass
class _PartCount:
    """Parts known to exist (from the last listing, plus our own appends since): lets
    ``maybe_compact`` skip the listing when compaction cannot be due."""

    known: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _is_part_name(name: str) -> bool:
    return bool(_PART_NAME.match(name))


def _parse_part(data: bytes) -> pa.Table:
    """A part's bytes -> a table with exactly the unit-log schema; ValueError saying what is wrong."""
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as exc:  # noqa: BLE001 -- the bytes are in memory: any failure is their content
        raise ValueError(f"not a readable Parquet file: {first_line(exc)}") from None
    missing = [name for name in UNIT_LOG_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"wrong schema: missing column(s) {', '.join(missing[:5])}")
    try:
        return table.select(UNIT_LOG_SCHEMA.names).cast(UNIT_LOG_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise ValueError(f"wrong schema: {first_line(exc)}") from None


def _dedup_first(table: pa.Table) -> pa.Table:
    """Rows whose unit_id appears for the first time (order kept)."""
    if table.num_rows == 0:
        return table
    keep = ~pd.Series(table.column("unit_id").to_pylist()).duplicated(keep="first").to_numpy()
    return table if keep.all() else table.filter(pa.array(keep))


@dataclass(frozen=True)
class RunDir:
    """Paths and I/O of one run folder."""

    uri: str
    _parts: _PartCount = field(default_factory=_PartCount, compare=False, repr=False)

    @property
    def manifest_uri(self) -> str:
        return storage.join(self.uri, MANIFEST)

    @property
    def table_uri(self) -> str:
        return storage.join(self.uri, TABLE)

    @property
    def units_uri(self) -> str:
        return storage.join(self.uri, UNITS)

    @property
    def quarantine_uri(self) -> str:
        return storage.join(self.units_uri, QUARANTINE)

    @property
    def lock_uri(self) -> str:
        return storage.join(self.uri, LOCK)

    def has_manifest(self) -> bool:
        return storage.exists(self.manifest_uri)

    def read_manifest(self) -> Manifest:
        return Manifest.from_dict(self.read_manifest_data(), self.manifest_uri)

    def read_manifest_data(self) -> Any:
        """The parsed manifest.json as it is, ours or not (see ``pipeline.manifest.is_ours``)."""
        return storage.read_json(self.manifest_uri)

    def require_ours(self) -> None:
        """Refuse (one-line UserError) a folder whose manifest.json this project did not write;
        run before anything (the lease included) is written into it."""
        if not is_ours(self.read_manifest_data()):
            raise UserError(
                f"{self.manifest_uri} was not written by densepure: --overwrite only replaces densepure runs; "
                "choose another --out"
            )

    def write_manifest(self, manifest: Manifest) -> None:
        storage.write_json(self.manifest_uri, manifest.to_dict())

    # -- the unit log -----------------------------------------------------------------------

    def append_units(self, records: list[UnitRecord]) -> str:
        """Write one new immutable part of the unit log; returns its uri."""
        name = f"part-{min(r.finished_at for r in records):017.6f}-{uuid.uuid4().hex[:8]}.parquet"
        uri = storage.join(self.units_uri, name)
        storage.write_parquet(uri, pa.Table.from_pylist([r.to_dict() for r in records], schema=UNIT_LOG_SCHEMA))
        with self._parts.lock:
            if self._parts.known is not None:
                self._parts.known += 1
        return uri

    def _list_parts(self) -> list[storage.FileEntry]:
        """Our parts, in name order (the order that decides which copy of a unit wins)."""
        entries = [e for e in storage.list_entries(self.units_uri, suffix=".parquet") if _is_part_name(e.name)]
        with self._parts.lock:
            self._parts.known = len(entries)
        return entries

    def _read_parts(self, parts: list[storage.FileEntry]) -> list[pa.Table | DamagedPart]:
        """Each part's table, or a DamagedPart for one whose bytes are not a unit-log part.

        Downloading and parsing are kept apart: a network or permission failure raises (after the
        storage layer's retries) and is never mistaken for damage. NotFoundError propagates too:
        the part was compacted away after the listing.
        """

        def read(entry: storage.FileEntry) -> pa.Table | DamagedPart:
            data = storage.read_bytes(entry.uri)
            try:
                return _parse_part(data)
            except ValueError as exc:
                return DamagedPart(entry.uri, str(exc))

        if len(parts) <= 1:
            return [read(p) for p in parts]
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(parts)), thread_name_prefix="unit-log") as pool:
            return list(pool.map(read, parts))

    def read_unit_log(self, heal: bool = False) -> UnitLog:
        """The unit log, one row per unit (first part in name order wins), read in parallel.

        A part that cannot be read (truncated, not Parquet, wrong schema) is left out with a
        :class:`DamagedPartWarning` and listed in ``damaged``. With ``heal=True`` (only the driver
        holding the run's lease may) it is also moved to ``units/quarantine/`` so that later reads
        are clean; its units, no longer logged, are then recomputed by the driver.
        """
        for _ in range(5):
            parts = self._list_parts()
            try:
                results = self._read_parts(parts)
            except NotFoundError:
                continue  # compacted between listing and reading: the merged part is there now
            break
        else:
            raise UserError(f"the unit log under {self.units_uri} kept changing while being read; try again")

        tables = [r for r in results if isinstance(r, pa.Table)]
        damaged = [r for r in results if isinstance(r, DamagedPart)]
        if heal:
            damaged = [self._quarantine(d) for d in damaged]
        for d in damaged:
            warnings.warn(d.describe(), DamagedPartWarning, stacklevel=2)
        table = _dedup_first(pa.concat_tables(tables)) if tables else UNIT_LOG_SCHEMA.empty_table()
        return UnitLog(units=table.to_pandas(), damaged=damaged, parts=len(parts))

    def read_units(self) -> pd.DataFrame:
        """The unit log, one row per unit (duplicates, if any, dropped: the first write wins);
        unreadable parts are skipped with a warning (see :meth:`read_unit_log`)."""
        return self.read_unit_log().units

    def _quarantine(self, part: DamagedPart) -> DamagedPart:
        name = part.uri.rstrip("/").rsplit("/", 1)[-1]
        # A unique suffix: a later part that is damaged the same way must not overwrite this one.
        target = storage.join(self.quarantine_uri, f"{name}.{uuid.uuid4().hex[:8]}")
        storage.move(part.uri, target)
        with self._parts.lock:
            if self._parts.known is not None:
                self._parts.known -= 1
        return DamagedPart(part.uri, part.reason, moved_to=target)

    def compact(self, max_parts: int = MAX_PARTS, target_parts: int = TARGET_PARTS) -> Compaction | None:
        """If there are more than ``max_parts`` parts, merge a run of consecutive ones into one so
        that ``target_parts`` remain; None when there was nothing to do.

        Only the driver holding the run's lease may call this. The run merged is the consecutive
        window (in name order) with the fewest bytes, so fresh small parts are merged first and
        big merged parts rarely rewritten (write amplification stays logarithmic). Readers stay
        correct at every instant (see the module docstring); a crash between the write and the
        deletes leaves duplicates with identical rows, merged away by the next compaction.
        Damaged parts met on the way are quarantined.
        """
        if target_parts < 1 or max_parts < target_parts:
            raise ValueError(f"need 1 <= target_parts <= max_parts (got {target_parts}, {max_parts})")
        parts = self._list_parts()
        if len(parts) <= max_parts:
            return None
        width = len(parts) - target_parts + 1
        sizes = [p.size for p in parts]
        window = sum(sizes[:width])
        best, best_start = window, 0
        for start in range(1, len(parts) - width + 1):
            window += sizes[start + width - 1] - sizes[start - 1]
            if window < best:
                best, best_start = window, start
        chosen = parts[best_start:best_start + width]
        try:
            results = self._read_parts(chosen)
        except NotFoundError as exc:
            raise UserError(f"a unit-log part vanished during compaction of {self.units_uri} ({exc}); "
                            "is another driver writing this run?") from exc
        tables: list[pa.Table] = []
        merged: list[str] = []
        for entry, result in zip(chosen, results):
            if isinstance(result, DamagedPart):
                moved = self._quarantine(result)
                warnings.warn(moved.describe(), DamagedPartWarning, stacklevel=2)
            else:
                tables.append(result)
                merged.append(entry.uri)
        if len(merged) < 2:
            return None
        table = _dedup_first(pa.concat_tables(tables))
        first = merged[0].rsplit("/", 1)[-1]
        # '-' sorts before '.', so "<first stem>-m<hex>.parquet" sorts right before the first part
        # it replaces and after every part before it: the dedup order is unchanged.
        name = f"{first[: -len('.parquet')]}-m{uuid.uuid4().hex[:8]}.parquet"
        into = storage.join(self.units_uri, name)
        storage.write_parquet(into, table)
        storage.delete_files(merged)
        with self._parts.lock:
            self._parts.known = len(parts) - len(chosen) + 1
        return Compaction(merged=merged, into=into, rows=table.num_rows)

    def maybe_compact(self, max_parts: int = MAX_PARTS, target_parts: int = TARGET_PARTS) -> Compaction | None:
        """:meth:`compact` when it may be due; call it after each flush of the unit log.

        Cheap when nothing is to do: the part count is tracked from this object's own listings
        and appends, so most calls make no request at all.
        """
        with self._parts.lock:
            known = self._parts.known
        if known is not None and known <= max_parts:
            return None
        return self.compact(max_parts, target_parts)

    # -- the table --------------------------------------------------------------------------

    def write_table(self, table: pd.DataFrame) -> None:
        storage.write_parquet(self.table_uri, table)

    def read_table(self) -> pd.DataFrame:
        return storage.read_parquet(self.table_uri)

    def has_table(self) -> bool:
        return storage.exists(self.table_uri)

    # -- --overwrite ------------------------------------------------------------------------

    def clear(self, keep_lock: bool = True) -> list[str]:
        """Delete this run's own files, and nothing else; returns what was deleted.

        Refuses (UserError) unless ``manifest.json`` is a densepure manifest. Deletes only the
        names this project writes -- the unit-log parts and the quarantine under ``units/``,
        ``certification.parquet``, the plot, the driver logs, temp files of interrupted writes
        of those, and ``manifest.json`` last (so an interrupted clear still carries the manifest
        that allows finishing it); a foreign file anywhere survives, and so does the folder.
        The lease stays (``keep_lock``: the caller is the driver holding it, and releases it
        itself); with ``keep_lock=False`` a stale or damaged ``lock.json`` goes too, and a live
        driver's lease is refused with LeaseHeldError.
        """
        self.require_ours()
        top = {MANIFEST, TABLE, PLOT, *LOG_FILES}
        doomed: list[str] = []
        for entry in storage.list_entries(self.uri, recursive=True, include_hidden=True):
            rel = entry.uri[len(self.uri.rstrip("/")):].lstrip("/")
            parts = rel.split("/")
            name = parts[-1]
            temp = _TEMP_NAME.match(name)
            base = temp.group("name") if temp else name
            if len(parts) == 1:
                # manifest.json itself goes last, below; its temp files go with the rest.
                ours = (base in top and base != MANIFEST) or (temp is not None and base == MANIFEST)
            elif len(parts) == 2 and parts[0] == UNITS:
                ours = _is_part_name(base)
            elif len(parts) == 3 and parts[:2] == [UNITS, QUARANTINE]:
                # Quarantined parts keep our part name plus a suffix of 8 hex digits.
                ours = temp is None and _is_part_name(re.sub(r"\.[0-9a-f]{8}$", "", name))
            else:
                ours = False
            if ours:
                doomed.append(entry.uri)
        if not keep_lock:
            state, info = lease_state(self.uri)
            if state == "held":
                raise LeaseHeldError(f"{self.uri} is held by {info.describe() if info else 'a live driver'}; "
                                     "wait for it to finish, or pass --force-unlock once it is gone")
            if state == "stale":
                doomed.append(self.lock_uri)
        storage.delete_files(doomed)
        storage.delete_files([self.manifest_uri])
        doomed.append(self.manifest_uri)
        if not storage.is_s3(self.uri):
            _remove_empty_dirs([self.quarantine_uri, self.units_uri])
        with self._parts.lock:
            self._parts.known = None
        return doomed


def _remove_empty_dirs(paths: list[str]) -> None:
    """Remove these local folders if (and only if) they are empty, deepest first."""
    import os

    for path in paths:
        try:
            os.rmdir(path)
        except OSError:
            pass  # not empty (a foreign file) or already gone
