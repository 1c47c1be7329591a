"""The layout's promises: imports between the packages go one way, and the actor side stays lean."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_workers_never_import_the_driver_package():
    offenders = [
        f"{path.relative_to(REPO)} imports {name}"
        for path in sorted((REPO / "workers").rglob("*.py"))
        for name in _imports(path)
        if name == "pipeline" or name.startswith("pipeline.")
    ]
    assert not offenders, offenders


def test_the_actor_side_needs_neither_click_nor_ray_nor_the_driver():
    """What a Ray actor process imports to build its worker: no click, no pipeline package."""
    code = (
        "import sys\n"
        "from workers.contract import ModelSpec\n"
        "from workers.worker import CertifyWorker\n"
        "w = CertifyWorker(ModelSpec(dataset='digits', classifier='digits', denoiser='digits', device='cpu'))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('click', 'pipeline', 'ray'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_planning_and_validating_a_run_need_no_torch():
    code = (
        "import sys\n"
        "from pipeline.config import RunConfig\n"
        "from pipeline.plan import plan_units\n"
        "c = RunConfig(out='/tmp/x', methods=['cohen'], denoiser=None)\n"
        "c.validate()\n"
        "plan_units(c, [(0, 1)])\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
