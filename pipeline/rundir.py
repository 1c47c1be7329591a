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

from pipeline import storage

MANIFEST = "manifest.json"
TABLE = "certification.parquet"
UNITS = "units"
FORMAT_VERSION = 1

UNIT_LOG_SCHEMA = pa.schema(
    [
        ("unit_id", pa.string()),
        ("image_id", pa.int64()),
        ("label", pa.int64()),
        ("sigma", pa.float64()),
        ("method", pa.string()),
        ("steps", pa.int64()),
        ("phase", pa.string()),
        ("start", pa.int64()),
        ("num_draws", pa.int64()),
        ("votes", pa.list_(pa.int64())),
        ("counts", pa.list_(pa.list_(pa.int64()))),
        ("t_star", pa.float64()),
        ("seconds", pa.float64()),
        ("unet_forwards", pa.int64()),
        ("classifier_calls", pa.int64()),
        ("worker", pa.string()),
        # The engine settings the counts depend on besides the seeds (Engine.describe()).
        ("engine", pa.string()),
        ("finished_at", pa.float64()),
    ]
)


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

    def read_manifest(self) -> dict[str, Any]:
        return storage.read_json(self.manifest_uri)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        storage.write_json(self.manifest_uri, manifest)

    def append_units(self, records: list[dict[str, Any]]) -> str:
        """Write one new immutable part of the unit log; returns its uri."""
        name = f"part-{min(r['finished_at'] for r in records):017.6f}-{uuid.uuid4().hex[:8]}.parquet"
        uri = storage.join(self.units_uri, name)
        storage.write_parquet(uri, pa.Table.from_pylist(records, schema=UNIT_LOG_SCHEMA))
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
