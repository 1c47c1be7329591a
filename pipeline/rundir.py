"""The layout of a run folder (local path or s3:// prefix) and its reads and writes.

    RUN/manifest.json            config, model sha256s, package version, status, cost
    RUN/units/part-*.parquet     append-only log of finished units (one immutable file per flush)
    RUN/certification.parquet    the certification table, written once, when every unit is done

Every write is atomic (temp file + rename locally, one PUT on S3), so a crash leaves either the
old state or the new one. The table exists only for a complete run; a reader of an incomplete run
rebuilds the partial table from the unit log and says so.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from pipeline.manifest import Manifest
from workers import storage
from workers.contract import UnitRecord

MANIFEST = "manifest.json"
TABLE = "certification.parquet"
UNITS = "units"
UNIT_LOG_SCHEMA = UnitRecord.arrow_schema()


@dataclass(frozen=True)
class RunDir:
    """Paths and I/O of one run folder."""

    uri: str

    @property
    def manifest_uri(self) -> str:
        return storage.join(self.uri, MANIFEST)

    @property
    def table_uri(self) -> str:
        return storage.join(self.uri, TABLE)

    @property
    def units_uri(self) -> str:
        return storage.join(self.uri, UNITS)

    def has_manifest(self) -> bool:
        return storage.exists(self.manifest_uri)

    def read_manifest(self) -> Manifest:
        return Manifest.from_dict(self.read_manifest_data(), self.manifest_uri)

    def read_manifest_data(self) -> Any:
        """The parsed manifest.json as it is, ours or not (see ``pipeline.manifest.is_ours``)."""
        return storage.read_json(self.manifest_uri)

    def write_manifest(self, manifest: Manifest) -> None:
        storage.write_json(self.manifest_uri, manifest.to_dict())

    def append_units(self, records: list[UnitRecord]) -> str:
        """Write one new immutable part of the unit log; returns its uri."""
        name = f"part-{min(r.finished_at for r in records):017.6f}-{uuid.uuid4().hex[:8]}.parquet"
        uri = storage.join(self.units_uri, name)
        storage.write_parquet(uri, pa.Table.from_pylist([r.to_dict() for r in records], schema=UNIT_LOG_SCHEMA))
        return uri

    def read_units(self) -> pd.DataFrame:
        """The unit log, one row per unit (duplicates, if any, dropped: the first write wins)."""
        parts = storage.list_files(self.units_uri, suffix=".parquet")
        if not parts:
            return UNIT_LOG_SCHEMA.empty_table().to_pandas()
        frames = [storage.read_parquet(p) for p in parts]
        units = pd.concat(frames, ignore_index=True)
        return units.drop_duplicates("unit_id", keep="first").reset_index(drop=True)

    def write_table(self, table: pd.DataFrame) -> None:
        storage.write_parquet(self.table_uri, table)

    def read_table(self) -> pd.DataFrame:
        return storage.read_parquet(self.table_uri)

    def has_table(self) -> bool:
        return storage.exists(self.table_uri)

    def clear(self) -> None:
        storage.delete_tree(self.uri)
