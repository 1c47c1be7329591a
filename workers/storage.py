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
"""

from __future__ import annotations

import contextlib
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
            kwargs: dict[str, Any] = {"region": settings.region, "connect_timeout": 10.0}
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
            client = _new_client(settings, connect_timeout=10, read_timeout=120, attempts=5)
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
            f"cannot reach S3 endpoint {where}: {first_line(exc)}; check AWS_ENDPOINT_URL / network"
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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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


def read_bytes(uri: str) -> bytes:
    """Whole content of a file or object; NotFoundError if it is missing."""
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
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise _missing(uri)
    try:
        return pq.read_table(path, filesystem=fs).to_pandas()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise UserError(f"cannot read Parquet from {uri} ({first_line(exc)}); check that it is a valid Parquet file") from exc


def exists(uri: str) -> bool:
    """True if a file, object, directory or non-empty S3 prefix exists at ``uri``."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri_dir: str, suffix: str | None = None, recursive: bool = False) -> list[str]:
    """Sorted full URIs of the files under ``uri_dir`` (empty when it is missing).

    Hidden entries (names starting with '.', e.g. in-flight temp files) are
    skipped because they are never complete results.
    """
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
        if any(part.startswith(_HIDDEN) for part in rel.split("/")):
            continue
        if suffix is not None and not rel.endswith(suffix):
            continue
        out.append(join(base, *rel.split("/")))
    return sorted(out)


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


def check_access(uri: str) -> None:
    """Fail fast, with one line, if results cannot be written under ``uri``.

    Run before loading models so a typo in a bucket name or a dead endpoint
    costs seconds, not a model load. S3: HeadBucket, then put and delete a
    tiny probe object under the prefix. Local: create the directory and a
    probe file.
    """
    if not is_s3(uri):
        path = _local_path(uri)
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
    # Short timeouts and few retries: a dead endpoint must fail in seconds.
    client = _new_client(settings, connect_timeout=5, read_timeout=10, attempts=2)
    try:
        client.head_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key=probe_key, Body=b"")
        client.delete_object(Bucket=bucket, Key=probe_key)
    except Exception as exc:  # botocore raises many unrelated types
        translated = _s3_user_error(exc, uri, settings)
        if translated is exc:
            raise UserError(
                f"S3 preflight for {uri} at {settings.display_endpoint} failed: {first_line(exc)}; "
                "check AWS_ENDPOINT_URL, credentials and the URI"
            ) from exc
        raise translated from exc


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
            raise OSError(f"short download of s3://{bucket}/{remote.key}: {written} of {expected} bytes")
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
    _download_object(client, bucket, remote, local, meta_path)
    return True


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
