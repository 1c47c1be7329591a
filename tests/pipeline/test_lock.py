"""pipeline.lock: the run lease, on a local folder and on a real (moto) S3 server."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pipeline.lock import (
    Holder,
    LeaseHeldError,
    LeaseInfo,
    LeaseLostError,
    RunLock,
    lease_state,
    lock_uri,
)
from workers import storage


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.system)])
def run_uri(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/r1"


def holder(name: str) -> Holder:
    return Holder(host=f"host-{name}", pid=1000 + len(name), run_id=f"run-{name}")


def write_lease(run_uri: str, age_s: float, stale_after_s: float = 60.0, name: str = "old") -> None:
    """A lease written by another driver whose last heartbeat was ``age_s`` seconds ago."""
    now = time.time()
    info = LeaseInfo(host=f"host-{name}", pid=77, run_id=f"run-{name}", token="f" * 32,
                     started_at=now - age_s - 10, heartbeat_at=now - age_s, stale_after_s=stale_after_s)
    storage.write_bytes(lock_uri(run_uri), info.to_bytes())


def current(run_uri: str) -> LeaseInfo | None:
    found = storage.read_versioned(lock_uri(run_uri))
    return LeaseInfo.from_bytes(found.data) if found else None


def test_acquire_release_roundtrip(run_uri: str) -> None:
    assert lease_state(run_uri) == ("none", None)
    lock = RunLock.acquire(run_uri, holder("a"), stale_after_s=60, heartbeat=False)
    state, info = lease_state(run_uri)
    assert state == "held" and info is not None
    assert (info.host, info.pid, info.run_id, info.stale_after_s) == ("host-a", 1001, "run-a", 60.0)
    assert len(info.token) == 32 and info.heartbeat_at >= info.started_at
    assert lock.release() is True
    assert lease_state(run_uri) == ("none", None)
    assert lock.release() is False  # twice is harmless


def test_two_acquirers_racing_exactly_one_wins(run_uri: str) -> None:
    barrier = threading.Barrier(6)
    won: list[RunLock] = []
    refused: list[str] = []

    def contend(i: int) -> None:
        barrier.wait()
        try:
            won.append(RunLock.acquire(run_uri, holder(f"n{i}"), stale_after_s=60, heartbeat=False))
        except LeaseHeldError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    assert current(run_uri).token == won[0].info.token
    winner = won[0].holder
    for message in refused:
        assert f"is held by {winner.host}:{winner.pid} (run {winner.run_id}, heartbeat" in message
        assert message.endswith("wait for it to finish, or pass --force-unlock once it is gone")
    won[0].release()


def test_fresh_lease_is_refused_with_one_line(run_uri: str) -> None:
    write_lease(run_uri, age_s=12)
    with pytest.raises(LeaseHeldError) as info:
        RunLock.acquire(run_uri, holder("b"), stale_after_s=60, heartbeat=False)
    message = str(info.value)
    assert "\n" not in message
    assert "is held by host-old:77 (run run-old, heartbeat 12 s ago)" in message
    assert current(run_uri).token == "f" * 32  # untouched


def test_stale_lease_is_taken_over(run_uri: str) -> None:
    write_lease(run_uri, age_s=90, stale_after_s=60)
    assert lease_state(run_uri)[0] == "stale"
    logged: list[str] = []
    lock = RunLock.acquire(run_uri, holder("b"), stale_after_s=60, heartbeat=False, log=logged.append)
    assert current(run_uri).token == lock.info.token
    assert logged and "took over the stale lease of host-old:77" in logged[0]
    lock.release()


def test_holder_promise_wins_over_a_shorter_setting(run_uri: str) -> None:
    """A holder that renews every 300/4 s is not stale to a reader configured with 60 s."""
    write_lease(run_uri, age_s=90, stale_after_s=300)
    assert lease_state(run_uri, stale_after_s=60)[0] == "held"
    with pytest.raises(LeaseHeldError):
        RunLock.acquire(run_uri, holder("b"), stale_after_s=60, heartbeat=False)


def test_damaged_lease_is_taken_over(run_uri: str) -> None:
    storage.write_bytes(lock_uri(run_uri), b"{not json")
    assert lease_state(run_uri) == ("stale", None)
    lock = RunLock.acquire(run_uri, holder("b"), stale_after_s=60, heartbeat=False)
    assert current(run_uri).token == lock.info.token
    lock.release()


def test_force_takes_a_live_lease_and_the_old_holder_notices(run_uri: str) -> None:
    first = RunLock.acquire(run_uri, holder("a"), stale_after_s=60, heartbeat=False)
    second = RunLock.acquire(run_uri, holder("b"), stale_after_s=60, force=True, heartbeat=False)
    assert current(run_uri).token == second.info.token
    assert first.renew() is False and first.lost
    assert "taken over by host-b:1001 (run run-b" in first.lost_reason
    with pytest.raises(LeaseLostError, match="this driver stopped writing the run folder"):
        first.check()
    # Releasing the lost lease must not delete the new holder's.
    assert first.release() is False
    assert current(run_uri).token == second.info.token
    second.check()
    assert second.release() is True


def test_release_deletes_only_our_own(run_uri: str) -> None:
    lock = RunLock.acquire(run_uri, holder("a"), stale_after_s=60, heartbeat=False)
    write_lease(run_uri, age_s=0, name="intruder")  # replaced behind our back
    assert lock.release() is False
    assert current(run_uri).host == "host-intruder"


def test_heartbeat_renews_from_a_thread(run_uri: str) -> None:
    lost: list[str] = []
    lock = RunLock.acquire(run_uri, holder("a"), stale_after_s=0.8, on_lost=lost.append)
    first = current(run_uri).heartbeat_at
    time.sleep(1.5)  # about 7 renewal periods of 0.2 s, longer than stale_after_s
    later = current(run_uri)
    assert later.heartbeat_at > first and later.token == lock.info.token
    assert lease_state(run_uri)[0] == "held" and not lock.lost and not lost
    lock.check()
    # Another driver forces its way in: the heartbeat thread notices and reports it once.
    other = RunLock.acquire(run_uri, holder("b"), stale_after_s=60, force=True, heartbeat=False)
    deadline = time.time() + 5
    while not lost and time.time() < deadline:
        time.sleep(0.05)
    assert len(lost) == 1 and "taken over by host-b" in lost[0]
    assert lock.lost
    lock.release()
    assert current(run_uri).token == other.info.token
    other.release()


def test_a_holder_that_cannot_renew_counts_itself_lost(run_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = RunLock.acquire(run_uri, holder("a"), stale_after_s=0.3, heartbeat=False)

    def unreachable(*args, **kwargs):
        raise OSError("endpoint unreachable")

    monkeypatch.setattr(storage, "replace_if_match", unreachable)
    assert lock.renew() is True  # a transient failure is not a loss by itself...
    time.sleep(0.35)
    assert lock.renew() is False and lock.lost  # ...but going stale_after_s without renewal is
    assert "could not renew" in lock.lost_reason and "endpoint unreachable" in lock.lost_reason


def test_set_run_id_is_written(run_uri: str) -> None:
    lock = RunLock.acquire(run_uri, holder("a"), stale_after_s=60, heartbeat=False)
    lock.set_run_id("abc123")
    assert current(run_uri).run_id == "abc123"
    assert json.loads(storage.read_bytes(lock_uri(run_uri)))["format"] == "densepure-lock"
    lock.release()


def test_context_manager_releases(run_uri: str) -> None:
    with RunLock.acquire(run_uri, holder("a"), stale_after_s=60):
        assert lease_state(run_uri)[0] == "held"
    assert lease_state(run_uri)[0] == "none"


def test_a_lease_whose_process_has_exited_on_this_machine_is_taken_over(tmp_path):
    """A driver SIGKILLed and resubmitted on the same node need not wait for the lease to go stale."""
    import subprocess
    import sys

    from pipeline.lock import Holder, RunLock, lease_state

    run = str(tmp_path / "run")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    me = Holder.current("first")
    first = RunLock.acquire(run, Holder(me.host, pid, "first", me.boot), stale_after_s=600, heartbeat=False)
    assert lease_state(run)[0] == "stale"
    messages: list[str] = []
    second = RunLock.acquire(run, Holder.current("second"), stale_after_s=600, log=messages.append, heartbeat=False)
    assert any("process has exited" in m for m in messages)
    assert second.release()
    assert not first.release()  # not ours any more: nothing deleted
