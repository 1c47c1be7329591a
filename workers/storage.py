"""Uniform file access for local paths and ``s3://`` URIs.

Everything the pipeline reads or writes goes through this module so that a
run can point its inputs and outputs at a local folder or at S3 (AWS or an
S3-compatible endpoint such as MinIO or moto) without other code caring.

Design notes (the *why*):

* Writes are atomic. Locally we write a hidden temp file in the target
  directory and ``os.replace`` it, so a crash never leaves a truncated file
  that a resuming run would trust. On S3 we buffer the whole object and send a
  single ``PutObject``; S3 makes an object visible only once the PUT succeeds.
  (pyarrow's S3 output stream is not used for writes: it always goes through
  multipart upload, which completes -- with partial data -- if the writer
  raises mid-way and the stream is closed by a ``with`` block.)
* Reads and listings use ``pyarrow.fs`` because Parquet readers want it.
  pyarrow does not read ``AWS_ENDPOINT_URL*``, so we pass the endpoint
  ourselves; credentials come from the AWS default chain (env vars, profile,
  instance role), which both pyarrow and boto3 implement.
* ``fetch`` mirrors S3 objects into a local cache for libraries that need a
  real path (model checkpoints, Hugging Face model directories).
* Every S3 request retries transient failures (throttling, 500/502/503/504,
  connection resets and timeouts) with exponential backoff and jitter:
  botocore's ``standard`` retry mode for boto3 calls and
  ``AwsStandardS3RetryStrategy`` (the same policy in the AWS C++ SDK) for
  pyarrow's reads and listings, both with :data:`S3_MAX_ATTEMPTS` attempts.
* Small coordination objects (the run lease) use conditional writes:
  :func:`create_exclusive`, :func:`replace_if_match` and :func:`delete_if_match`
  (S3 ``If-None-Match``/``If-Match``; locally a guard file lock plus
  ``os.link``, see :func:`_guard`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import threading
import uuid
from dataclasses import dataclass
from typing import IO, Any, Iterator
from urllib.parse import unquote, urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workers.errors import NotFoundError, UserError, first_line

S3_PREFIX = "s3://"
FILE_PREFIX = "file://"
DEFAULT_REGION = "us-east-1"
_CHUNK = 4 * 1024 * 1024
S3_MAX_ATTEMPTS = 8
"""Attempts (first try included) per S3 request. Standard-mode backoff is ``rand(0, 1) * 2**attempt``
seconds capped at 20 s, so 8 attempts ride out roughly a minute of throttling or a restarting
endpoint; a request that still fails is a real outage and becomes a one-line error."""

# Hidden names (temp files, write probes, cache metadata) are never results.
_HIDDEN = "."


# --------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------


def is_s3(uri: str) -> bool:
    """True when ``uri`` names an S3 object or prefix (``s3://bucket/key``)."""
    return uri[:5].lower() == S3_PREFIX


def _split_s3(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; key may be empty."""
    rest = uri[len(S3_PREFIX):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UserError(f"S3 URI '{uri}' has no bucket; write it as s3://BUCKET/PATH")
    return bucket, key


def _local_path(uri: str) -> str:
    """Absolute local path for a plain path or a ``file://`` URI."""
    if uri.startswith(FILE_PREFIX):
        path = unquote(urlsplit(uri).path)
    elif "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise UserError(
            f"unsupported URI scheme '{scheme}://' in '{uri}'; use a local path, file:// or s3://"
        )
    else:
        path = uri
    if not path:
        raise UserError("empty path; pass a local path or an s3://BUCKET/PATH URI")
    return os.path.abspath(os.path.expanduser(path))


def join(uri: str, *parts: str) -> str:
    """Join path components onto a URI, keeping its form (s3://, file:// or plain)."""
    if is_s3(uri) or uri.startswith(FILE_PREFIX):
        out = uri
        for part in parts:
            part = part.strip("/")
            if part:
                out = out.rstrip("/") + "/" + part
        return out
    return os.path.join(uri, *parts)


# --------------------------------------------------------------------------
# S3 settings and clients
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Settings:
    """Where S3 requests go, read from the environment the way boto3 reads it."""

    endpoint_url: str | None  # None means AWS itself
    region: str

    @property
    def display_endpoint(self) -> str:
        """Endpoint for messages: scheme://host:port only, never user info."""
        if self.endpoint_url is None:
            return f"https://s3.{self.region}.amazonaws.com"
        parts = urlsplit(self.endpoint_url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme or 'https'}://{host}{port}"


def s3_settings() -> S3Settings:
    """Current S3 endpoint and region from ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``
    and ``AWS_REGION``/``AWS_DEFAULT_REGION``."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "://" not in endpoint:
        # boto3 refuses scheme-less endpoints; AWS tooling defaults to https.
        endpoint = "https://" + endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    return S3Settings(endpoint_url=endpoint or None, region=region)


def _credential_fingerprint() -> str:
    """Changes when the env credentials change, so cached clients are not stale.

    Hashed so that nothing secret-like sits in cache keys or reprs.
    """
    material = "\0".join(
        os.environ.get(name, "")
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


_CACHE_LOCK = threading.Lock()
_FILESYSTEMS: dict[tuple[S3Settings, str], pafs.S3FileSystem] = {}
_CLIENTS: dict[tuple[S3Settings, str], Any] = {}


def _s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    """A cached pyarrow S3 filesystem for this endpoint/region/credentials."""
    key = (settings, _credential_fingerprint())
    with _CACHE_LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            kwargs: dict[str, Any] = {
                "region": settings.region,
                "connect_timeout": 10.0,
                # pyarrow's default retries only a few error kinds with a fixed short delay; the
                # standard strategy also retries throttling and 5xx answers, with backoff.
                "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
            }
            if settings.endpoint_url is not None:
                parts = urlsplit(settings.endpoint_url)
                kwargs["endpoint_override"] = parts.netloc
                kwargs["scheme"] = parts.scheme or "https"
            # No explicit credentials: pyarrow's AWS SDK default chain reads the
            # same env vars / profile / instance role as boto3.
            fs = pafs.S3FileSystem(**kwargs)
            _FILESYSTEMS[key] = fs
        return fs


def _new_client(settings: S3Settings, *, connect_timeout: float, read_timeout: float, attempts: int) -> Any:
    """A boto3 S3 client; a fresh session because sessions are not thread-safe."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": attempts, "mode": "standard"},
    )
    return boto3.session.Session().client(
        "s3", region_name=settings.region, endpoint_url=settings.endpoint_url, config=config
    )


