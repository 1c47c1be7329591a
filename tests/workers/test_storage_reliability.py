"""workers.storage: conditional writes, moves and deletions, retries of transient S3 failures, and
one-line errors for an output location that is a file. Local and on a real (moto) S3 server."""

from __future__ import annotations

import os

import threading

import pyarrow as pa
import pytest

from tests.fixtures.s3 import FlakyProxy, S3Server
from workers import storage
from workers.errors import NotFoundError, UserError


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.system)])
def base(request: pytest.FixtureRequest, tmp_path) -> str:
    """A writable root: a local folder or a fresh S3 bucket prefix."""
    if request.param == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/root"


# --------------------------------------------------------------------------
# Conditional writes
# --------------------------------------------------------------------------


def test_create_exclusive_replace_delete(base: str) -> None:
    uri = storage.join(base, "lease.json")
    assert storage.read_versioned(uri) is None
    v1 = storage.create_exclusive(uri, b"one")
    assert v1 and storage.read_versioned(uri) == storage.Versioned(b"one", v1)
    assert storage.create_exclusive(uri, b"two") is None  # exists: refused, content kept
    assert storage.read_versioned(uri).data == b"one"

    assert storage.replace_if_match(uri, b"three", "not-the-version") is None
    v3 = storage.replace_if_match(uri, b"three", v1)
    assert v3 and v3 != v1 and storage.read_versioned(uri).data == b"three"
    assert storage.replace_if_match(uri, b"four", v1) is None  # v1 is history now

    assert storage.delete_if_match(uri, v1) is False
    assert storage.read_versioned(uri).data == b"three"
    assert storage.delete_if_match(uri, v3) is True
    assert storage.read_versioned(uri) is None
    assert storage.replace_if_match(uri, b"five", v3) is None  # gone: nothing to replace
    assert storage.delete_if_match(uri, v3) is False
    assert storage.list_files(base) == []
    if not storage.is_s3(base):  # no lock or guard file is left beside the object, hidden or not
        assert os.listdir(storage._local_path(base)) == []


def test_create_exclusive_race_has_one_winner(base: str) -> None:
    uri = storage.join(base, "race.json")
    storage.makedirs(base)
    barrier = threading.Barrier(8)
    won: list[int] = []

    def contend(i: int) -> None:
        barrier.wait()
        if storage.create_exclusive(uri, f"writer {i}".encode()):
            won.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert storage.read_versioned(uri).data == f"writer {won[0]}".encode()


def test_replace_if_match_race_has_one_winner(base: str) -> None:
    uri = storage.join(base, "cas.json")
    version = storage.create_exclusive(uri, b"start")
    barrier = threading.Barrier(8)
    won: list[int] = []

    def contend(i: int) -> None:
        barrier.wait()
        if storage.replace_if_match(uri, f"writer {i}".encode(), version):
            won.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert storage.read_versioned(uri).data == f"writer {won[0]}".encode()


def test_move_delete_files_and_sizes(base: str) -> None:
    a, b = storage.join(base, "a.bin"), storage.join(base, "sub", "b.bin")
    storage.write_bytes(a, b"12345")
    storage.write_bytes(storage.join(base, ".hidden"), b"x")
    entries = storage.list_entries(base)
    assert [(e.name, e.size) for e in entries] == [("a.bin", 5)]
    assert ".hidden" in [e.name for e in storage.list_entries(base, include_hidden=True)]
    storage.move(a, b)
    assert not storage.exists(a) and storage.read_bytes(b) == b"12345"
    with pytest.raises(NotFoundError):
        storage.move(a, b)
    storage.delete_files([b, storage.join(base, "never-existed.bin")])
    assert not storage.exists(b)


# --------------------------------------------------------------------------
# Output location that is a file
# --------------------------------------------------------------------------


def test_check_access_on_a_file_is_one_line(tmp_path) -> None:
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    with pytest.raises(UserError, match=r"results.txt is a file, not a folder; pass a folder") as info:
        storage.check_access(str(target))
    assert "File exists" not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"results.txt is a file, so .*/run cannot be a folder"):
        storage.check_access(str(target / "run"))
    assert target.read_text() == "not a folder"


# --------------------------------------------------------------------------
# Retries: every kind of request meets 503 then a reset connection, and succeeds
# --------------------------------------------------------------------------


def test_s3_requests_survive_transient_failures(flaky_s3: FlakyProxy, s3_server: S3Server) -> None:
    bucket = s3_server.make_bucket()
    root = f"s3://{bucket}/flaky"

    # A write (boto3 PutObject).
    storage.write_bytes(f"{root}/a.bin", b"payload")
    assert flaky_s3.failures_for("PUT", "/a.bin") == 2
    assert s3_server.client().get_object(Bucket=bucket, Key="flaky/a.bin")["Body"].read() == b"payload"

    # A read (pyarrow) and a Parquet read (pyarrow).
    assert storage.read_bytes(f"{root}/a.bin") == b"payload"
    assert flaky_s3.failures_for("GET", "/a.bin") >= 2
    storage.write_parquet(f"{root}/t.parquet", pa.table({"x": [1, 2, 3]}))
    assert storage.read_parquet(f"{root}/t.parquet")["x"].tolist() == [1, 2, 3]

    # A listing (pyarrow ListObjectsV2).
    assert storage.list_files(root) == [f"{root}/a.bin", f"{root}/t.parquet"]
    assert flaky_s3.failures_for("GET", "list-type=2") >= 2

    # A fetch into the local cache (boto3 HeadObject + GetObject).
    local = storage.fetch(f"{root}/a.bin")
    assert open(local, "rb").read() == b"payload"
    assert flaky_s3.failures_for("HEAD", "/a.bin") == 2

    # Conditional writes (the lease) retry too.
    version = storage.create_exclusive(f"{root}/lock.json", b"mine")
    assert version and flaky_s3.failures_for("PUT", "/lock.json") == 2
    assert storage.read_versioned(f"{root}/lock.json").data == b"mine"


def test_s3_without_retries_the_proxy_does_fail(
    flaky_s3: FlakyProxy, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: with a single attempt the same write fails, so the test above proves retries."""
    bucket = s3_server.make_bucket()
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 1)
    monkeypatch.setattr(storage, "_CLIENTS", {})
    monkeypatch.setattr(storage, "_FILESYSTEMS", {})
    with pytest.raises(UserError, match="ServiceUnavailable|503|cannot reach S3"):
        storage.write_bytes(f"s3://{bucket}/a.bin", b"payload")
    with pytest.raises(OSError):
        storage.list_files(f"s3://{bucket}/")
