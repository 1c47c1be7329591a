"""All of the Ray wiring: an elastic pool of ``CertifyWorker`` actors that runs work units.

The pool takes units from a ``UnitQueue`` that the driver may refill while it runs (sequential
rounds), hands each actor calls of several units with the same spec (so small units share
network batches, ``workers.engine.Engine.count_many``), keeps two calls in flight per actor,
starts with the GPUs present (or ``--workers N``), grows as nodes join, asks the autoscaler for
up to ``--max-workers`` GPUs, reschedules the in-flight units of an actor or node that died, and
fails the run with the underlying error when one unit fails the same way ``max_retries`` times
(``RetryPolicy``) or when no GPU worker can be placed for ``gpu_wait`` seconds.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError

from workers.contract import ModelSpec, UnitRecord, WorkUnit
from workers.errors import UserError, first_line, gist
from workers.worker import CertifyWorker

log = logging.getLogger(__name__)

# Calls queued per actor: one running, one waiting, so an actor never idles between calls.
_INFLIGHT_PER_ACTOR = 2
_TICK_SECONDS = 0.5
# How far down the queue a call looks for more units with the same spec.
_PACK_LOOKAHEAD = 512
MIN_CALL_DRAWS = 256
"""A call packs units of one spec up to max(--chunk, this) draws: small units (early sequential
rounds, tiny chunks) share a call and its network batches; big ones still run one per call."""
# Without --max-workers only an autoscaler reacting to pending actors could bring a GPU.
_GPU_WAIT_WITHOUT_AUTOSCALER = 30.0

__all__ = ["ElasticPool", "RetryPolicy", "UnitFailedError", "UnitQueue", "connect", "use_gpu_actors"]


class UnitFailedError(RuntimeError):
    """A unit failed the same way ``max_retries`` times: the run stops with that error."""


def _spec_of(unit: WorkUnit) -> tuple:
    return (unit.sigma, unit.method, unit.steps, unit.votes)


class UnitQueue:
    """Pending units, in the order they should run; the driver adds rounds while the pool runs."""

    def __init__(self, units: Iterable[WorkUnit] = ()):
        self._units: collections.deque[WorkUnit] = collections.deque(units)
        self._solo: set[str] = set()

    def __len__(self) -> int:
        return len(self._units)

    def extend(self, units: Iterable[WorkUnit]) -> None:
        self._units.extend(units)

    def put_front(self, units: Sequence[WorkUnit], solo: bool = False) -> None:
        """Units to run next (a group's next round, or units to retry); ``solo`` ones run one per
        call, so that a failure is charged to the unit that caused it."""
        if solo:
            self._solo.update(u.unit_id for u in units)
        self._units.extendleft(reversed(list(units)))

    def take(self, max_draws: int) -> list[WorkUnit]:
        """The next call: the first unit, then later units with the same spec while their draws
        fit in ``max_draws`` (one unit alone if it is bigger, or must run solo)."""
        if not self._units:
            return []
        first = self._units.popleft()
        call = [first]
        if first.unit_id in self._solo:
            return call
        draws = first.num_draws
        spec = _spec_of(first)
        kept: list[WorkUnit] = []
        for _ in range(min(_PACK_LOOKAHEAD, len(self._units))):
            if draws >= max_draws:
                break
            unit = self._units.popleft()
            if _spec_of(unit) == spec and unit.unit_id not in self._solo and draws + unit.num_draws <= max_draws:
                call.append(unit)
                draws += unit.num_draws
            else:
                kept.append(unit)
        self._units.extendleft(reversed(kept))
        return call


@dataclass
class RetryPolicy:
    """When to give up: pure bookkeeping of failures, no Ray.

    * a unit that fails with the same error ``max_retries`` times in a row (running alone) ends
      the run with that error; other failures are retried;
    * a call of several units that fails is retried one unit per call (``solo``), without
      charging anyone: only a unit running alone can be blamed;
    * a ``UserError`` (bad input found by a worker, e.g. non-finite purified images) ends the run
      at once, since retrying cannot fix it;
    * workers that keep dying before finishing anything (``max_retries`` per worker slot) end the
      run: they most likely cannot load the models or run out of memory.
    """

    max_retries: int = 3
    failures: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    startup_failures: int = 0

    def call_failed(self, units: Sequence[WorkUnit], cause: BaseException) -> None:
        """Raise to stop the run, or return to retry ``units``."""
        if isinstance(cause, UserError):
            raise cause
        if len(units) > 1:
            return
        unit = units[0]
        signature = f"{type(cause).__name__}: {gist(cause)}"
        history = self.failures[unit.unit_id]
        history.append(signature)
        if len(history) >= self.max_retries and len(set(history[-self.max_retries :])) == 1:
            raise UnitFailedError(f"unit {unit.unit_id} failed {len(history)} times with {signature}") from cause

    def worker_died(self, finished_anything: bool, slots: int, cause: BaseException) -> None:
        if finished_anything:
            self.startup_failures = 0
            return
        self.startup_failures += 1
        if self.startup_failures >= self.max_retries * max(1, slots):
            raise UnitFailedError(f"workers keep dying before finishing a unit: {first_line(cause)}") from cause


@dataclass
class _Actor:
    handle: Any
    inflight: set = field(default_factory=set)
    results: int = 0


def connect(address: str | None = None) -> None:
    """Connect to the Ray cluster at ``address`` or RAY_ADDRESS (``ray job submit`` sets it);
    with neither, start a private local instance on the loopback interface (a laptop run),
    without token authentication: it is reachable from this machine only."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return
    start_local()


def start_local(**options: Any) -> None:
    """Start a private Ray instance on this machine whose servers listen on 127.0.0.1 only.

    ``options`` go to ``ray.init`` (e.g. ``num_cpus``, ``_temp_dir``). Ray's token authentication
    (and its warning on every run) protects nothing on loopback, so it is off unless the
    environment says otherwise; real clusters keep their settings.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    options = {"logging_level": logging.WARNING, "include_dashboard": False, **options}
    with _loopback_only():
        ray.init(address="local", _node_ip_address="127.0.0.1", **options)


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Make the Ray instance started inside bind its servers to 127.0.0.1 only.

    Why: on Linux Ray replaces a 127.0.0.1 node address with the machine's routable one
    (``services.resolve_ip_for_localhost``), and then its GCS, raylet and workers listen on every
    interface, here with authentication off. Ray's single-node switch (multi-node clusters off,
    as on macOS and Windows) keeps the node address at 127.0.0.1, so every server binds loopback.
    The environment variable reaches the processes ray.init starts; this process reads the
    module constant at call time. Both are restored afterwards, so a later connection of the
    same process to a real cluster is unaffected.
    """
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


def use_gpu_actors(device: str, max_workers: int | None) -> bool:
    """GPU actors unless told ``cpu``: when the cluster has GPUs, the autoscaler is asked for them,
    or ``cuda`` was requested. A laptop without GPUs runs CPU actors instead."""
    if device == "cpu":
        return False
    if device == "cuda" or max_workers is not None:
        return True
    return ray.cluster_resources().get("GPU", 0) > 0


class ElasticPool:
    """Runs units on ``CertifyWorker`` actors; see the module docstring for the policy."""

    def __init__(
        self,
        spec: ModelSpec,
        workers: int | None = None,
        max_workers: int | None = None,
        max_retries: int = 3,
        gpu: bool | None = None,
        call_draws: int = 10_000,
        gpu_wait: float = 300.0,
    ):
        self.spec = spec
        self.fixed_workers = workers
        self.max_workers = max_workers
        self.policy = RetryPolicy(max_retries)
        self.call_draws = max(MIN_CALL_DRAWS, int(call_draws))
        self.gpu = use_gpu_actors(spec.device, max_workers) if gpu is None else gpu
        self.gpu_wait = gpu_wait if max_workers is not None else min(gpu_wait, _GPU_WAIT_WITHOUT_AUTOSCALER)
        resources = {"num_gpus": 1, "num_cpus": 1} if self.gpu else {"num_cpus": self._cpus_per_cpu_actor()}
        self._actor_cls = ray.remote(max_restarts=0, max_task_retries=0, **resources)(CertifyWorker)
        self._actors: dict[str, _Actor] = {}
        self._serial = 0
        self.peak_workers = 0
        if self.gpu and max_workers is not None:
            self._request_autoscaler(max_workers)

    # -- sizing ---------------------------------------------------------------------------

    def _cpus_per_cpu_actor(self) -> int:
        """CPUs one CPU actor reserves.

        Ray sets an actor's OMP_NUM_THREADS, and so PyTorch's thread count, to the CPUs it
        reserves. Without ``--workers`` the pool starts one single-CPU actor per CPU, which keeps
        every core busy; with a fixed worker count the actors share the CPUs instead (up to one
        node's worth, so that an actor can be placed): one single-CPU actor on a 2-core machine ran
        1 thread, at 0.70x the engine's speed (BENCHMARKS.md, "Actor threads").
        """
        if self.fixed_workers is None:
            return 1
        total = int(ray.cluster_resources().get("CPU", 1))
        per_node = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        return max(1, min(total // self.fixed_workers, max(per_node, default=1)))

    def _request_autoscaler(self, gpus: int) -> None:
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[{"GPU": 1, "CPU": 1}] * gpus)
        except Exception as exc:  # no autoscaler on a plain local cluster: nothing to ask
            log.debug("autoscaler request skipped: %s", exc)

    def target_workers(self) -> int:
        """How many actors to run now, from what the cluster offers at this moment."""
        key = "GPU" if self.gpu else "CPU"
        available = int(ray.cluster_resources().get(key, 0))
        if self.fixed_workers is not None:
            # A fixed count of GPU actors still needs the GPUs to place them.
            return min(self.fixed_workers, available) if self.gpu else self.fixed_workers
        if not self.gpu:
            available = max(1, available)
        if self.max_workers is not None:
            available = min(available, self.max_workers)
        return available

    def _scale(self) -> None:
        for _ in range(self.target_workers() - len(self._actors)):
            self._serial += 1
            self._actors[f"worker-{self._serial}"] = _Actor(self._actor_cls.remote(self.spec))
        self.peak_workers = max(self.peak_workers, len(self._actors))

    @property
    def num_workers(self) -> int:
        return len(self._actors)

    def _no_gpu_error(self) -> UserError:
        res = ray.cluster_resources()
        hint = "" if self.max_workers is not None else " (no --max-workers: nothing asks an autoscaler for GPUs)"
        return UserError(
            f"no GPU worker could be placed in {self.gpu_wait:.0f} s: the cluster has {int(res.get('GPU', 0))} GPUs and "
            f"{int(res.get('CPU', 0))} CPUs{hint}; pass --device cpu to run on CPUs, or add GPU nodes "
            "(cluster.yaml, --max-workers N)"
        )

    # -- running --------------------------------------------------------------------------

    def run(self, queue: UnitQueue, on_results: Callable[[list[UnitRecord]], None], on_tick: Callable[[], None] | None = None) -> None:
        """Run until ``queue`` is empty and nothing is in flight, calling ``on_results(records)`` as
        each call finishes; ``on_results`` may add units to ``queue``."""
        inflight: dict[Any, tuple[str, list[WorkUnit]]] = {}
        waiting_since = time.monotonic()
        try:
            while len(queue) or inflight:
                self._scale()
                for name, actor in self._actors.items():
                    while len(queue) and len(actor.inflight) < _INFLIGHT_PER_ACTOR:
                        call = queue.take(self.call_draws)
                        ref = actor.handle.run.remote(call)
                        actor.inflight.add(ref)
                        inflight[ref] = (name, call)
                if not inflight:
                    # Waiting for the autoscaler (or the user) to bring a node.
                    if self.gpu and time.monotonic() - waiting_since > self.gpu_wait:
                        raise self._no_gpu_error()
                    time.sleep(_TICK_SECONDS)
                    if on_tick:
                        on_tick()
                    continue
                waiting_since = time.monotonic()
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=_TICK_SECONDS)
                for ref in ready:
                    name, call = inflight.pop(ref)
                    actor = self._actors.get(name)
                    if actor is not None:
                        actor.inflight.discard(ref)
                    try:
                        records = ray.get(ref)
                    except RayActorError as exc:
                        self._lose_actor(name, exc, queue, inflight, call)
                        continue
                    except RayTaskError as exc:
                        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                        self.policy.call_failed(call, cause)
                        log.warning("units %s failed (%s); retrying", ", ".join(u.unit_id for u in call), gist(cause))
                        queue.put_front(call, solo=True)
                        continue
                    if actor is not None:
                        actor.results += 1
                    on_results(records)
                if on_tick:
                    on_tick()
        finally:
            self.shutdown()
            _settle(list(inflight))

    def _lose_actor(self, name: str, exc: Exception, queue: UnitQueue, inflight: dict, call: list[WorkUnit]) -> None:
        """An actor (or its node) died: requeue everything it held; a replacement comes at the next tick."""
        actor = self._actors.pop(name, None)
        requeue = list(call)
        if actor is not None:
            for ref in list(actor.inflight):
                requeue += inflight.pop(ref)[1]
            self.policy.worker_died(actor.results > 0, self.target_workers(), exc)
        log.warning("worker %s died (%s); rescheduling %d unit(s)", name, first_line(exc), len(requeue))
        queue.put_front(requeue)

    def shutdown(self) -> None:
        """Kill every actor (their in-flight calls fail; see ``_settle``)."""
        for actor in self._actors.values():
            try:
                ray.kill(actor.handle)
            except Exception:  # already dead
                pass
        self._actors.clear()


def _settle(refs: list[Any], timeout: float = 2.0) -> None:
    """Fetch and drop the errors of calls abandoned when a run ends early (an error, Ctrl-C), so
    that Ray does not print each one as an "Unhandled error" traceback after the run's own
    one-line message."""
    if not refs:
        return
    with contextlib.suppress(Exception):
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for ref in done:
            with contextlib.suppress(Exception):
                ray.get(ref)
