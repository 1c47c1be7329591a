"""Shared start-up of the job scripts: make the project importable under ``ray job submit``.

``ray job submit --working-dir .`` runs ``python jobs/<job>.py`` with the uploaded folder as the
working directory, but Python puts ``jobs/`` (not the folder) first on ``sys.path``; the project
root is added so that ``pipeline`` and ``workers`` import whether or not the package is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

