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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark as ``system`` what needs a server, a subprocess cluster or real jobs."""
    for item in items:
        if _SYSTEM_DIR in Path(str(item.fspath)).parents or _SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)
