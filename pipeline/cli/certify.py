"""``densepure certify`` and the jobs in ``jobs/`` (the same command with a preset's defaults)."""

from __future__ import annotations

from typing import Any

import click

from pipeline.cli.errors import Command, UnexpectedErrorExit, handle_user_errors
from workers.errors import UserError, first_line
from pipeline.cli.options import certify_options, load_preset
from pipeline.estimate import DEFAULT_TFLOPS

__all__ = ["certify", "certify_main"]


def _run_certify(ray_address: str | None, show_report: bool, dry_run: bool = False,
                 assume_tflops: float = DEFAULT_TFLOPS, **options: Any) -> None:
    from pipeline.config import RunConfig

    config = RunConfig.from_dict(options)
    if dry_run:
        from pipeline.estimate import dry_run as estimate_run, format_estimate

        click.echo(format_estimate(estimate_run(config, assume_tflops)))
        click.echo("dry run: nothing was run or written; GPU-hours assume --assume-tflops "
                   f"{assume_tflops:g} (calibrate it from `densepure status` of a short run)", err=True)
        return
    from pipeline.run import certify_run

    summary = certify_run(config, log=lambda m: click.echo(m, err=True), ray_address=ray_address)
    if show_report and len(summary.table):
        from pipeline.cli.runs import sampling_notes, sequential_radii_notes
        from pipeline.formats import accuracy_report
        from pipeline.plots import plot_certified_accuracy
        from workers import storage

        if config.sampling == "sequential":
            # The radii the stopping rule decided: elsewhere a sequential table is not comparable.
            decided = {config.out: tuple(config.radii)}
            radii = list(config.radii)
        else:
            decided = {}
            radii = sorted({0.0, *[round(s * f, 3) for s in config.sigmas for f in (0.5, 1.0, 1.5, 2.0)]})
        text, notes = accuracy_report(summary.table, radii)
        click.echo(text)
        plot_made = not storage.is_s3(config.out)
        for note in notes + sampling_notes(summary.table) + sequential_radii_notes(decided, radii, plot_made):
            click.echo(f"note: {note}", err=True)
        if plot_made:
            plot = storage.join(config.out, "certified_accuracy.png")
            plot_certified_accuracy(summary.table, plot)
            click.echo(f"plot: {plot}")


@click.command("certify", cls=Command)
@certify_options
@click.option("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS, or start a local Ray).")
@click.option("--report/--no-report", "show_report", default=True, show_default=True, help="Print the certified-accuracy table at the end.")
@click.option("--dry-run", is_flag=True, help="Validate the options, load the data and the models on this CPU, print the run's "
              "units, draws, network evaluations, FLOPs and GPU-hours, and exit: nothing is run or written.")
@click.option("--assume-tflops", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TFLOPS, show_default=True,
              help="Sustained TFLOP/s per GPU behind --dry-run's GPU-hours (default: 20% of an H100 SXM's 989 dense bf16 TFLOP/s, the utilisation Carlini et al.'s A100 timing implies).")
@handle_user_errors
def certify(**options: Any) -> None:
    """Certify a dataset with Cohen smoothing, DDS and DensePure on a Ray cluster (or locally)."""
    try:
        _run_certify(**options)
    except (UserError, KeyboardInterrupt, click.ClickException):
        raise
    except Exception as exc:
        # Unexpected: one line here, the traceback in the run folder (the manifest says failed).
        where = getattr(exc, "log_uri", None)
        raise UnexpectedErrorExit(f"{type(exc).__name__}: {first_line(exc)}" + (f" (traceback: {where})" if where else "")) from exc


def certify_main(preset: str, prog_name: str) -> None:
    """Run ``certify`` with the defaults of ``configs/presets/<preset>.yaml`` (the jobs' entry point)."""
    certify.main(prog_name=prog_name, default_map=load_preset(preset, certify))
