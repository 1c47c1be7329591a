"""The run configuration: one dataclass, the one place where every option and its default live.

The ``densepure certify`` options, the YAML keys of ``--config``, the jobs' presets
(``configs/presets/*.yaml``) and the manifest's ``config`` all use these field names; the CLI
builds its options from the fields' metadata (``pipeline/cli/options.py``), so a default is changed
here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.lock import DEFAULT_STALE_AFTER_S
from pipeline.sequential import FIRST_LOOK, FUTILITY, GROWTH
from workers.contract import DEVICES, METHODS, PRECISIONS, needs_denoiser, vote_counts
from workers.seeds import MAX_VOTES, sigma_key, sigma_label
from workers.errors import UserError

__all__ = ["SAMPLINGS", "RunConfig", "differing_fields", "option_fields"]

SAMPLINGS = ("fixed", "sequential")


def _option(default: Any, help: str, *, flags: tuple[str, ...] = (), choices: tuple[str, ...] | None = None,
            switch: str | None = None, execution: bool = False, metavar: str | None = None) -> Any:
    """A RunConfig field with what the CLI needs to offer it as an option.

    ``flags``: the option's spellings (default ``--field-name``); ``switch``: the negative form of
    a boolean on/off option (``--no-progress``); ``execution``: the field only says where or how
    fast the work runs, so it may change between a run and its resumption without changing a
    single number of the result.
    """
    metadata = {"help": help, "flags": flags, "choices": choices, "switch": switch, "execution": execution, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Everything that defines a certification run (all CLI/YAML options resolve into this)."""

    out: str = field(metadata={"help": "Run folder: local path or s3://bucket/prefix.", "flags": (), "choices": None,
                               "switch": None, "execution": True, "metavar": None})
    data: str = _option("digits", "digits | cifar10:PATH/test_batch | imagenet:DIR (synset folders) | parquet:FILE (local or s3://).")
    denoiser: str | None = _option("digits", "openai:CKPT (with --model-flags) | diffusers:DIR or ORG/NAME[@REV] | digits.")
    model_flags: str | None = _option(None, "JSON flags of an openai: checkpoint (OpenAI script_util names).")
    classifier: str = _option("digits", "hf:DIR or ORG/NAME[@REV] | torchscript:FILE | digits.")
    methods: list[str] = _option(list(METHODS), "Comma list of cohen, dds, densepure.")
    sigmas: list[float] = _option([0.25, 0.5], "Comma list of smoothing noise levels.")
    votes: list[int] = _option([1, 4], "DensePure vote counts K to report; max(K) votes are run and prefixes give the others.")
    steps: int = _option(2, "DensePure reverse steps b.")
    n0: int = _option(100, "Selection draws.")
    n: int = _option(1000, "Estimation draws.")
    alpha: float = _option(0.001, "Failure probability of each certificate (each row of the table).")
    sampling: str = _option("fixed", "fixed: every row gets all --n estimation draws (the paper protocol); sequential: "
                            "draws in rounds and stops once every --radii is decided (same per-row guarantee, "
                            "--n is the budget).", choices=SAMPLINGS)
    radii: list[float] | None = _option(None, "Radii sequential sampling must decide (sorted), e.g. 0.25,0.5,0.75.")
    first_look: int = _option(FIRST_LOOK, "Sequential sampling: estimation draws at the first look (below --n).")
    look_growth: float = _option(GROWTH, "Sequential sampling: growth factor between looks.")
    futility: float = _option(FUTILITY, "Sequential sampling: level beta of the upper bound that gives a radius up when a "
                              "row is behind the pace the budget needs (power only; the certificates keep alpha).")
    seed: int = _option(0, "Run seed (every draw's seed derives from it).")
    skip: int = _option(0, "Skip the first images.")
    max_images: int | None = _option(None, "Certify at most this many images.", flags=("--max-images", "--max"))
    every: int = _option(1, "Take every k-th image (paper: 20 CIFAR-10, 500 ImageNet).")
    indices: list[int] | None = _option(None, "Comma list of image indices (overrides skip/max/every).")
    chunk: int = _option(10_000, "Draws per work unit.")
    batch_size: int | None = _option(None, "Images per network batch (default: by device).", execution=True)
    precision: str = _option("auto", "Network precision; auto: bf16 on GPUs and on CPUs with native bf16, else fp32.", choices=PRECISIONS)
    compile: bool = _option(False, "torch.compile the networks.", switch="--no-compile", execution=True)
    device: str = _option("auto", "Where the networks run; auto: a GPU when the cluster has one.", choices=DEVICES, execution=True)
    workers: int | None = _option(None, "Fixed number of workers (default: one per GPU present).", execution=True)
    max_workers: int | None = _option(None, "Ask the autoscaler for up to this many GPU workers.", execution=True)
    max_retries: int = _option(3, "Fail when one unit fails this many times the same way.", execution=True)
    early_majority: bool = _option(True, "Stop computing a draw's DensePure votes once every reported K is decided "
                                   "(exact: the same counts).", switch="--no-early-majority", execution=True)
    gpu_wait: float = _option(300.0, "Seconds to wait for a GPU worker before failing (30 at most without "
                              "--max-workers, when only an autoscaler could bring one).", execution=True)
    lease_timeout: float = _option(DEFAULT_STALE_AFTER_S, "Seconds without a heartbeat after which the driver holding "
                                   "--out counts as gone, so another may take the run over.", execution=True)
    force_unlock: bool = _option(False, "Take over --out even from a driver whose lease is still fresh (only once "
                                 "it is really gone).", execution=True)
    overwrite: bool = _option(False, "Replace a run with a different config at --out (deletes only densepure's "
                              "own files there).", execution=True)
    progress: bool = _option(True, "Progress bar on the driver.", switch="--no-progress", execution=True)

    def __post_init__(self) -> None:
        self.methods = [m.strip().lower() for m in self.methods]
        self.sigmas = [float(s) for s in self.sigmas]
        self.votes = sorted({int(v) for v in self.votes})
        if self.radii is not None:
            self.radii = [float(r) for r in self.radii]
        if self.indices is not None:
            self.indices = [int(i) for i in self.indices]

    def validate(self) -> None:
        """Raise UserError (one line: the problem and the fix) for any invalid option."""
        from pipeline.stats import validate_protocol

        if not self.data:
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
        keys = [sigma_key(s) for s in self.sigmas]
        if len(set(keys)) != len(keys):
            # Seeds and unit ids know a sigma by its value rounded to 6 decimals: two sigmas
            # that round alike would share every random stream and every unit.
            twins = sorted({sigma_label(s) for s, k in zip(self.sigmas, keys) if keys.count(k) > 1})
            raise UserError(f"--sigmas lists {', '.join(twins)} more than once (sigmas are compared at 6 decimals); give each sigma once")
        if self.n0 > self.n:
            # Not undefined, but always a mistake: the certificate's strength comes from n alone.
            raise UserError(f"--n0 {self.n0} is larger than --n {self.n}: selection needs few draws, estimation many (standard: --n0 100 --n 100000)")
        if not self.votes or self.votes[0] < 1 or self.votes[-1] > MAX_VOTES:
            raise UserError(f"--votes must lie in 1..{MAX_VOTES}, got {self.votes}: pass e.g. --votes 1,4")
        if self.steps < 1:
            raise UserError(f"--steps must be >= 1, got {self.steps}: pass --steps 1 or more")
        if self.chunk < 1:
            raise UserError(f"--chunk must be >= 1, got {self.chunk}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision '{self.precision}': use one of {', '.join(PRECISIONS)}")
        if self.device not in DEVICES:
            raise UserError(f"unknown device '{self.device}': use one of {', '.join(DEVICES)}")
        for name in ("workers", "max_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.every < 1:
            raise UserError(f"--every must be >= 1, got {self.every}: 1 takes every image (paper: 20 CIFAR-10, 500 ImageNet)")
        if self.skip < 0:
            raise UserError(f"--skip must be >= 0, got {self.skip}: the number of leading images to leave out")
        if self.max_images is not None and self.max_images < 1:
            raise UserError(f"--max must be >= 1, got {self.max_images}: omit it to take every selected image")
        if self.max_retries < 1:
            raise UserError(f"--max-retries must be >= 1, got {self.max_retries}")
        if not self.lease_timeout > 0:
            raise UserError(f"--lease-timeout must be > 0 seconds, got {self.lease_timeout}")
        if not self.gpu_wait > 0:
            raise UserError(f"--gpu-wait must be > 0 seconds, got {self.gpu_wait}")
        if self.needs_denoiser and not self.denoiser:
            raise UserError("methods dds/densepure need a denoiser: pass --denoiser (or --methods cohen)")
        self._validate_sampling()

    def _validate_sampling(self) -> None:
        from pipeline.sequential import look_schedule, validate_radii

        if self.sampling not in SAMPLINGS:
            raise UserError(f"unknown --sampling '{self.sampling}': use fixed or sequential")
        if self.sampling == "fixed":
            if self.radii is not None:
                raise UserError("--radii only applies to --sampling sequential (report radii are chosen with densepure report --radii)")
            return
        if self.first_look < 1:
            raise UserError(f"--first-look must be >= 1, got {self.first_look}")
        if not (0.0 < self.futility < 1.0):
            raise UserError(f"--futility must lie strictly between 0 and 1, got {self.futility}; the default is {FUTILITY}")
        try:
            look_schedule(self.n, self.first_look, self.look_growth)
        except ValueError as exc:
            raise UserError(f"--look-growth {self.look_growth}: {exc}") from None
        self.radii = list(validate_radii(self.radii, self.sigmas, self.n, self.alpha, self.first_look, self.look_growth))
        if self.first_look >= self.n:
            # One look at the budget: fixed sampling at the cost of a sequential folder. Surely a slip.
            raise UserError(
                f"--first-look {self.first_look} is not below --n {self.n}, so sequential sampling would look only "
                f"at the budget (fixed sampling): lower --first-look (default {FIRST_LOOK}) or use --sampling fixed"
            )

    def validate_sampler(self, flags: dict | None) -> None:
        """Refuse sigma/steps combinations the denoiser's schedule cannot sample, from its flags alone
        (before any model is loaded): DDS and DensePure need t* inside the schedule, DensePure b steps
        of strictly decreasing timesteps from t*."""
        from workers.schedule import check_sampler, schedule_from_flags

        if flags is None or not self.needs_denoiser:
            return
        try:
            schedule = schedule_from_flags(flags)
        except ValueError as exc:
            raise UserError(f"model flags: {exc}") from None
        for method in self.methods:
            if method == "cohen":
                continue
            if method == "densepure" and self.steps > schedule.T:
                raise UserError(f"--steps {self.steps} exceeds the schedule's {schedule.T} timesteps; use --steps <= {schedule.T}")
            for sigma in self.sigmas:
                try:
                    check_sampler(schedule, sigma, self.steps, method)
                except ValueError as exc:
                    raise UserError(str(exc)) from None

    @property
    def needs_denoiser(self) -> bool:
        """Whether any selected method purifies (and so a denoiser must be loaded)."""
        return any(needs_denoiser(m) for m in self.methods)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown config option(s) {', '.join(unknown)}; known options: {', '.join(sorted(known))}")
        return cls(**data)

    def result_fields(self) -> dict[str, Any]:
        """The options that determine the table; a resumed run must match them exactly."""
        return {k: v for k, v in self.to_dict().items() if k not in _execution_fields()}

    def fingerprint(self) -> str:
        blob = json.dumps(self.result_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def vote_counts(self, method: str) -> list[int]:
        """The k of the k-vote classifiers reported for ``method`` (prefixes of max(votes))."""
        return vote_counts(method, self.votes)

    def max_votes(self, method: str) -> int:
        return max(self.vote_counts(method))


def option_fields() -> list[dataclasses.Field]:
    """The RunConfig fields, in declaration order (the order of ``densepure certify --help``)."""
    return list(dataclasses.fields(RunConfig))


def _execution_fields() -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("execution"))


_SEQUENTIAL_FIELDS = frozenset({"radii", "first_look", "look_growth", "futility"})
"""Options that only sequential sampling reads: two fixed-sampling runs never differ by them."""


def differing_fields(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of the result-determining options on which two configs disagree.

    A key missing from one side counts as different (a folder written before the option existed
    was made under another rule), except sequential-only options between two fixed-sampling runs.
    """
    ignored = _execution_fields()
    if a.get("sampling", "fixed") == "fixed" and b.get("sampling", "fixed") == "fixed":
        ignored |= _SEQUENTIAL_FIELDS
    keys = sorted((set(a) | set(b)) - ignored)
    return [k for k in keys if a.get(k) != b.get(k)]
