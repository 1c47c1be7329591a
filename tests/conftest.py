"""Shared session fixtures.

Sections are self-contained so that several people can add fixtures here:

* S3 (moto server)   -- ``s3_server``
* (Ray cluster)      -- added separately; it should depend on ``s3_server``
  (or be started after it) so that Ray workers inherit the AWS_* environment.
"""

from __future__ import annotations

# ==========================================================================
# S3: an in-process moto server on 127.0.0.1
# ==========================================================================

import logging
import os
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

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint."""
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

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
# (next section: Ray cluster fixtures)
# ==========================================================================
