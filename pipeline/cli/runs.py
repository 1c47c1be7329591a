"""CLI commands over finished (or running) runs: ``report``, ``status`` and ``export``.

The CLI group lives in :mod:`pipeline.cli`, which registers these commands. Each
command raises :class:`workers.errors.UserError` for problems the user can fix;
:func:`handle_user_errors` turns those into one line ``error: ...`` and exit code 2.
Tables go to stdout and notes (partial runs, written files) to stderr, so
``densepure report RUN --format csv > table.csv`` yields a clean file.
"""

from __future__ import annotations

import json
import warnings
from typing import Mapping, Sequence

import click

from pipeline.analysis import PartialRunWarning, check_local_output, export_per_group, export_tsv, load_runs
from pipeline.cli.errors import handle_user_errors
from pipeline.formats import accuracy_report
from pipeline.metrics import DEFAULT_BY, check_confidence, check_radii, sampling_savings
from pipeline.plots import plot_certified_accuracy
from pipeline.status import format_status, run_status
from workers.errors import UserError

__all__ = ["export", "parse_radii", "report", "sequential_radii_notes", "status"]

DEFAULT_RADII = "0 0.25 0.5 0.75 1.0"

# --------------------------------------------------------------------------- --radii parsing


def _split_radii(text: str) -> list[str]:
    return [t for t in text.replace(",", " ").split() if t]


def _is_radius_token(token: str) -> bool:
    """True if the token is one or more numbers (comma or space separated)."""
    parts = _split_radii(token)
    if not parts:
        return False
    try:
        for p in parts:
            float(p)
    except ValueError:
        return False
    return True


def parse_radii(text: str) -> tuple[float, ...]:
    """Radii from ``"0 0.25 0.5"`` or ``"0,0.25,0.5"``; UserError on anything else."""
    parts = _split_radii(text)
    if not parts:
        raise UserError("--radii needs at least one number, e.g. --radii 0 0.25 0.5")
    try:
        radii = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"--radii takes numbers (got {text!r}), e.g. --radii 0 0.25 0.5") from None
    return tuple(check_radii(radii))


def _gather_radii(args: list[str]) -> list[str]:
    """Rewrite ``--radii 0 0.25 0.5`` (several tokens) into ``--radii "0 0.25 0.5"`` (one value).

    Numeric tokens right after ``--radii`` belong to it; the first non-numeric token
    (a run folder or another option) ends the list. A run folder whose name is a
    number must therefore be written as a path, e.g. ``./0.5``. Nothing after
    ``--`` is touched.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            out.extend(args[i:])
            break
        if token == "--radii" or token.startswith("--radii="):
            values = [token.split("=", 1)[1]] if "=" in token else []
            i += 1
            while i < len(args) and _is_radius_token(args[i]):
                values.append(args[i])
                i += 1
            if not values:
                raise click.UsageError("--radii needs at least one number, e.g. --radii 0 0.25 0.5")
            out += ["--radii", " ".join(values)]
            continue
        out.append(token)
        i += 1
    return out


class RadiiCommand(click.Command):
    """A click command whose ``--radii`` option takes any number of values (``RUN... --radii R...``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _gather_radii(list(args)))


