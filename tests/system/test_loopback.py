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

REPO = Path(__file__).resolve().parents[2]

_PROBE = r'''
import json, os, socket, ray
from ray._private import ray_constants
from pipeline.pool import connect

name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
connect()
ray.get(ray.remote(lambda: socket.gethostname()).remote())  # a worker process, with its servers

def children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                out.append(int(entry))
    return out

mine, todo = set(), [os.getpid()]
while todo:
    pid = todo.pop()
    if pid not in mine:
        mine.add(pid)
        todo.extend(children(pid))

inodes = {}
for pid in mine:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        continue
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            with open(f"/proc/{pid}/comm") as f:
                inodes[link[8:-1]] = f.read().strip()

listening = []
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(table) as f:
        for line in list(f)[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                listening.append([inodes[parts[9]], parts[1]])

print(json.dumps({"node_ip": ray.util.get_node_ip_address(), "listening": listening, "processes": len(mine),
                  "env_after": os.environ.get(name), "flag_after": ray_constants.ENABLE_RAY_CLUSTER}))
ray.shutdown()
'''


def _loopback(hex_address: str) -> bool:
    """Whether a /proc/net/tcp{,6} local address ("IP:PORT" in hex) is a loopback address."""
    ip = hex_address.split(":")[0]
    if len(ip) == 8:  # IPv4, little-endian: 127.x.y.z ends in 7F
        return ip[6:8] == "7F"
    words = [ip[i:i + 8] for i in range(0, 32, 8)]  # IPv6, four little-endian 32-bit words
    if words[:3] == ["00000000", "00000000", "FFFF0000"]:  # ::ffff:a.b.c.d
        return words[3][6:8] == "7F"
    return words == ["00000000", "00000000", "00000000", "01000000"]  # ::1


def test_loopback_address_decoding() -> None:
    assert _loopback("0100007F:1F90") and _loopback("0000000000000000FFFF00000100007F:1F90")
    assert _loopback("00000000000000000000000001000000:1F90")
    assert not _loopback("00000000:1F90") and not _loopback("020200C0:1F90")  # any, 192.0.2.2
    assert not _loopback("00000000000000000000000000000000:1F90")  # [::]
    assert not _loopback("0000000000000000FFFF0000020200C0:1F90")  # ::ffff:192.0.2.2


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
    exposed = [(name, address) for name, address in facts["listening"] if not _loopback(address)]
    assert not exposed, f"listening beyond loopback: {exposed}"
    # The switch is put back: a later connection of the same process to a real cluster is unaffected.
    assert facts["env_after"] is None and facts["flag_after"] is True, facts
