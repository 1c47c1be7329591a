"""The ``densepure`` command line: certify, purify, report, status, export.

Every option of ``certify`` can also come from a YAML file (``--config run.yaml``, keys named as
the options with underscores); options given on the command line win over the file. The jobs in
``jobs/`` are this same command with other defaults (``certify_main``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import click
import yaml

from pipeline.config import PRECISIONS
from pipeline.errors import handle_user_errors
from pipeline.report import export, report, status


class _OneLineErrors:
    """Usage errors as one line (``error: ... (see 'CMD --help')``), exit status 2, like UserError."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)  # type: ignore[misc]
        try:
            result = super().main(args, prog_name, complete_var, False, **extra)  # type: ignore[misc]
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            message = " ".join(exc.format_message().split())
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if isinstance(exc, click.UsageError) and ctx else ""
            click.echo(f"error: {message}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


class Command(_OneLineErrors, click.Command):
    pass


class Group(_OneLineErrors, click.Group):
    pass


def _csv(cast: Callable[[str], Any]) -> Callable:
    """Parse ``a,b,c`` (or a YAML list) into a list of ``cast`` values."""

    def parse(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None or isinstance(value, list):
            return value
        items = [v for v in str(value).replace(" ", ",").split(",") if v]
        try:
            return [cast(v) for v in items]
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None

    return parse


def _load_yaml_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Merge a YAML file's options into the defaults before the other options are parsed."""
    if not value:
        return value
    path = Path(value)
    if not path.is_file():
        raise click.BadParameter(f"config file not found: {value}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise click.BadParameter(f"{value} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value} must hold a mapping of option names to values")
    names = {p.name for p in ctx.command.params}
    # Lists in YAML become the comma lists the options parse.
    data = {str(k).replace("-", "_"): ",".join(map(str, v)) if isinstance(v, list) else v for k, v in data.items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise click.BadParameter(f"unknown option(s) in {value}: {', '.join(unknown)}")
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


def certify_options(fn: Callable) -> Callable:
    """The options of a certification run (shared by ``densepure certify`` and the jobs)."""
    options = [
        click.option("--config", type=click.Path(dir_okay=False), callback=_load_yaml_config, is_eager=True, expose_value=False,
                     help="YAML file of options (keys as below, with underscores); command-line options win."),
        click.option("--out", required=True, help="Run folder: local path or s3://bucket/prefix."),
        click.option("--data", "dataset", default="digits", show_default=True,
                     help="digits | cifar10:PATH/test_batch | imagenet:DIR (synset folders) | parquet:FILE (local or s3://)."),
        click.option("--denoiser", default="digits", show_default=True,
                     help="openai:CKPT (with --model-flags) | diffusers:DIR | digits."),
        click.option("--model-flags", default=None, help="JSON flags of an openai: checkpoint (OpenAI script_util names)."),
        click.option("--classifier", default="digits", show_default=True, help="hf:DIR | torchscript:FILE | digits."),
        click.option("--methods", default="cohen,dds,densepure", show_default=True, callback=_csv(str), help="Comma list of cohen, dds, densepure."),
        click.option("--sigmas", default="0.25,0.5", show_default=True, callback=_csv(float), help="Comma list of smoothing noise levels."),
        click.option("--votes", default="1,4", show_default=True, callback=_csv(int),
                     help="DensePure vote counts K to report; max(K) votes are run and prefixes give the others."),
        click.option("--steps", default=2, show_default=True, type=int, help="DensePure reverse steps b."),
        click.option("--n0", default=100, show_default=True, type=int, help="Selection draws."),
        click.option("--n", default=1000, show_default=True, type=int, help="Estimation draws."),
        click.option("--alpha", default=0.001, show_default=True, type=float, help="Failure probability of each certificate."),
        click.option("--seed", default=0, show_default=True, type=int, help="Run seed (every draw's seed derives from it)."),
        click.option("--skip", default=0, show_default=True, type=int, help="Skip the first images."),
        click.option("--max", "max_images", default=None, type=int, help="Certify at most this many images."),
        click.option("--every", default=1, show_default=True, type=int, help="Take every k-th image (paper: 20 CIFAR-10, 500 ImageNet)."),
        click.option("--indices", default=None, callback=_csv(int), help="Comma list of image indices (overrides skip/max/every)."),
        click.option("--chunk", default=10_000, show_default=True, type=int, help="Draws per work unit."),
        click.option("--batch-size", default=None, type=int, help="Images per network batch (default: by device)."),
        click.option("--precision", default="auto", show_default=True, type=click.Choice(PRECISIONS),
                     help="Network precision; auto: bf16 on GPUs and on CPUs with native bf16, else fp32."),
        click.option("--compile/--no-compile", default=False, show_default=True, help="torch.compile the networks."),
        click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])),
        click.option("--workers", default=None, type=int, help="Fixed number of workers (default: one per GPU present)."),
        click.option("--max-workers", default=None, type=int, help="Ask the autoscaler for up to this many GPU workers."),
        click.option("--max-retries", default=3, show_default=True, type=int, help="Fail when one unit fails this many times the same way."),
        click.option("--overwrite", is_flag=True, default=False, help="Replace a run with a different config at --out."),
        click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on the driver."),
        click.option("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS, or start a local Ray)."),
        click.option("--report/--no-report", "show_report", default=True, show_default=True, help="Print the certified-accuracy table at the end."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _run_certify(ray_address: str | None, show_report: bool, **options: Any) -> None:
    from pipeline.config import RunConfig
    from pipeline.run import certify_run

    config = RunConfig.from_dict(options)
    summary = certify_run(config, log=lambda m: click.echo(m, err=True), ray_address=ray_address)
    if show_report and len(summary.table):
        from pipeline.analysis import certified_accuracy, format_table, plot_certified_accuracy
        from pipeline import storage

        radii = sorted({0.0, *[round(s * f, 3) for s in config.sigmas for f in (0.5, 1.0, 1.5, 2.0)]})
        click.echo(format_table(certified_accuracy(summary.table, radii), "markdown"))
        if not storage.is_s3(config.out):
            plot = storage.join(config.out, "certified_accuracy.png")
            plot_certified_accuracy(summary.table, plot)
            click.echo(f"plot: {plot}")


@click.command("certify", cls=Command)
@certify_options
@handle_user_errors
def certify(**options: Any) -> None:
    """Certify a dataset with Cohen smoothing, DDS and DensePure on a Ray cluster (or locally)."""
    _run_certify(**options)


def certify_main(defaults: dict[str, Any], prog_name: str) -> None:
    """Run ``certify`` with job-specific defaults (the entry point of the scripts in ``jobs/``)."""
    certify.main(prog_name=prog_name, default_map=defaults)


@click.command("purify", cls=Command)
@click.option("--denoiser", required=True, help="openai:CKPT (with --model-flags) | diffusers:DIR | digits.")
@click.option("--model-flags", default=None, help="JSON flags of an openai: checkpoint.")
@click.option("--sigma", required=True, type=float, help="Smoothing noise level (in [0,1] image scale).")
@click.option("--steps", default=1, show_default=True, type=int, help="Reverse steps b; 1 is the one-shot denoiser (DDS).")
@click.option("--samples", default=4, show_default=True, type=int, help="Purified samples M, each with its own noise.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--input", "input_path", required=True, help="(C,H,W) float array in [0,1], .npy.")
@click.option("--output", "output_path", required=True, help="Where to write the (M,C,H,W) purified samples, .npy.")
@click.option("--grid", "grid_path", default=None, help="Also write a PNG: the input, one noisy copy, the samples.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@handle_user_errors
def purify(**options: Any) -> None:
    """Show what purification does to one image: M samples as .npy (and a PNG grid), with numbers."""
    from pipeline.purification import run_purify

    click.echo(run_purify(**options))


@click.group(cls=Group)
@click.version_option(package_name="densepure-pipeline")
def main() -> None:
    """DensePure certification: randomized smoothing with diffusion purification, on Ray."""


main.add_command(certify)
main.add_command(purify)
main.add_command(report)
main.add_command(status)
main.add_command(export)


if __name__ == "__main__":
    main()
