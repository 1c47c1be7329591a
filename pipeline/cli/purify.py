"""``densepure purify``: what purification does to one image."""

from __future__ import annotations

from typing import Any

import click

from pipeline.cli.errors import Command, handle_user_errors
from workers.contract import DEVICES

__all__ = ["purify"]


@click.command("purify", cls=Command)
@click.option("--denoiser", required=True, help="openai:CKPT (with --model-flags) | diffusers:DIR | digits.")
@click.option("--model-flags", default=None, help="JSON flags of an openai: checkpoint.")
@click.option("--sigma", required=True, type=float, help="Smoothing noise level (in [0,1] image scale).")
@click.option("--steps", default=1, show_default=True, type=int, help="Reverse steps b; 1 is the one-shot denoiser (DDS).")
@click.option("--samples", default=4, show_default=True, type=int, help="Purified samples M, each with its own noise.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--input", "input_path", required=True, help="The image: a .npy (C,H,W) float array in [0,1], or a PNG/JPEG file (grey stays 1 channel).")
@click.option("--output", "output_path", required=True, help="Where to write the (M,C,H,W) purified samples, .npy.")
@click.option("--grid", "grid_path", default=None, help="Also write a picture of the input, one noisy copy and the samples: .png or .jpg (format from the suffix).")
@click.option("--classifier", default=None, help="Label each image of the grid (and the summary) with this classifier: hf:DIR | hf:ORG/NAME | torchscript:FILE | digits.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICES))
@handle_user_errors
def purify(**options: Any) -> None:
    """Show what purification does to one image: M samples as .npy (and a PNG grid), with numbers."""
    from pipeline.purification import run_purify

    click.echo(run_purify(**options))
