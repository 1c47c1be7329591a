"""Shared session fixtures.

Sections are self-contained so that several people can add fixtures here:

* S3 (moto server)   -- ``s3_server``, ``s3_bucket``
* Ray                -- ``ray_cluster`` (a ``ray start --head`` on 127.0.0.1, started after the
  S3 server so that its workers inherit the AWS_* environment), ``ray_driver``
* Reference runs     -- ``reference``, ``longer_reference``: the uninterrupted tables every
  pipeline test compares against
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

# ==========================================================================
# S3: an in-process moto server on 127.0.0.1
# ==========================================================================

import logging
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pytest

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # No instance-metadata lookups: they only slow down the credential chain.
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Variables that would override ours (e.g. from a developer's shell) while the server runs.
_S3_ENV_CLEARED = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_SECURITY_TOKEN")


class _CompleteMultipartFix:
    """WSGI middleware: rename moto's CompleteMultipartUpload root tag.

    moto 5.2.1 answers CompleteMultipartUpload with ``<CompleteMultipartUploadResponse>``
    instead of ``<CompleteMultipartUploadResult>`` (getmoto/moto#10055, fixed by
    #10056 in a later release). boto3 does not care, but pyarrow's AWS C++ SDK
    treats it as an error embedded in a 200 response and every pyarrow S3 write
    (which always uses multipart upload) fails. Harmless once moto is fixed.
    """

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("REQUEST_METHOD") != "POST" or "uploadId=" not in environ.get("QUERY_STRING", ""):
            return self.app(environ, start_response)
        captured: dict[str, Any] = {}
        chunks: list[bytes] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            captured["status"], captured["headers"] = status, headers
            return chunks.append

        result = self.app(environ, capture)
        try:
            chunks.extend(result)
        finally:
            if hasattr(result, "close"):
                result.close()
        body = b"".join(chunks).replace(b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult")
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
        start_response(captured["status"], headers)
        return [body]


def _moto_server_class() -> type:
    """ThreadedMotoServer whose WSGI app is wrapped in :class:`_CompleteMultipartFix`."""
    from moto.server import DomainDispatcherApplication, ThreadedMotoServer, create_backend_app
    from werkzeug.serving import make_server

    class PatchedMotoServer(ThreadedMotoServer):
        # Overrides moto's private entry point (moto 5.x); only the app is wrapped.
        def _server_entry(self) -> None:
            app = _CompleteMultipartFix(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(self._ip_address, self._port, app, True)
            self._server_ready_event.set()
            self._server.serve_forever()

    return PatchedMotoServer


@dataclass
class S3Server:
    """Handle on the test S3 endpoint (credentials are the dummy 'testing' pair)."""

    endpoint: str
    created: list[str] = field(default_factory=list)
    _client: Any = field(default=None, repr=False)

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint (cached: creating one takes ~0.3 s)."""
        if self._client is None:
            import boto3

            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint, region_name="us-east-1"
            )
        return self._client

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique one when ``name`` is None) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        self.created.append(name)
        return name

    def reset(self) -> None:
        """Drop every bucket and object (moto's reset API)."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 with AWS_* env pointing at it for the whole session.

    The variables are set in ``os.environ`` (not monkeypatched per test) so that
    subprocesses started later -- Ray workers included -- inherit them.
    """
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = _moto_server_class()(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"

    saved = {k: os.environ.get(k) for k in (*_S3_ENV, *_S3_ENV_CLEARED, "AWS_ENDPOINT_URL")}
    for k in _S3_ENV_CLEARED:
        os.environ.pop(k, None)
    os.environ.update(_S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield S3Server(endpoint=endpoint)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket for one test."""
    return s3_server.make_bucket()


# ==========================================================================
# Ray: a local head on 127.0.0.1, and the reference runs
# ==========================================================================

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayCluster:
    """A real local Ray head (``ray start --head``) with 2 logical GPUs, for the session."""

    address: str
    dashboard: str
    temp_dir: str
    env: dict = field(default_factory=dict)


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server) -> Iterator[RayCluster]:
    """``ray start --head --node-ip-address 127.0.0.1`` with logical GPUs, stopped at the end.

    Started after the S3 server so its workers inherit the AWS_* variables. The pytest process
    connects to it as a driver; ``ray job submit`` reaches it through the dashboard port.
    """
    port, dash = _free_port(), _free_port()
    # Ray's socket paths must stay short: a temp dir directly under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        "ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", "2", "--num-gpus", "2", "--include-dashboard", "true",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--temp-dir", temp_dir,
        "--disable-usage-stats",
    ]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=180)
    os.environ["PYTHONPATH"] = str(REPO)
    address = f"127.0.0.1:{port}"
    try:
        yield RayCluster(address=address, dashboard=f"http://127.0.0.1:{dash}", temp_dir=temp_dir, env=env)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _stop_ray_processes(temp_dir.encode(), address.encode())
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_ray_processes(*markers: bytes) -> None:
    """Stop this session's Ray processes only (``ray stop`` would end every Ray on the machine):
    those whose command line names our temp dir or GCS address; workers exit with the raylet."""
    import signal
    import time

    def ours() -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        cmdline = f.read()
                except OSError:
                    continue
                if any(m in cmdline for m in markers):
                    pids.append(int(entry))
        return pids

    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 1.0)):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + wait
        while ours() and time.time() < deadline:
            time.sleep(0.2)


@pytest.fixture
def ray_driver(ray_cluster: RayCluster) -> Iterator[RayCluster]:
    """This process connected to the session's Ray head as a driver."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, logging_level=logging.WARNING)
    yield ray_cluster


@pytest.fixture(scope="session")
def reference(tmp_path_factory, ray_cluster):
    """The uninterrupted TINY run on one worker: every other run must give this table."""
    import ray

    from pipeline.run import certify_run
    from tests.runs import TINY_UNITS, comparable, quiet, tiny

    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, logging_level=logging.WARNING)
    summary = certify_run(tiny(tmp_path_factory.mktemp("reference"), workers=1), log=quiet)
    assert summary.units_run == summary.units_total == TINY_UNITS
    return comparable(summary.table)


@pytest.fixture(scope="session")
def longer_reference(tmp_path_factory, reference):
    """The uninterrupted LONGER run (two workers: the worker count must not matter)."""
    from pipeline.run import certify_run
    from tests.runs import LONGER, comparable, quiet, tiny

    return comparable(certify_run(tiny(tmp_path_factory.mktemp("longer-reference"), workers=2, **LONGER), log=quiet).table)
