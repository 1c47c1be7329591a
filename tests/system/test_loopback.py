"""The private Ray instance of a laptop run (no RAY_ADDRESS) listens on loopback only.

It runs without token authentication, so a server on a routable interface would let anyone on
the network schedule work on the user's machine. On Linux Ray swaps a 127.0.0.1 node address for
the machine's routable one unless told it is a single-node instance; ``pipeline.pool.connect``
tells it. Checked in a fresh process whose environment lacks the test session's own switch
(``tests/conftest.py`` sets it for the test cluster), with a task run so that a worker exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.fixtures.sockets import is_loopback

REPO = Path(__file__).resolve().parents[2]

_PROBE = r'''
import json, os, socket, ray
from ray._private import ray_constants
from pipeline.pool import connect
from tests.fixtures.sockets import descendants, listening, process_name

name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
connect()
ray.get(ray.remote(lambda: socket.gethostname()).remote())  # a worker process, with its servers
mine = descendants({os.getpid()})
print(json.dumps({"node_ip": ray.util.get_node_ip_address(), "processes": len(mine),
                  "listening": [[process_name(pid), address] for pid, address in listening(mine)],
                  "env_after": os.environ.get(name), "flag_after": ray_constants.ENABLE_RAY_CLUSTER}))
ray.shutdown()
'''


def test_loopback_address_decoding() -> None:
    assert is_loopback("0100007F:1F90") and is_loopback("0000000000000000FFFF00000100007F:1F90")
    assert is_loopback("00000000000000000000000001000000:1F90")
    assert not is_loopback("00000000:1F90") and not is_loopback("020200C0:1F90")  # any, 192.0.2.2
    assert not is_loopback("00000000000000000000000000000000:1F90")  # [::]
    assert not is_loopback("0000000000000000FFFF0000020200C0:1F90")  # ::ffff:192.0.2.2


def test_private_ray_instance_listens_on_loopback_only(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["node_ip"] == "127.0.0.1", facts
    # GCS, raylet, the worker and the driver's own servers: several sockets, all on loopback.
    names = {name for name, _ in facts["listening"]}
    assert len(facts["listening"]) >= 3 and "gcs_server" in names and "raylet" in names, facts
    exposed = [(name, address) for name, address in facts["listening"] if not is_loopback(address)]
    assert not exposed, f"listening beyond loopback: {exposed}"
    # The switch is put back: a later connection of the same process to a real cluster is unaffected.
    assert facts["env_after"] is None and facts["flag_after"] is True, facts
