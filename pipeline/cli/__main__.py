"""``python -m pipeline.cli``: the ``densepure`` command."""

from pipeline.cli import main

main()
