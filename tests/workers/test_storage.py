"""workers.storage against the local filesystem and a real (moto) S3 server."""

from __future__ import annotations

import os
import threading
import time

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from workers import storage
from workers.errors import NotFoundError, UserError


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.system)])
def base(request: pytest.FixtureRequest, tmp_path) -> str:
    """A writable root: a local folder or a fresh S3 bucket prefix."""
    if request.param == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/root"


@pytest.fixture
def count_downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the key of every object fetch() actually downloads."""
    calls: list[str] = []
    original = storage._download_object

    def counting(client, bucket, remote, local, meta_path):
        calls.append(remote.key)
        return original(client, bucket, remote, local, meta_path)

    monkeypatch.setattr(storage, "_download_object", counting)
    return calls


# --------------------------------------------------------------------------
# URIs and resolution
# --------------------------------------------------------------------------


def test_resolve_local_forms(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("out/x.json")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "out" / "x.json")
    assert storage.resolve(f"file://{tmp_path}/a b")[1] == str(tmp_path / "a b")
    assert storage.resolve(str(tmp_path))[1] == str(tmp_path)
    assert not storage.is_s3("out/x") and storage.is_s3("s3://b/k")


def test_resolve_s3_endpoint_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:7")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    settings = storage.s3_settings()
    assert settings.endpoint_url == "http://127.0.0.1:7" and settings.region == "eu-west-1"
    fs, path = storage.resolve("s3://bkt/some/key/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bkt/some/key"
    assert storage.resolve("s3://bkt/other")[0] is fs  # cached per endpoint/region
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert storage.s3_settings() == storage.S3Settings("http://127.0.0.1:9", "us-east-1")


def test_bad_uris() -> None:
    with pytest.raises(UserError, match="unsupported URI scheme 'gs://'"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(UserError, match="no bucket"):
        storage.resolve("s3:///key")


def test_join() -> None:
    assert storage.join("s3://b/run/", "units", "a.parquet") == "s3://b/run/units/a.parquet"
    assert storage.join("s3://b", "x") == "s3://b/x"
    assert storage.join("file:///tmp/r", "x") == "file:///tmp/r/x"
    assert storage.join("/tmp/r", "x", "y") == "/tmp/r/x/y"


# --------------------------------------------------------------------------
# Round trips, listing, deletion (local and S3)
# --------------------------------------------------------------------------


def test_roundtrip(base: str) -> None:
    storage.makedirs(base)
    storage.write_bytes(storage.join(base, "raw.bin"), b"\x00\x01abc")
    storage.write_json(storage.join(base, "m.json"), {"a": [1, 2], "b": None})
    frame = pd.DataFrame({"image_id": [3, 1], "radius": [0.5, 0.25], "method": ["cohen", "dds"]})
    storage.write_parquet(storage.join(base, "t.parquet"), frame)
    storage.write_parquet(storage.join(base, "u.parquet"), pa.table({"x": [1]}))

    assert storage.read_bytes(storage.join(base, "raw.bin")) == b"\x00\x01abc"
    assert storage.read_json(storage.join(base, "m.json")) == {"a": [1, 2], "b": None}
    pd.testing.assert_frame_equal(storage.read_parquet(storage.join(base, "t.parquet")), frame)
    assert storage.exists(storage.join(base, "m.json"))
    assert storage.exists(base)
    assert not storage.exists(storage.join(base, "nope.json"))


def test_list_files_and_delete_tree(base: str) -> None:
    for name in ("b.parquet", "a.parquet", "c.json", "sub/d.parquet"):
        storage.write_bytes(storage.join(base, name), b"x")
    storage.write_bytes(storage.join(base, ".hidden.parquet"), b"x")
    assert storage.list_files(base, suffix=".parquet") == [
        storage.join(base, "a.parquet"),
        storage.join(base, "b.parquet"),
    ]
    assert storage.list_files(base, recursive=True)[-1] == storage.join(base, "sub/d.parquet")
    assert storage.list_files(storage.join(base, "missing")) == []

    storage.delete_tree(base)
    assert storage.list_files(base, recursive=True) == []
    assert not storage.exists(storage.join(base, "a.parquet"))
    storage.delete_tree(base)  # missing is fine


def test_missing_reads_raise_not_found(base: str) -> None:
    with pytest.raises(NotFoundError, match="does not exist") as info:
        storage.read_json(storage.join(base, "absent.json"))
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, UserError)
    with pytest.raises(NotFoundError):
        storage.read_parquet(storage.join(base, "absent.parquet"))


def test_invalid_json_and_parquet(base: str) -> None:
    storage.write_bytes(storage.join(base, "bad.json"), b"{nope")
    storage.write_bytes(storage.join(base, "bad.parquet"), b"not parquet at all")
    with pytest.raises(UserError, match="not valid JSON"):
        storage.read_json(storage.join(base, "bad.json"))
    with pytest.raises(UserError, match="cannot read Parquet"):
        storage.read_parquet(storage.join(base, "bad.parquet"))


def test_delete_tree_refuses_bucket_root(s3_bucket: str) -> None:
    with pytest.raises(UserError, match="whole bucket"):
        storage.delete_tree(f"s3://{s3_bucket}/")


def test_pyarrow_filesystem_writes_to_moto(s3_bucket: str) -> None:
    # Other modules may hand resolve()'s filesystem to pyarrow writers directly;
    # this also shows pyarrow finds the env credentials without help.
    fs, path = storage.resolve(f"s3://{s3_bucket}/direct/t.parquet")
    pq.write_table(pa.table({"x": [1, 2, 3]}), path, filesystem=fs)
    assert storage.read_parquet(f"s3://{s3_bucket}/direct/t.parquet")["x"].tolist() == [1, 2, 3]


# --------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------


def test_atomic_local_write_leaves_nothing_when_writer_fails(tmp_path) -> None:
    target = tmp_path / "out" / "table.parquet"
    storage.write_bytes(str(target), b"old complete content")
    with pytest.raises(RuntimeError):
        with storage.atomic_writer(str(target)) as handle:
            handle.write(b"half of the new")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old complete content"
    assert sorted(os.listdir(target.parent)) == ["table.parquet"]  # no temp file left behind


def test_atomic_parquet_write_failure(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_write_table(table, where, **kwargs):
        where.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(storage.pq, "write_table", broken_write_table)
    target = tmp_path / "t.parquet"
    with pytest.raises(OSError, match="disk full"):
        storage.write_parquet(str(target), pd.DataFrame({"x": [1]}))
    assert os.listdir(tmp_path) == []


def test_atomic_s3_write_failure_uploads_nothing(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/x.bin"
    with pytest.raises(RuntimeError):
        with storage.atomic_writer(uri) as handle:
            handle.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert not storage.exists(uri)


def test_atomic_write_keeps_umask_permissions(tmp_path) -> None:
    path = tmp_path / "m.json"
    storage.write_json(str(path), {})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# --------------------------------------------------------------------------
# fetch and the local cache
# --------------------------------------------------------------------------


def test_fetch_local_is_identity(tmp_path) -> None:
    path = tmp_path / "w.pt"
    path.write_bytes(b"w")
    assert storage.fetch(str(path)) == str(path)
    with pytest.raises(NotFoundError):
        storage.fetch(str(tmp_path / "missing.pt"))


def test_fetch_caches_object(s3_bucket: str, tmp_path, count_downloads: list[str]) -> None:
    uri = f"s3://{s3_bucket}/models/ckpt.pt"
    storage.write_bytes(uri, b"weights-v1" * 100)
    cache = str(tmp_path / "cache")

    first = storage.fetch(uri, cache_dir=cache)
    second = storage.fetch(uri, cache_dir=cache)
    assert first == second and first.startswith(cache) and first.endswith("ckpt.pt")
    assert open(first, "rb").read() == b"weights-v1" * 100
    assert count_downloads == ["models/ckpt.pt"]  # the second call was a cache hit
    meta = storage.read_json(first + ".meta.json")
    assert meta["size"] == 1000 and meta["sha256"] == storage.sha256_file(first)


def test_fetch_detects_corrupted_cache(s3_bucket: str, tmp_path, count_downloads: list[str]) -> None:
    uri = f"s3://{s3_bucket}/ckpt.pt"
    storage.write_bytes(uri, b"abcdef" * 10)
    local = storage.fetch(uri, cache_dir=str(tmp_path))
    with open(local, "r+b") as handle:  # same size, different bytes
        handle.write(b"X")
    assert storage.fetch(uri, cache_dir=str(tmp_path)) == local
    assert open(local, "rb").read() == b"abcdef" * 10
    assert len(count_downloads) == 2


def test_fetch_sees_remote_change(s3_bucket: str, tmp_path, count_downloads: list[str]) -> None:
    uri = f"s3://{s3_bucket}/ckpt.pt"
    storage.write_bytes(uri, b"v1")
    storage.fetch(uri, cache_dir=str(tmp_path))
    storage.write_bytes(uri, b"v2")  # same size, new ETag
    assert open(storage.fetch(uri, cache_dir=str(tmp_path)), "rb").read() == b"v2"
    assert len(count_downloads) == 2


def test_fetch_prefix_mirrors_directory(s3_bucket: str, tmp_path, count_downloads: list[str]) -> None:
    root = f"s3://{s3_bucket}/hf/vit-cifar10"
    files = {"config.json": b"{}", "model.safetensors": b"\x00" * 64, "sub/tok.txt": b"t"}
    for rel, data in files.items():
        storage.write_bytes(f"{root}/{rel}", data)
    storage.write_bytes(f"s3://{s3_bucket}/hf/vit-cifar10-other/x", b"not under the prefix")

    local = storage.fetch(root + "/", cache_dir=str(tmp_path))
    assert os.path.basename(local) == "vit-cifar10"
    found = {os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs}
    assert found == set(files)  # no sidecars or foreign objects inside the model folder
    assert len(count_downloads) == 3

    # With or without the trailing slash it is the same cache entry.
    assert storage.fetch(root, cache_dir=str(tmp_path)) == local

    count_downloads.clear()
    assert storage.fetch(root + "/", cache_dir=str(tmp_path)) == local
    assert count_downloads == []

    storage.delete_tree(f"{root}/sub")  # removed remotely -> pruned locally
    storage.fetch(root + "/", cache_dir=str(tmp_path))
    assert not os.path.exists(os.path.join(local, "sub", "tok.txt"))


def test_fetch_missing_object(s3_bucket: str, tmp_path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        storage.fetch(f"s3://{s3_bucket}/nothing/here.pt", cache_dir=str(tmp_path))


def test_fetch_concurrent_callers_download_once(s3_bucket: str, tmp_path, count_downloads: list[str]) -> None:
    uri = f"s3://{s3_bucket}/big.bin"
    storage.write_bytes(uri, os.urandom(1 << 20))
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(storage.fetch(uri, cache_dir=str(tmp_path))))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 3
    assert count_downloads == ["big.bin"]


def test_fetch_uses_env_cache_dir(s3_bucket: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DENSEPURE_CACHE", str(tmp_path / "envcache"))
    uri = f"s3://{s3_bucket}/f.txt"
    storage.write_bytes(uri, b"x")
    assert storage.fetch(uri).startswith(str(tmp_path / "envcache"))


# --------------------------------------------------------------------------
# check_access
# --------------------------------------------------------------------------


def test_check_access_ok(s3_server, s3_bucket: str, tmp_path) -> None:
    storage.check_access(f"s3://{s3_bucket}/runs/r1")
    assert storage.list_files(f"s3://{s3_bucket}/runs/r1", recursive=True) == []
    assert s3_server.client().list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0  # probe deleted
    storage.check_access(str(tmp_path / "new" / "dir"))
    assert os.listdir(tmp_path / "new" / "dir") == []


def test_check_access_missing_bucket(s3_server) -> None:
    with pytest.raises(UserError) as info:
        storage.check_access("s3://no-such-bucket-here/runs")
    message = str(info.value)
    assert "bucket 'no-such-bucket-here' does not exist" in message and "\n" not in message


def test_check_access_unreachable_endpoint_fails_fast(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "Sup3rSecretValueThatMustNotLeak"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    started = time.monotonic()
    with pytest.raises(UserError) as info:
        storage.check_access("s3://bucket/runs")
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert message.startswith("cannot reach S3 endpoint http://127.0.0.1:1")
    assert "AWS_ENDPOINT_URL" in message and "\n" not in message
    assert secret not in message and "testing" not in message


def test_check_access_without_credentials(s3_server, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(UserError, match="no usable AWS credentials"):
        storage.check_access("s3://bucket/runs")


def test_check_access_local_unwritable(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="file is a file, so .*/file/sub cannot be a folder") as info:
        storage.check_access(str(tmp_path / "file" / "sub"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "code, operation, message",
    [
        ("AccessDenied", "PutObject", "access denied (PutObject) on s3://bkt/runs"),
        ("403", "HeadBucket", "access denied (HeadBucket)"),
        ("InvalidAccessKeyId", "HeadBucket", "rejected the AWS credentials (InvalidAccessKeyId)"),
        ("NoSuchBucket", "PutObject", "bucket 'bkt' does not exist"),
        ("SlowDown", "PutObject", "S3 PutObject on s3://bkt/runs failed (SlowDown)"),
    ],
)
def test_s3_error_translation(code: str, operation: str, message: str) -> None:
    # moto does not enforce IAM, so denied requests are simulated at the botocore level.
    from botocore.exceptions import ClientError

    error = ClientError({"Error": {"Code": code, "Message": "x"}}, operation)
    translated = storage._s3_user_error(error, "s3://bkt/runs", storage.S3Settings(None, "us-east-1"))
    assert isinstance(translated, UserError) and message in str(translated)
    assert "\n" not in str(translated)
