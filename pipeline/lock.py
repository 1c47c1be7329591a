"""The run lease (``RUN/lock.json``): one writer per run folder, local or on S3.

A driver that writes a run folder first takes its lease: an object naming the holder (host, pid,
run id, a random token, started_at) with a heartbeat time that the holder renews from a daemon
thread every ``stale_after_s / 4`` seconds. What is guaranteed:

* **One winner.** The lease is created with a conditional create and renewed, taken over and
  released with compare-and-swap on its version (S3 ``If-None-Match: *`` / ``If-Match: ETAG``;
  locally ``os.link`` and a guarded compare, see ``workers.storage``): of several drivers that
  race for a folder, exactly one gets it, and a holder can never overwrite or delete a lease
  that another driver has taken since.
* **Live holders are not disturbed.** A lease whose heartbeat is younger than ``stale_after_s``
  (or than the holder's own, if larger) is refused with a one-line :class:`LeaseHeldError` that
  names the holder; only a stale lease (its driver died, e.g. SIGKILL or a lost node) or
  ``force=True`` takes it over.
* **A holder learns that it lost the lease** -- another driver took it over, or it could not
  renew for ``stale_after_s`` (so another may have) -- through :attr:`RunLock.lost` and
  :meth:`RunLock.check`, and must then stop writing the folder.

Heartbeats are wall-clock times of the writer, compared with the reader's clock: hosts that share
a run folder need clocks within a small fraction of ``stale_after_s`` of each other (NTP gives
milliseconds; the default ``stale_after_s`` is two minutes).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal

from workers import storage
from workers.errors import UserError, first_line

__all__ = [
    "DEFAULT_STALE_AFTER_S",
    "LOCK",
    "Holder",
    "LeaseHeldError",
    "LeaseInfo",
    "LeaseLostError",
    "RunLock",
    "lease_state",
]

LOCK = "lock.json"
LOCK_FORMAT = "densepure-lock"
DEFAULT_STALE_AFTER_S = 120.0
"""Long against a renewal period of 30 s and an S3 retry budget of about a minute, short against a
lost driver's cost: a folder whose driver was killed can be resumed two minutes later."""

LeaseState = Literal["none", "held", "stale"]


class LeaseHeldError(UserError):
    """The run folder is held by a live driver."""


class LeaseLostError(UserError):
    """This driver no longer holds the lease of its run folder and must stop writing it."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or asks for) a lease."""

    host: str
    pid: int
    run_id: str
    boot: str = ""
    """The host's boot id: with the host name, tells that a lease was taken on this very machine
    since it booted, so that its process can be checked directly."""

    @classmethod
    def current(cls, run_id: str) -> "Holder":
        """This process."""
        return cls(host=socket.gethostname(), pid=os.getpid(), run_id=run_id, boot=boot_id())