def _s3_client(settings: S3Settings) -> Any:
    """A cached boto3 client for ordinary transfers (boto3 clients are thread-safe)."""
    key = (settings, _credential_fingerprint())
    with _CACHE_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _new_client(settings, connect_timeout=10, read_timeout=120, attempts=S3_MAX_ATTEMPTS)
            _CLIENTS[key] = client
        return client



def _s3_user_error(exc: Exception, uri: str, settings: S3Settings) -> Exception:
    """Translate a botocore exception into a one-line UserError (or return it as is)."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
        ConnectTimeoutError,
    )

    bucket, key = _split_s3(uri)
    where = settings.display_endpoint
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return UserError(
            f"no usable AWS credentials for {uri}; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment"
        )
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError)):
        return UserError(
            f"cannot reach S3 endpoint {where} for {uri}: {first_line(exc)}; check AWS_ENDPOINT_URL / network"
        )
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        op = getattr(exc, "operation_name", "request")
        if code == "NoSuchBucket" or (code == "404" and op == "HeadBucket"):
            return UserError(
                f"bucket '{bucket}' does not exist at {where}; create it or fix the URI {uri}"
            )
        if code in ("404", "NoSuchKey", "NotFound"):
            return NotFoundError(f"{uri} does not exist; check the URI")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            return UserError(
                f"S3 at {where} rejected the AWS credentials ({code}) for {uri}; "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN"
            )
        if code in ("403", "AccessDenied", "Forbidden", "AllAccessDisabled"):
            return UserError(
                f"access denied ({op}) on s3://{bucket}/{key}; grant s3:ListBucket, "
                "s3:GetObject, s3:PutObject and s3:DeleteObject on it or use other credentials"
            )
        return UserError(f"S3 {op} on {uri} failed ({code or 'error'}): {first_line(exc)}; check the URI and permissions")
    return exc


# --------------------------------------------------------------------------
# Filesystem resolution
# --------------------------------------------------------------------------

_LOCAL_FS = pafs.LocalFileSystem()


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path, ``file://`` URI or ``s3://`` URI.

    Local paths become absolute; S3 paths are ``bucket/key`` as pyarrow wants.
    S3 filesystems are cached per endpoint, region and credentials.
    """
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        path = f"{bucket}/{key}".rstrip("/")
        return _s3_filesystem(s3_settings()), path
    return _LOCAL_FS, _local_path(uri)


