"""The run manifest (``RUN/manifest.json``): what a run is, where it stands, and what it cost.

One typed record instead of a dict literal and ``.get()`` fallbacks: the driver writes it at every
state change, ``status``/``report``/``load_run`` read it, and ``--overwrite`` deletes a folder only
when its manifest is one of ours (:data:`FORMAT` marker and a known version).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from workers.errors import UserError

__all__ = ["FORMAT", "STATUSES", "VERSION", "Cost", "Manifest"]

FORMAT = "densepure-run"
"""The marker that makes a manifest ours."""
VERSION = 2
"""The run folder format. Bumped whenever the same configuration would give other draws (seeds,
sampler) or the folder layout changes: a run of another version is refused, never mixed with new
draws. Version 2: full 64-bit seeds with one stream per (draw, vote), the reference-identical
sampler (respacing, continuous cosine chain), fixed-shape batches, sequential sampling columns."""
STATUSES = ("running", "complete", "failed", "stopped")


@dataclass
class Cost:
    """Totals over the unit log: worker busy seconds, network evaluations, draws."""

    gpu_seconds: float = 0.0
    unet_forwards: int = 0
    classifier_calls: int = 0
    draws: int = 0
    votes_computed: int = 0
    """DensePure vote trajectories run (one per draw for Cohen and DDS)."""
    votes_skipped: int = 0
    """Votes early majority left out: they could not change any reported decision."""


@dataclass
class Manifest:
    """Everything a run folder says about itself besides its results."""

    run_id: str
    config: dict[str, Any]
    fingerprint: str = ""
    status: str = "running"
    models: dict[str, Any] = field(default_factory=dict)
    package_version: str = "0+unknown"
    created_at: str = ""
    updated_at: str = ""
    units_total: int = 0
    units_done: int = 0
    images_total: int = 0
    groups_total: int = 0
    """(image, sigma, method) groups of the run."""
    groups_done: int = 0
    attempts: int = 1
    cost: Cost = field(default_factory=Cost)
    error: str | None = None
    stopping_rule: str = ""
    """``pipeline.sequential.STOPPING_RULE`` of a sequential run ("" for fixed sampling, and for
    sequential folders written before the rule was recorded)."""
    format: str = FORMAT
    version: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest.json") -> "Manifest":
        """Parse a manifest; UserError (one line) when it is not a manifest of this version.

        A folder whose ``manifest.json`` lacks our format marker is not a run of this project;
        one with the marker and another version was written by an incompatible version.
        """
        if not is_ours(data):
            raise UserError(f"{where} is not a densepure run manifest; point at a run folder written by densepure")
        version = _version(data)
        if version != VERSION:
            raise UserError(
                f"{where} was written by another version of densepure (run format {version}, this version reads "
                f"{VERSION}): its draws cannot be mixed with new ones; use another --out, or --overwrite to replace it"
            )
        damaged = f"{where} is damaged ({{}}); use another --out, or --overwrite to replace it"
        cost = data.get("cost") or {}
        if not isinstance(cost, dict):
            raise UserError(damaged.format(f"cost is a {type(cost).__name__}, not an object"))
        values = _typed_values(cls, data, damaged)
        values["cost"] = Cost(**_typed_values(Cost, cost, damaged, "cost."))
        try:
            manifest = cls(**values)
        except TypeError as exc:
            raise UserError(damaged.format(exc)) from None
        if not isinstance(manifest.config, dict) or manifest.status not in STATUSES:
            raise UserError(damaged.format("config or status unreadable"))
        return manifest


_JSON_TYPES: dict[Any, tuple[type, ...]] = {
    int: (int,), float: (int, float), str: (str,), dict: (dict,),
}


def _typed_values(cls: type, data: dict[str, Any], damaged: str, prefix: str = "") -> dict[str, Any]:
    """The known fields of ``data`` for dataclass ``cls``, each checked against its declared type
    (so that a damaged manifest fails here, with one line, not later in arithmetic)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data or f.name in ("cost", "format", "version"):
            continue  # cost is parsed on its own; format and version were checked by is_ours
        value, hint = data[f.name], hints[f.name]
        optional = type(None) in typing.get_args(hint)
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
        base = typing.get_origin(base) or base
        allowed = _JSON_TYPES.get(base)
        if value is None and optional:
            out[f.name] = None
            continue
        if allowed is not None and (isinstance(value, bool) or not isinstance(value, allowed)):
            raise UserError(damaged.format(f"{prefix}{f.name} is {json_type(value)}, expected {base.__name__}"))
        out[f.name] = value
    return out


def json_type(value: Any) -> str:
    """How a JSON value is described in messages: 'a list', 'null', 'the string "x"'..."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return f'the string "{value[:40]}"'
    name = {"dict": "object", "list": "list", "int": "integer", "float": "number", "bool": "boolean"}.get(
        type(value).__name__, type(value).__name__)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def is_ours(data: Any) -> bool:
    """Whether ``data`` (a parsed manifest.json) was written by this project, whatever its version."""
    if not isinstance(data, dict):
        return False
    if data.get("format") == FORMAT:
        return isinstance(data.get("version"), int)
    # Format 1 folders (before the marker) stored the version as ``format`` beside run_id and config.
    return data.get("format") == 1 and "run_id" in data and "config" in data


def _version(data: dict[str, Any]) -> int:
    return int(data["version"]) if data.get("format") == FORMAT else int(data["format"])