def boot_id() -> str:
    """This machine's boot id (Linux), or "" where there is none."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@dataclass(frozen=True)
class LeaseInfo:
    """The content of ``lock.json``."""

    host: str
    pid: int
    run_id: str
    token: str
    started_at: float
    heartbeat_at: float
    stale_after_s: float
    format: str = LOCK_FORMAT
    boot: str = ""

    def holder_gone(self) -> bool:
        """The holder ran on this machine, since its last boot, and its process has exited (a
        killed driver resubmitted on the same head node): its lease protects nothing any more.
        Conservative: any doubt (another machine, no boot id, the pid reused) counts as alive."""
        return bool(self.boot) and self.boot == boot_id() and self.host == socket.gethostname() and not _process_alive(self.pid)

    def age(self, now: float | None = None) -> float:
        """Seconds since the last heartbeat (never negative, whatever the clocks say)."""
        return max((time.time() if now is None else now) - self.heartbeat_at, 0.0)

    def is_stale(self, stale_after_s: float | None = None, now: float | None = None) -> bool:
        """Not renewed for ``stale_after_s`` nor for the holder's own promise, whichever is longer
        (a reader with a shorter setting must not take over from a holder that renews slowly)."""
        limit = max(stale_after_s or 0.0, self.stale_after_s)
        return self.age(now) > limit

    def describe(self, now: float | None = None) -> str:
        """``host:pid (run abc, heartbeat 12 s ago)``."""
        return f"{self.host}:{self.pid} (run {self.run_id}, heartbeat {self.age(now):.0f} s ago)"

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LeaseInfo | None":
        """The lease in ``data``; None when it is not one of ours (damaged, foreign)."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != LOCK_FORMAT:
                return None
            return cls(
                host=str(doc["host"]), pid=int(doc["pid"]), run_id=str(doc["run_id"]), token=str(doc["token"]),
                started_at=float(doc["started_at"]), heartbeat_at=float(doc["heartbeat_at"]),
                stale_after_s=float(doc["stale_after_s"]), boot=str(doc.get("boot", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None


def lock_uri(run_uri: str) -> str:
    return storage.join(run_uri, LOCK)


def lease_state(run_uri: str, stale_after_s: float | None = None) -> tuple[LeaseState, LeaseInfo | None]:
    """Whether the run folder's lease is ``held`` (heartbeat fresh), ``stale`` or absent (``none``).

    A damaged ``lock.json`` (not a lease of ours) counts as ``stale`` with no info: nobody can be
    renewing it. ``stale_after_s`` defaults to the holder's own setting, written in the lease.
    """
    current = storage.read_versioned(lock_uri(run_uri))
    if current is None:
        return "none", None
    info = LeaseInfo.from_bytes(current.data)
    if info is None:
        return "stale", None
    return ("stale" if info.is_stale(stale_after_s) or info.holder_gone() else "held"), info


class RunLock:
    """A lease on one run folder held by this process; see the module docstring.

    Use :meth:`acquire` (or ``with RunLock.acquire(...) as lock:``); the heartbeat thread starts
    at once and :meth:`release` (also on leaving the ``with`` block) stops it and deletes the
    lease if it is still ours.
    """

    def __init__(
        self,
        run_uri: str,
        holder: Holder,
        stale_after_s: float,
        info: LeaseInfo,
        version: str,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.run_uri = run_uri
        self.uri = lock_uri(run_uri)
        self.holder = holder
        self.stale_after_s = float(stale_after_s)
        self.interval_s = self.stale_after_s / 4
        self.on_lost = on_lost
        self._info = info
        self._data = info.to_bytes()
        self._version = version
        self._last_renewed = time.monotonic()
        self._lost_reason: str | None = None
        self._released = False
        self._mutex = threading.Lock()  # one renewal or release at a time
        self._lost_lock = threading.Lock()  # separate, so that check() never waits on a slow renewal
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking the lease -------------------------------------------------------------------

    @classmethod
    def acquire(
        cls,
        run_uri: str,
        holder: Holder,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        force: bool = False,
        log: Callable[[str], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
        heartbeat: bool = True,
    ) -> "RunLock":
        """Take the lease of ``run_uri`` and start renewing it.

        Refuses a live holder's lease with :class:`LeaseHeldError` (one line naming it) unless
        ``force``; takes over a stale or damaged one (saying so through ``log``). ``on_lost`` is
        called once, from the heartbeat thread, with the reason, if the lease is lost later.
        ``heartbeat=False`` leaves renewal to the caller (:meth:`renew`; tests).
        """
        if stale_after_s <= 0:
            raise UserError(f"stale_after_s must be > 0 (got {stale_after_s}); use e.g. {DEFAULT_STALE_AFTER_S:g}")
        uri = lock_uri(run_uri)
        now = time.time()
        info = LeaseInfo(
            host=holder.host, pid=holder.pid, run_id=holder.run_id, token=uuid.uuid4().hex, boot=holder.boot,
            started_at=now, heartbeat_at=now, stale_after_s=float(stale_after_s),
        )
        data = info.to_bytes()
        # A few rounds: each one either wins, refuses, or saw the lease change under it (another
        # acquirer won a race or released), in which case it looks again.
        for _ in range(8):
            current = storage.read_versioned(uri)
            if current is None:
                version = storage.create_exclusive(uri, data)
            else:
                previous = LeaseInfo.from_bytes(current.data)
                if previous is not None and not previous.is_stale(stale_after_s) and not previous.holder_gone() and not force:
                    raise LeaseHeldError(
                        f"{run_uri} is held by {previous.describe()}; wait for it to finish, "
                        "or pass --force-unlock once it is gone"
                    )
                version = storage.replace_if_match(uri, data, current.version)
                if version is not None and log is not None:
                    what = "a damaged lease" if previous is None else (
                        f"the {'stale' if previous.is_stale(stale_after_s) else 'orphaned' if previous.holder_gone() else 'live'} "
                        f"lease of {previous.describe()}" + (" (its process has exited)" if previous.holder_gone() else "")
                    )
                    log(f"took over {what} on {run_uri}")
            if version is None:
                version = _ours_after_all(uri, data)
            if version is not None:
                lock = cls(run_uri, holder, stale_after_s, info, version, on_lost)
                if heartbeat:
                    lock.start()
                return lock
        raise UserError(f"could not take the lease of {run_uri}: it kept changing under us; try again")

    # -- renewal ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the daemon thread that renews the lease every ``stale_after_s / 4`` seconds."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.run_uri}", daemon=True)
            self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.renew():
                return

    def renew(self) -> bool:
        """Write a fresh heartbeat; False (and :attr:`lost` set) once the lease is no longer ours.

        A transient failure (S3 unreachable past its retries) is not a loss by itself; going
        ``stale_after_s`` without a successful renewal is, since another driver may then have
        taken over.
        """
        with self._mutex:
            if self._lost_reason is not None or self._released:
                return False
            info = LeaseInfo(**{**asdict(self._info), "heartbeat_at": time.time()})
            data = info.to_bytes()
            try:
                version = storage.replace_if_match(self.uri, data, self._version)
                if version is None:
                    version = _ours_after_all(self.uri, data)
                    if version is None:
                        current = storage.read_versioned(self.uri)
                        other = LeaseInfo.from_bytes(current.data) if current is not None else None
                        reason = (
                            f"the lease of {self.run_uri} was taken over by {other.describe()}" if other is not None
                            else f"the lease of {self.run_uri} was deleted by someone else"
                        )
                        self._lose(reason)
                        return False
            except Exception as exc:  # noqa: BLE001 -- any failure to renew is handled the same way
                silent = time.monotonic() - self._last_renewed
                if silent >= self.stale_after_s:
                    self._lose(f"could not renew the lease of {self.run_uri} for {silent:.0f} s ({first_line(exc)})")
                    return False
                return True
            self._info, self._data, self._version = info, data, version
            self._last_renewed = time.monotonic()
            return True

    def set_run_id(self, run_id: str) -> None:
        """Name the run in the lease (once the driver knows it) and renew at once."""
        with self._mutex:
            self._info = LeaseInfo(**{**asdict(self._info), "run_id": run_id})
            self.holder = Holder(self.holder.host, self.holder.pid, run_id, self.holder.boot)
        if not self.renew():
            self.check()

    def _lose(self, reason: str) -> None:
        with self._lost_lock:
            if self._lost_reason is not None:
                return
            self._lost_reason = reason
        self._stop.set()
        if self.on_lost is not None:
            try:
                self.on_lost(reason)
            except Exception:  # noqa: BLE001 -- a callback must not kill the heartbeat thread silently
                pass

    # -- the holder's view ------------------------------------------------------------------

    @property
    def lost(self) -> bool:
        """True once the lease is no longer (provably) ours."""
        if self._lost_reason is None and not self._released:
            silent = time.monotonic() - self._last_renewed
            if silent >= self.stale_after_s:
                # The heartbeat thread is stuck (or not running): others see the lease as stale.
                self._lose(f"the lease of {self.run_uri} was not renewed for {silent:.0f} s")
        return self._lost_reason is not None

    @property
    def lost_reason(self) -> str | None:
        return self._lost_reason if self.lost else None

    @property
    def info(self) -> LeaseInfo:
        return self._info

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if the lease is lost: call before every write to the folder."""
        if self.lost:
            raise LeaseLostError(
                f"{self._lost_reason}; this driver stopped writing the run folder; "
                "check which driver is running it with status"
            )

    # -- letting go -------------------------------------------------------------------------

    def release(self) -> bool:
        """Stop renewing and delete the lease if it is still ours; True when it was deleted.

        Never deletes a lease that another driver holds now.
        """
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        with self._mutex:
            if self._released:
                return False
            self._released = True
            if self._lost_reason is not None:
                return False
            if storage.delete_if_match(self.uri, self._version):
                return True
            # Our last renewal may have landed with its answer lost: then the object is ours still.
            current = storage.read_versioned(self.uri)
            info = LeaseInfo.from_bytes(current.data) if current is not None else None
            if current is not None and info is not None and info.token == self._info.token:
                return storage.delete_if_match(self.uri, current.version)
            return False

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _ours_after_all(uri: str, data: bytes) -> str | None:
    """The version of ``uri`` if it holds exactly ``data`` (a write of ours whose answer was lost:
    botocore's retry of it then sees a failed precondition); None otherwise. ``data`` carries a
    random token and a timestamp, so no other writer produces the same bytes."""
    current = storage.read_versioned(uri)
    if current is not None and current.data == data:
        return current.version
    return None