# --------------------------------------------------------------------------
# Writes (atomic)
# --------------------------------------------------------------------------


def _put_object(uri: str, data: bytes) -> None:
    """Single PUT, so readers see the old object or the complete new one."""
    settings = s3_settings()
    bucket, key = _split_s3(uri)
    if not key or key.endswith("/"):
        raise UserError(f"'{uri}' names a prefix, not an object; add a file name")
    try:
        _s3_client(settings).put_object(Bucket=bucket, Key=key, Body=data)
    except Exception as exc:  # botocore raises many unrelated types
        raise _s3_user_error(exc, uri, settings) from exc


@contextlib.contextmanager
def atomic_writer(uri: str) -> Iterator[IO[bytes]]:
    """Open ``uri`` for writing; the file appears only if the block completes.

    Locally a hidden temp file in the same directory is fsynced and renamed
    over the target; on S3 the bytes are buffered and sent in one PUT. If the
    block raises, nothing is written and the temp file is removed.
    """
    if is_s3(uri):
        buffer = io.BytesIO()
        yield buffer
        _put_object(uri, buffer.getvalue())
        return

    path = _local_path(uri)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    # os.open with 0o666 lets the umask decide permissions (mkstemp would force 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _FULL_OR_READ_ONLY:
            raise UserError(f"cannot write {uri}: {os.strerror(exc.errno)}; free space (or fix the "
                            f"mount) and run the same command again to resume") from exc
        raise


# A full disk, an exhausted quota or a read-only mount: the user's to fix, not a bug.
_FULL_OR_READ_ONLY = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def write_bytes(uri: str, data: bytes) -> None:
    """Atomically write ``data`` to ``uri``."""
    with atomic_writer(uri) as handle:
        handle.write(data)


