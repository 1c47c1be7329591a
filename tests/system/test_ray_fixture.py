"""The test Ray head listens only on the ports the fixture pinned, so the suite can run while
another Ray instance (with Ray's default ports) runs on the same machine."""

from __future__ import annotations

import os

from tests.fixtures.ray_cluster import RayCluster
from tests.fixtures.sockets import descendants, listening, port


def _cluster_processes(cluster: RayCluster) -> set[int]:
    """The head's processes (named by its temp dir or GCS address) and all their descendants."""
    roots: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().decode(errors="replace")
        except OSError:
            continue
        if cluster.temp_dir in cmdline or cluster.address in cmdline:
            roots.add(int(entry))
    return descendants(roots)


def test_cluster_listens_only_on_pinned_ports(ray_driver: RayCluster) -> None:
    import ray

    @ray.remote
    def one() -> int:
        return 1

    assert ray.get([one.remote() for _ in range(4)]) == [1] * 4  # workers started, with their ports
    assert ray_driver.ports is not None
    ports = {port(address) for _, address in listening(_cluster_processes(ray_driver))}
    assert ports, "found no listening socket of the test cluster: the check itself is broken"
    assert ports <= ray_driver.ports.all(), f"unpinned ports: {sorted(ports - ray_driver.ports.all())}"
