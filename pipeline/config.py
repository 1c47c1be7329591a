"""The run configuration: one dataclass, its validation, and what makes two runs the same run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import UserError

METHODS = ("cohen", "dds", "densepure")
# workers.engine.PRECISION_CHOICES, kept here so that validating a config needs no torch import
# (tests/test_fast_path.py checks that the two agree).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Fields that only say where or how fast the work runs: they may change between a run and its
# resumption without changing a single number of the result.
_EXECUTION_FIELDS = frozenset({"out", "workers", "max_workers", "overwrite", "progress", "batch_size", "compile", "max_retries", "device"})


@dataclass
class RunConfig:
    """Everything that defines a certification run (all CLI/YAML options resolve into this)."""

    out: str
    dataset: str = "digits"
    denoiser: str | None = "digits"
    model_flags: str | None = None
    classifier: str = "digits"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    sigmas: list[float] = field(default_factory=lambda: [0.25, 0.5])
    votes: list[int] = field(default_factory=lambda: [1, 4])
    steps: int = 2
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    seed: int = 0
    skip: int = 0
    max_images: int | None = None
    every: int = 1
    indices: list[int] | None = None
    chunk: int = 10_000
    batch_size: int | None = None
    precision: str = "auto"
    compile: bool = False
    device: str = "auto"
    workers: int | None = None
    max_workers: int | None = None
    max_retries: int = 3
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.methods = [m.strip().lower() for m in self.methods]
        self.sigmas = [float(s) for s in self.sigmas]
        self.votes = sorted({int(v) for v in self.votes})
        if self.indices is not None:
            self.indices = [int(i) for i in self.indices]

    def validate(self) -> None:
        """Raise UserError (one line: the problem and the fix) for any invalid option."""
        from pipeline.stats import validate_protocol

        if not self.dataset:
            raise UserError("no dataset given: pass --data (digits, cifar10:PATH, imagenet:DIR or parquet:FILE)")
        if not self.classifier:
            raise UserError("no classifier given: pass --classifier (hf:DIR, torchscript:FILE or digits)")

        if not self.methods:
            raise UserError("no method selected: pass --methods with any of cohen,dds,densepure")
        for m in self.methods:
            if m not in METHODS:
                raise UserError(f"unknown method '{m}': use --methods with any of {','.join(METHODS)}")
        if not self.sigmas:
            raise UserError("no sigma given: pass --sigmas, e.g. --sigmas 0.25,0.5")
        for s in self.sigmas:
            validate_protocol(self.n0, self.n, self.alpha, s)
        if self.n0 > self.n:
            # Not undefined, but always a mistake: the certificate's strength comes from n alone.
            raise UserError(f"--n0 {self.n0} is larger than --n {self.n}: selection needs few draws, estimation many (standard: --n0 100 --n 100000)")
        if not self.votes or self.votes[0] < 1:
            raise UserError(f"votes must be >= 1, got {self.votes}: pass --votes, e.g. --votes 1,4")
        if self.steps < 1:
            raise UserError(f"steps must be >= 1, got {self.steps}: pass --steps 1 or more")
        if self.chunk < 1:
            raise UserError(f"chunk must be >= 1, got {self.chunk}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision '{self.precision}': use one of {', '.join(PRECISIONS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"unknown device '{self.device}': use auto, cpu or cuda")
        for name in ("workers", "max_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.every < 1 or self.skip < 0 or (self.max_images is not None and self.max_images < 1):
            raise UserError("image selection needs --every >= 1, --skip >= 0 and --max >= 1")
        if self.max_retries < 1:
            raise UserError(f"--max-retries must be >= 1, got {self.max_retries}")
        if any(m != "cohen" for m in self.methods) and not self.denoiser:
            raise UserError("methods dds/densepure need a denoiser: pass --denoiser (or --methods cohen)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown config option(s) {', '.join(unknown)}: see 'densepure certify --help'")
        return cls(**data)

    def result_fields(self) -> dict[str, Any]:
        """The options that determine the table; a resumed run must match them exactly."""
        return {k: v for k, v in self.to_dict().items() if k not in _EXECUTION_FIELDS}

    def fingerprint(self) -> str:
        blob = json.dumps(self.result_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def vote_counts(self, method: str) -> list[int]:
        """The k of the k-vote classifiers reported for ``method`` (prefixes of max(votes))."""
        return list(self.votes) if method == "densepure" else [1]

    def max_votes(self, method: str) -> int:
        return max(self.votes) if method == "densepure" else 1


def differing_fields(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of the result-determining options on which two configs disagree."""
    keys = sorted((set(a) | set(b)) - _EXECUTION_FIELDS)
    return [k for k in keys if a.get(k) != b.get(k)]
