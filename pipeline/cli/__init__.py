"""The ``densepure`` command line: certify, purify, report, status, export.

Every option of ``certify`` can also come from a YAML file (``--config run.yaml``, keys named as
the options); options given on the command line win over the file. The jobs in ``jobs/`` are this
same command with a preset's defaults (``configs/presets``).
"""

from __future__ import annotations

import click

from pipeline.cli.certify import certify, certify_main
from pipeline.cli.errors import Group
from pipeline.cli.purify import purify
from pipeline.cli.runs import export, report, status

__all__ = ["certify_main", "main"]


@click.group(cls=Group)
@click.version_option(package_name="densepure-pipeline")
def main() -> None:
    """DensePure certification: randomized smoothing with diffusion purification, on Ray."""


for _command in (certify, purify, report, status, export):
    main.add_command(_command)
