"""The test Ray head listens only on the ports the fixture pinned, so the suite can run while
another Ray instance (with Ray's default ports) runs on the same machine."""

from __future__ import annotations

import os

from tests.fixtures.ray_cluster import RayCluster


def _listening_sockets() -> dict[str, int]:
    """Socket inode -> port, for every TCP socket in LISTEN state on this machine."""
    out: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in handle.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    out[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    return out


def _cluster_processes(cluster: RayCluster) -> set[int]:
    """The head's processes (named by its temp dir or GCS address) and all their descendants."""
    parents: dict[int, int] = {}
    roots: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().decode(errors="replace")
        except OSError:
            continue
        if cluster.temp_dir in cmdline or cluster.address in cmdline:
            roots.add(int(entry))
    found, grew = set(roots), True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def test_cluster_listens_only_on_pinned_ports(ray_driver: RayCluster) -> None:
    import ray

    @ray.remote
    def one() -> int:
        return 1

    assert ray.get([one.remote() for _ in range(4)]) == [1] * 4  # workers started, with their ports
    assert ray_driver.ports is not None
    listening = _listening_sockets()
    ports: set[int] = set()
    for pid in _cluster_processes(ray_driver):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in listening:
                ports.add(listening[target[8:-1]])
    assert ports, "found no listening socket of the test cluster: the check itself is broken"
    assert ports <= ray_driver.ports.all(), f"unpinned ports: {sorted(ports - ray_driver.ports.all())}"