def _notes_from_warnings(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        if issubclass(w.category, PartialRunWarning):
            click.echo(f"note: {w.message}", err=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def sampling_notes(df) -> list[str]:
    """What sequential sampling saved, for the notes after a report."""
    savings = sampling_savings(df)
    if savings is None:
        return []
    kind = "CPU" if "engine" in df.columns and df["engine"].astype(str).str.startswith("cpu").all() else "GPU"
    return [savings.describe(kind)]


def _radii_text(radii: Sequence[float]) -> str:
    return ", ".join(f"{r:g}" for r in radii)


def sequential_radii_notes(decided: Mapping[str, Sequence[float]], radii: Sequence[float], plot: bool = False,
                           name_runs: bool = False) -> list[str]:
    """Notes for a table (and plot) of sequential runs at radii their stopping rule did not decide.

    Why: a sequential row stops once its requested radii are settled, so its bound at the stop is
    only as tight as those needed. Its certificate at any radius is still valid, but certified
    accuracy at another radius can lie below what fixed sampling (all n draws) would report, and
    comparisons with fixed runs hold at the requested radii only.
    """
    notes = []
    for run, wanted in decided.items():
        other = [r for r in radii if not any(abs(r - w) <= 1e-9 for w in wanted)]
        if not other and not plot:
            continue
        where = f"{run}: " if name_runs else ""
        shown = [f"r = {_radii_text(other)} in the table"] if other else []
        if plot:
            shown.append(f"the plot away from r = {_radii_text(wanted)}")
        notes.append(
            f"{where}sequential sampling decided r = {_radii_text(wanted)} only: rows stopped once those were settled, "
            f"so certified accuracy elsewhere ({' and '.join(shown)}) is valid but can lie below fixed sampling's; "
            f"compare runs at r = {_radii_text(wanted)}"
        )
    return notes


# --------------------------------------------------------------------------- commands


@click.command("report", cls=RadiiCommand)
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@click.option(
    "--radii",
    default=DEFAULT_RADII,
    show_default=True,
    metavar="R...",
    help="Radii (columns of the table): several numbers, e.g. --radii 0 0.25 0.5 or --radii 0,0.25,0.5. "
         "Sequential runs of one --radii default to those radii.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["markdown", "latex", "csv"]),
    default="markdown",
    show_default=True,
    help="Table format printed on stdout.",
)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Also save certified-accuracy curves as this PNG.")
@click.option(
    "--confidence",
    type=float,
    default=None,
    help="Print Clopper-Pearson lower bounds on certified accuracy at this confidence (e.g. 0.999) instead of point estimates.",
)
@click.option("--acr", is_flag=True, help="Add the average certified radius (radius if certified correct, else 0; mean over images).")
@click.option("--best-sigma/--no-best-sigma", default=True, show_default=True,
              help="Add best-over-sigma rows (union-bounded: certificates at alpha/m for m sigmas).")
@click.option("--best-votes", is_flag=True, help="Add best-over-K rows for DensePure (union-bounded over the K values).")
@click.option("--naive-best", is_flag=True, help="Best rows as the plain maximum (Cohen's and Carlini's tables), without the union bound.")
@handle_user_errors
def report(runs: tuple[str, ...], radii: str, fmt: str, plot_path: str | None, confidence: float | None, acr: bool,
           best_sigma: bool, best_votes: bool, naive_best: bool) -> None:
    """Certified-accuracy table (rows method/sigma/K/steps, columns radii) of one or more runs.

    Unfinished runs are reported on their finished images, with a note. With
    several runs, each row also names its run.
    """
    radii_values = parse_radii(radii)
    check_confidence(confidence)
    if plot_path:
        check_local_output(plot_path, "plot")  # before any run is read: a bad path costs nothing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PartialRunWarning)
        df = load_runs(list(runs))
    _notes_from_warnings(caught)
    if df.empty:
        raise UserError("no finished certificates yet; check progress with `densepure status RUN`")
    decided = df.attrs["decided_radii"]
    if click.get_current_context().get_parameter_source("radii") == click.core.ParameterSource.DEFAULT \
            and len(decided) == len(runs) and len(set(decided.values())) == 1:
        # Sequential runs of the same --radii: the columns they decided, not the generic grid.
        radii_values = next(iter(decided.values()))
    # Several runs are separate experiments (e.g. two datasets): never pool them.
    by = (("run",) if len(runs) > 1 else ()) + DEFAULT_BY
    text, notes = accuracy_report(df, radii_values, fmt, by=by, confidence=confidence, acr=acr,
                                  best_sigma=best_sigma, best_votes=best_votes, union_bound=not naive_best)
    click.echo(text, nl=False)
    for note in notes + sampling_notes(df) + sequential_radii_notes(decided, radii_values, bool(plot_path), len(runs) > 1):
        click.echo(f"note: {note}", err=True)
    if confidence is not None:
        click.echo(
            f"note: values are {confidence:g}-confidence Clopper-Pearson lower bounds on certified accuracy "
            "over the image distribution, not point estimates",
            err=True,
        )
    if plot_path:
        plot_certified_accuracy(df, plot_path, by=by)
        click.echo(f"plot: {plot_path}", err=True)


@click.command("status")
@click.argument("run")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@handle_user_errors
def status(run: str, as_json: bool) -> None:
    """Progress, cost, throughput and ETA of a run, with certified accuracy at r=0 so far."""
    info = run_status(run)
    if as_json:
        click.echo(json.dumps(info.to_dict(), indent=2, default=str))
    else:
        click.echo(format_status(info))


@click.command("export")
@click.argument("run")
@click.option("--tsv", "out", default=None, type=click.Path(dir_okay=False),
              help="Write one TSV: every group with its sigma/method/votes/steps columns, or, with --sigma/--method/"
                   "--votes/--steps, the one group they pick in Cohen et al.'s certify.py format.")
@click.option("--per-group", "per_group", default=None, type=click.Path(file_okay=False),
              help="Write one certify.py-format TSV per group into this directory, named by the group's keys.")
@click.option("--sigma", type=float, default=None, help="Noise level of the group(s) to export.")
@click.option("--method", type=str, default=None, help="cohen, dds or densepure.")
@click.option("--votes", type=int, default=None, help="Number of votes K.")
@click.option("--steps", type=int, default=None, help="Reverse steps b.")
@click.option("--cohen-rounding", is_flag=True,
              help="Round radii as certify.py does ({:.3}) for byte-identical files; default: full precision.")
@handle_user_errors
def export(
    run: str, out: str | None, per_group: str | None, sigma: float | None, method: str | None, votes: int | None,
    steps: int | None, cohen_rounding: bool,
) -> None:
    """Write RUN's certificates as TSV (idx, label, predict, radius, correct, time), as Cohen et al.'s certify.py does."""
    if (out is None) == (per_group is None):
        raise click.UsageError("give exactly one of --tsv FILE and --per-group DIR")
    keys = {"sigma": sigma, "method": method, "votes": votes, "steps": steps}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PartialRunWarning)
        if out is not None:
            count = export_tsv(run, out, cohen_rounding=cohen_rounding, **keys)
            written = [(out, count)]
        else:
            written = export_per_group(run, per_group, cohen_rounding=cohen_rounding, **keys)
    _notes_from_warnings(caught)
    for path, count in written:
        click.echo(f"wrote {count} rows to {path}", err=True)
