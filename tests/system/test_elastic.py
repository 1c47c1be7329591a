"""A GPU node joins mid-run (ray.cluster_utils.Cluster) and the pool grows onto it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pandas as pd

from tests.fixtures.runs import LONGER, REPO, TINY, comparable

SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    import ray
    import ray.util.state
    from ray.cluster_utils import Cluster
    from pipeline.config import RunConfig
    from pipeline.rundir import RunDir
    from pipeline.run import certify_run

    out, tiny = sys.argv[1], eval(sys.argv[2])
    # Loopback only: both nodes of this test cluster listen on 127.0.0.1.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1, "node_ip_address": "127.0.0.1"})
    ray.init(address=cluster.address)
    result = {}
    thread = threading.Thread(target=lambda: result.update(s=certify_run(RunConfig(out=out, max_workers=4, **tiny), log=print)))
    thread.start()
    while not RunDir(out).has_manifest() or not ray.util.state.list_actors(filters=[("class_name", "=", "CertifyWorker")]):
        time.sleep(0.2)
    cluster.add_node(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1")
    thread.join()
    nodes = {a.node_id for a in ray.util.state.list_actors(filters=[("class_name", "=", "CertifyWorker")])}
    print("WORKERS", result["s"].workers, "NODES", len(nodes))
    result["s"].table.to_parquet(out + "/table-copy.parquet")
    ray.shutdown()
    cluster.shutdown()
    """
)


def test_gpu_node_added_mid_run_is_used(tmp_path, longer_reference):
    out = tmp_path / "elastic"
    out.mkdir()
    tiny = {**TINY, **LONGER, "chunk": 10}  # long enough to outlast the new node's start-up
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), repr(tiny)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("WORKERS")][-1].split()
    assert int(line[1]) == 2 and int(line[3]) == 2, line
    table = pd.read_parquet(out / "table-copy.parquet")
    pd.testing.assert_frame_equal(comparable(table), longer_reference)