def write_json(uri: str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (trailing newline)."""
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_parquet(uri: str, table: pa.Table | pd.DataFrame) -> None:
    """Atomically write a table (or DataFrame, index dropped) as one Parquet file."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_writer(uri) as handle:
        pq.write_table(table, handle)


# --------------------------------------------------------------------------
# Reads and listings
# --------------------------------------------------------------------------


def _missing(uri: str) -> NotFoundError:
    return NotFoundError(f"{uri} does not exist; check the path or URI")


def _body_errors() -> tuple[type[BaseException], ...]:
    """Failures while streaming a response body, which botocore's retries do not cover
    (they end once the headers are in)."""
    from botocore.exceptions import (
        ConnectionClosedError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    return (ConnectionClosedError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError, ConnectionError)


def _backoff(attempt: int) -> None:
    """Sleep like botocore's standard mode: rand(0, 1) * 2**attempt seconds, at most 20."""
    import random
    import time

    time.sleep(min(random.random() * (2 ** attempt), 20.0))


def _s3_get_bytes(uri: str) -> bytes:
    """One object's bytes through boto3 (retried, body included); NotFoundError when missing.

    Not pyarrow: its GetObject does not retry a 503 (the AWS C++ SDK fails with "Failed to flush
    response stream" while writing the error body into the read buffer).
    """
    settings = s3_settings()
    bucket, key = _split_s3(uri)
    if not key or key.endswith("/"):
        raise UserError(f"'{uri}' names a prefix, not an object; add a file name")
    client = _s3_client(settings)
    for attempt in range(S3_MAX_ATTEMPTS):
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            return response["Body"].read()
        except _body_errors() as exc:
            if attempt + 1 >= S3_MAX_ATTEMPTS:
                raise _s3_user_error(exc, uri, settings) from exc
            _backoff(attempt)
        except Exception as exc:  # botocore raises many unrelated types
            if _client_error_code(exc) in _MISSING_CODES:
                raise _missing(uri) from exc
            raise _s3_user_error(exc, uri, settings) from exc
    raise AssertionError("unreachable")


def read_bytes(uri: str) -> bytes:
    """Whole content of a file or object; NotFoundError if it is missing."""
    if is_s3(uri):
        return _s3_get_bytes(uri)
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as exc:
        raise _missing(uri) from exc
    except IsADirectoryError as exc:
        raise UserError(f"{uri} is a directory; pass a file") from exc
    except OSError as exc:
        # pyarrow's S3 errors are plain OSErrors; tell "missing" apart from the rest.
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise _missing(uri) from exc
        raise


def read_json(uri: str) -> Any:
    """Parse a JSON file; UserError when it is not valid JSON."""
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise UserError(f"{uri} is not valid JSON ({first_line(exc)}); fix or delete it") from exc


def read_parquet(uri: str) -> pd.DataFrame:
    """Read a Parquet file (or a directory of them) into a DataFrame."""
    fs, path = resolve(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise _missing(uri)
    try:
        if kind == pafs.FileType.File and is_s3(uri):
            # Through boto3, whose reads retry (see _s3_get_bytes).
            return pq.read_table(pa.BufferReader(_s3_get_bytes(uri))).to_pandas()
        return pq.read_table(path, filesystem=fs).to_pandas()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise UserError(f"cannot read Parquet from {uri} ({first_line(exc)}); check that it is a valid Parquet file") from exc


def exists(uri: str) -> bool:
    """True if a file, object, directory or non-empty S3 prefix exists at ``uri``."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


@dataclass(frozen=True)
class FileEntry:
    """One listed file: its full URI and size in bytes."""

    uri: str
    size: int

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]


def list_files(uri_dir: str, suffix: str | None = None, recursive: bool = False) -> list[str]:
    """Sorted full URIs of the files under ``uri_dir`` (empty when it is missing).

    Hidden entries (names starting with '.', e.g. in-flight temp files) are
    skipped because they are never complete results.
    """
    return [entry.uri for entry in list_entries(uri_dir, suffix, recursive)]


def list_entries(
    uri_dir: str, suffix: str | None = None, recursive: bool = False, include_hidden: bool = False
) -> list[FileEntry]:
    """Like :func:`list_files`, with sizes (free: they come with the listing); ``include_hidden``
    also returns hidden entries (temp files of interrupted writes, lock guards)."""
    fs, path = resolve(uri_dir)
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    try:
        infos = fs.get_file_info(selector)
    except FileNotFoundError:
        return []
    except NotADirectoryError as exc:
        raise UserError(f"{uri_dir} is a file, not a directory; pass its folder") from exc
    base = uri_dir.rstrip("/") or uri_dir
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(path):].lstrip("/")
        if not include_hidden and any(part.startswith(_HIDDEN) for part in rel.split("/")):
            continue
        if suffix is not None and not rel.endswith(suffix):
            continue
        out.append(FileEntry(uri=join(base, *rel.split("/")), size=int(info.size or 0)))
    return sorted(out, key=lambda entry: entry.uri)


def makedirs(uri_dir: str) -> None:
    """Create a local directory (and parents); a no-op on S3, which has no directories."""
    if not is_s3(uri_dir):
        os.makedirs(_local_path(uri_dir), exist_ok=True)


def delete_tree(uri_dir: str) -> None:
    """Delete a directory or S3 prefix and everything under it; missing is fine."""
    fs, path = resolve(uri_dir)
    if is_s3(uri_dir):
        _, key = _split_s3(uri_dir)
        if not key.strip("/"):
            raise UserError(f"refusing to delete the whole bucket {uri_dir}; pass a prefix inside it")
    elif path in ("/", os.path.expanduser("~")):
        raise UserError(f"refusing to delete {path}; pass a run directory")
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        return
    if kind == pafs.FileType.File:
        fs.delete_file(path)
    else:
        fs.delete_dir(path)


def delete_files(uris: list[str]) -> None:
    """Delete these files or objects (missing ones are fine); never touches anything else.

    S3: ``DeleteObjects`` in batches of 1000 keys per bucket; a key S3 refuses raises.
    """
    by_bucket: dict[str, list[str]] = {}
    for uri in uris:
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            if not key or key.endswith("/"):
                raise UserError(f"'{uri}' names a prefix, not an object; refusing to delete it")
            by_bucket.setdefault(bucket, []).append(key)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_local_path(uri))
    if not by_bucket:
        return
    settings = s3_settings()
    client = _s3_client(settings)
    for bucket, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            try:
                response = client.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            except Exception as exc:  # botocore raises many unrelated types
                raise _s3_user_error(exc, f"s3://{bucket}/{batch[0]}", settings) from exc
            errors = [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                raise UserError(
                    f"S3 refused to delete s3://{bucket}/{first.get('Key')} ({first.get('Code')}: "
                    f"{first.get('Message')}); check s3:DeleteObject permissions"
                )


def move(src: str, dst: str) -> None:
    """Move one file or object to ``dst`` (same storage): a rename locally, copy then delete on S3.

    On S3 the destination is complete before the source goes, so a crash in between leaves two
    copies, never none.
    """
    if is_s3(src) != is_s3(dst):
        raise UserError(f"cannot move {src} to {dst}: both must be local or both on S3")
    if not is_s3(src):
        target = _local_path(dst)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.replace(_local_path(src), target)
        except FileNotFoundError as exc:
            raise _missing(src) from exc
        return
    settings = s3_settings()
    src_bucket, src_key = _split_s3(src)
    dst_bucket, dst_key = _split_s3(dst)
    client = _s3_client(settings)
    try:
        client.copy_object(Bucket=dst_bucket, Key=dst_key, CopySource={"Bucket": src_bucket, "Key": src_key})
        client.delete_object(Bucket=src_bucket, Key=src_key)
    except Exception as exc:  # botocore raises many unrelated types
        raise _s3_user_error(exc, src, settings) from exc


# --------------------------------------------------------------------------
# Conditional writes (small coordination objects such as the run lease)
# --------------------------------------------------------------------------
#
# A *version* names one exact content of an object: its ETag on S3, the SHA-256 of its bytes
# locally. The three writes below succeed only against the state the caller saw, so two
# processes that race on the same object cannot both win.
#
# S3: PutObject with If-None-Match: * (create) or If-Match: ETAG (replace), DeleteObject with
# If-Match: ETAG (AWS, MinIO and moto 5 implement all three). A lost response can make a write
# that did happen look refused after botocore retries it (the retry sees 412): callers that
# embed a unique token in the bytes can tell, by reading the object back, that the write was
# theirs (the run lease does).
#
# Locally: every operation holds an exclusive flock on the object's directory itself (reads
# take it shared), so no guard file is ever left beside a user's files, and a create also goes
# through os.link, which fails if the name exists, so even without working flock two creators
# cannot both win.


@dataclass(frozen=True)
class Versioned:
    """The bytes of an object and the version they were read at."""

    data: bytes
    version: str


_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def _client_error_code(exc: Exception) -> str | None:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return None


def _local_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _guard(path: str, exclusive: bool = True) -> Iterator[None]:
    """Hold the guard lock of the local file ``path`` (see the notes above)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_local(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except IsADirectoryError as exc:
        raise UserError(f"{path} is a directory; remove it (it should be a file)") from exc


def _write_local_temp(path: str, data: bytes) -> str:
    """A fsynced hidden temp file next to ``path`` holding ``data``."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return tmp


def read_versioned(uri: str) -> Versioned | None:
    """The object's bytes and version, or None when there is no object at ``uri``."""
    if not is_s3(uri):
        path = _local_path(uri)
        with _guard(path, exclusive=False):
            data = _read_local(path)
        return None if data is None else Versioned(data, _local_version(data))
    settings = s3_settings()
    bucket, key = _split_s3(uri)
    try:
        response = _s3_client(settings).get_object(Bucket=bucket, Key=key)
        data = response["Body"].read()
    except Exception as exc:  # botocore raises many unrelated types
        if _client_error_code(exc) in _MISSING_CODES:
            return None
        raise _s3_user_error(exc, uri, settings) from exc
    return Versioned(data, str(response.get("ETag", "")))


def create_exclusive(uri: str, data: bytes) -> str | None:
    """Create ``uri`` holding ``data`` only if nothing exists there; its version, or None if it existed.

    Exactly one of several concurrent creators gets a version back.
    """
    if not is_s3(uri):
        path = _local_path(uri)
        with _guard(path):
            tmp = _write_local_temp(path, data)
            try:
                os.link(tmp, path)  # atomic, and refuses an existing name
            except FileExistsError:
                return None
            finally:
                os.unlink(tmp)
        return _local_version(data)
    settings = s3_settings()
    bucket, key = _split_s3(uri)
    try:
        response = _s3_client(settings).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except Exception as exc:  # botocore raises many unrelated types
        if _client_error_code(exc) in _PRECONDITION_CODES:
            return None
        raise _conditional_error(exc, uri, settings) from exc
    return str(response.get("ETag", ""))


def replace_if_match(uri: str, data: bytes, version: str) -> str | None:
    """Replace ``uri`` with ``data`` only if it is still at ``version``; the new version, or None
    when the object changed or vanished since."""
    if not is_s3(uri):
        path = _local_path(uri)
        with _guard(path):
            current = _read_local(path)
            if current is None or _local_version(current) != version:
                return None
            tmp = _write_local_temp(path, data)
            os.replace(tmp, path)
        return _local_version(data)
    settings = s3_settings()
    bucket, key = _split_s3(uri)
    try:
        response = _s3_client(settings).put_object(Bucket=bucket, Key=key, Body=data, IfMatch=version)
    except Exception as exc:  # botocore raises many unrelated types
        if _client_error_code(exc) in _PRECONDITION_CODES | _MISSING_CODES:
            return None
        raise _conditional_error(exc, uri, settings) from exc
    return str(response.get("ETag", ""))


def delete_if_match(uri: str, version: str) -> bool:
    """Delete ``uri`` only if it is still at ``version``; False when it changed or is gone."""
    if not is_s3(uri):
        path = _local_path(uri)
        with _guard(path):
            current = _read_local(path)
            if current is None or _local_version(current) != version:
                return False
            os.unlink(path)
        return True
    settings = s3_settings()
    bucket, key = _split_s3(uri)
    try:
        _s3_client(settings).delete_object(Bucket=bucket, Key=key, IfMatch=version)
    except Exception as exc:  # botocore raises many unrelated types
        if _client_error_code(exc) in _PRECONDITION_CODES | _MISSING_CODES:
            return False
        raise _conditional_error(exc, uri, settings) from exc
    return True


def _conditional_error(exc: Exception, uri: str, settings: S3Settings) -> Exception:
    """One line for a conditional request the endpoint cannot do (old S3-compatible servers)."""
    if _client_error_code(exc) in ("NotImplemented", "501"):
        return UserError(
            f"the S3 endpoint {settings.display_endpoint} does not support conditional writes "
            f"(If-Match/If-None-Match) needed for {uri}; use AWS S3 or a server that implements them"
        )
    return _s3_user_error(exc, uri, settings)


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------
# Preflight
# --------------------------------------------------------------------------


def _file_on_path(path: str) -> str | None:
    """The first existing non-directory among the parents of ``path`` (None when there is none)."""
    parent = os.path.dirname(path)
    while parent and parent != os.path.dirname(parent):
        if os.path.lexists(parent):
            return None if os.path.isdir(parent) else parent
        parent = os.path.dirname(parent)
    return None


def check_access(uri: str) -> None:
    """Fail fast, with one line, if results cannot be written under ``uri``.

    Run before loading models so a typo in a bucket name or a dead endpoint
    costs seconds, not a model load. S3: HeadBucket, then put and delete a
    tiny probe object under the prefix. Local: create the directory and a
    probe file.
    """
    if not is_s3(uri):
        path = _local_path(uri)
        if os.path.lexists(path) and not os.path.isdir(path):
            # makedirs would say "File exists", which reads as if the folder were the problem.
            raise UserError(f"{path} is a file, not a folder; pass a folder (new or existing) for the results")
        blocking = _file_on_path(path)
        if blocking is not None:
            raise UserError(f"{blocking} is a file, so {path} cannot be a folder; pass a folder (new or existing) for the results")
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, f".write-probe-{uuid.uuid4().hex}")
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        except OSError as exc:
            raise UserError(
                f"cannot write to directory {path} ({exc.strerror or first_line(exc)}); "
                "choose a writable output location or fix its permissions"
            ) from exc
        return

    settings = s3_settings()
    bucket, key = _split_s3(uri)
    prefix = key.strip("/")
    probe_key = f"{prefix}/.write-probe-{uuid.uuid4().hex}" if prefix else f".write-probe-{uuid.uuid4().hex}"
    # Short timeouts and one retry: a dead endpoint must fail in seconds (every retry of a
    # refused connection adds its backoff). The run's own requests retry S3_MAX_ATTEMPTS times.
    client = _new_client(settings, connect_timeout=5, read_timeout=10, attempts=2)
    try:
        client.head_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key=probe_key, Body=b"")
        client.delete_object(Bucket=bucket, Key=probe_key)
    except Exception as exc:  # botocore raises many unrelated types
        raise _probe_error(exc, uri, settings, f"S3 preflight for {uri} at {settings.display_endpoint} failed") from exc


def check_reachable(uri: str) -> None:
    """Fail fast, with one line, when the S3 endpoint or bucket of ``uri`` cannot be reached
    (HeadBucket with one retry); a no-op for local paths. Run before a read-only command's
    first request, so that a dead endpoint costs seconds instead of every retry's backoff."""
    if not is_s3(uri):
        return
    settings = s3_settings()
    bucket, _ = _split_s3(uri)
    client = _new_client(settings, connect_timeout=5, read_timeout=10, attempts=2)
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as exc:  # botocore raises many unrelated types
        raise _probe_error(exc, uri, settings, f"cannot read {uri} at {settings.display_endpoint}") from exc


def _probe_error(exc: Exception, uri: str, settings: S3Settings, what: str) -> Exception:
    """The one-line error of a failed probe request: the specific one ``_s3_user_error`` knows
    (no such bucket, access denied, ...), else ``what`` with the cause and where to look."""
    translated = _s3_user_error(exc, uri, settings)
    if translated is not exc:
        return translated
    return UserError(f"{what}: {first_line(exc)}; check AWS_ENDPOINT_URL, credentials and the URI")


# --------------------------------------------------------------------------
# Local cache of S3 objects
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteObject:
    """What S3 says about one object; the cache is valid only while this matches."""

    key: str
    size: int
    etag: str


def default_cache_dir() -> str:
    """``$DENSEPURE_CACHE`` or ``~/.cache/densepure``."""
    return os.environ.get("DENSEPURE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "densepure")


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Exclusive advisory lock so processes on one node download a URI once."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_meta(meta_path: str) -> dict[str, Any] | None:
    try:
        with open(meta_path, "rb") as handle:
            meta = json.load(handle)
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


def _cache_valid(local: str, meta_path: str, remote: RemoteObject) -> bool:
    """Reuse only a complete, unmodified copy of the current remote object."""
    meta = _read_meta(meta_path)
    if meta is None or not os.path.isfile(local):
        return False
    if meta.get("remote_size") != remote.size or meta.get("etag") != remote.etag:
        return False
    if os.path.getsize(local) != meta.get("size"):
        return False
    return sha256_file(local) == meta.get("sha256")


def _download_object(client: Any, bucket: str, remote: RemoteObject, local: str, meta_path: str) -> None:
    """Stream one object to a temp file, hashing as we go, then rename into place."""
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(meta_path)  # a stale sidecar must never vouch for new bytes
    response = client.get_object(Bucket=bucket, Key=remote.key)
    expected = int(response["ContentLength"])
    digest = hashlib.sha256()
    written = 0
    tmp = f"{local}.part-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as handle:
            for chunk in response["Body"].iter_chunks(_CHUNK):
                handle.write(chunk)
                digest.update(chunk)
                written += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if written != expected:
            raise _ShortDownload(f"short download of s3://{bucket}/{remote.key}: {written} of {expected} bytes")
        os.replace(tmp, local)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    meta = {
        "source": f"s3://{bucket}/{remote.key}",
        "size": written,
        "sha256": digest.hexdigest(),
        "etag": response.get("ETag", remote.etag),
        "remote_size": expected,
    }
    write_json(meta_path, meta)


def _sync_object(client: Any, bucket: str, remote: RemoteObject, local: str, meta_path: str) -> bool:
    """Make ``local`` a verified copy of ``remote``; True when it had to download."""
    if _cache_valid(local, meta_path, remote):
        return False
    for attempt in range(S3_MAX_ATTEMPTS):
        try:
            _download_object(client, bucket, remote, local, meta_path)
            return True
        except (*_body_errors(), _ShortDownload):
            # botocore retried the request itself; a body cut off half-way needs a new GET.
            if attempt + 1 >= S3_MAX_ATTEMPTS:
                raise
            _backoff(attempt)
    raise AssertionError("unreachable")


class _ShortDownload(OSError):
    """Fewer bytes arrived than the object's Content-Length."""


def _head(client: Any, bucket: str, key: str) -> RemoteObject | None:
    """HEAD one object; None when there is no object with exactly this key."""
    from botocore.exceptions import ClientError

    try:
        response = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return RemoteObject(key=key, size=int(response["ContentLength"]), etag=response.get("ETag", ""))


def _list_objects(client: Any, bucket: str, prefix: str) -> list[RemoteObject]:
    """All objects under ``prefix`` (which ends with '/' or is empty)."""
    paginator = client.get_paginator("list_objects_v2")
    out = []
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if item["Key"].endswith("/"):
                continue  # "folder" marker objects made by consoles
            out.append(RemoteObject(key=item["Key"], size=int(item["Size"]), etag=item.get("ETag", "")))
    return out


def _prune(local_dir: str, meta_dir: str, keep: set[str]) -> None:
    """Remove cached files that no longer exist under the remote prefix."""
    for root, _, files in os.walk(local_dir):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, local_dir)
            if rel not in keep:
                os.unlink(full)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(meta_dir, rel + ".meta.json"))


def fetch(uri: str, cache_dir: str | None = None) -> str:
    """Return a local path holding the content of ``uri``.

    Local paths are returned as they are (NotFoundError when missing). An S3
    object is downloaded once into the cache and re-used while its size and
    SHA-256 match the sidecar ``<file>.meta.json`` and S3 still reports the
    same size and ETag. An S3 prefix (e.g. a Hugging Face model directory) is
    mirrored into a local directory with the same checks per object; their
    sidecars live in a parallel ``.meta`` folder so the directory holds only
    the model's own files. A per-URI file lock makes concurrent processes on
    one node wait for a single download.
    """
    if not is_s3(uri):
        path = _local_path(uri)
        if not os.path.exists(path):
            raise _missing(uri)
        return path

    settings = s3_settings()
    bucket, key = _split_s3(uri)
    client = _s3_client(settings)
    root = os.path.join(cache_dir or default_cache_dir(), "s3")
    entry = os.path.join(root, hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:32])
    try:
        with _file_lock(entry + ".lock"):
            remote = _head(client, bucket, key) if key and not key.endswith("/") else None
            if remote is not None:
                local = os.path.join(entry, os.path.basename(key))
                _sync_object(client, bucket, remote, local, local + ".meta.json")
                return local

            prefix = key.rstrip("/") + "/" if key.strip("/") else ""
            objects = _list_objects(client, bucket, prefix)
            if not objects:
                raise NotFoundError(f"{uri} does not exist (no object or prefix with that name); check the URI")
            local_dir = os.path.join(entry, os.path.basename(prefix.rstrip("/")) or bucket)
            meta_dir = os.path.join(entry, ".meta")
            keep = set()
            for obj in objects:
                rel = obj.key[len(prefix):]
                keep.add(os.path.normpath(rel))
                if rel.startswith("/") or ".." in rel.split("/"):
                    raise UserError(f"refusing to cache s3://{bucket}/{obj.key}: its key escapes the prefix")
                local = os.path.join(local_dir, rel)
                _sync_object(client, bucket, obj, local, os.path.join(meta_dir, rel + ".meta.json"))
            _prune(local_dir, meta_dir, keep)
            return local_dir
    except UserError:
        raise
    except Exception as exc:
        translated = _s3_user_error(exc, uri, settings)
        if translated is exc:
            raise
        raise translated from exc
