"""Session fixtures, by family in ``tests/fixtures/``, and the ``system`` marker.

* ``tests/fixtures/s3.py``             -- ``s3_server``, ``s3_bucket`` (moto on 127.0.0.1), ``flaky_s3``
  (a proxy in front of it that fails the first attempts of every request)
* ``tests/fixtures/ray_cluster.py``    -- ``ray_cluster`` (``ray start --head`` on 127.0.0.1, started
  after the S3 server so that its workers inherit the AWS_* environment), ``ray_driver``
* ``tests/fixtures/reference_runs.py`` -- ``reference``, ``longer_reference``: the uninterrupted
  tables every pipeline test compares against

Tests under ``tests/system/`` and every test that uses one of these servers are marked
``system``; ``python -m pytest -q -m "not system"`` runs the fast rest.
"""

from __future__ import annotations

import os

# Read by Ray when it is first imported, so set before any test module imports it. The test
# cluster listens on loopback only, so it needs no token (a shared ~/.ray/auth_token rewritten
# by another local Ray instance would otherwise lock drivers out), and Ray must not swap
# 127.0.0.1 for the machine's own address when connecting (every connection stays on loopback).
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.fixtures.ray_cluster import RayCluster, ray_cluster, ray_driver  # noqa: E402,F401
from tests.fixtures.reference_runs import longer_reference, reference  # noqa: E402,F401
from tests.fixtures.s3 import S3Server, flaky_s3, s3_bucket, s3_server  # noqa: E402,F401

_SYSTEM_DIR = Path(__file__).resolve().parent / "system"
_SERVER_FIXTURES = frozenset({"s3_server", "s3_bucket", "flaky_s3", "ray_cluster", "ray_driver", "reference", "longer_reference"})


# The longest test files (measured, 2 cores), run first: pytest-xdist hands out files in
# collection order, and a long file handed out last keeps one process busy while the other idles.
_LONGEST_FIRST = ("system/test_readme_byo.py", "system/test_faults_cli.py", "system/test_pipeline.py",
                  "system/test_sequential.py", "system/test_scale.py", "system/test_early_majority.py",
                  "system/test_elastic.py", "system/test_purify_cli.py", "workers/test_fast_path.py")


def _order(item: pytest.Item) -> int:
    path = Path(str(item.fspath)).as_posix()
    return next((i for i, name in enumerate(_LONGEST_FIRST) if path.endswith(name)), len(_LONGEST_FIRST))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark as ``system`` what needs a server, a subprocess cluster or real jobs; longest files first."""
    for item in items:
        if _SYSTEM_DIR in Path(str(item.fspath)).parents or _SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)
    items.sort(key=_order)  # stable: the order within a file is kept
