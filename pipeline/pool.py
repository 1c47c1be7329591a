"""All of the Ray wiring: an elastic pool of ``CertifyWorker`` actors that runs work units.

The pool starts with the GPUs present (or ``--workers N``), grows as nodes join, asks the
autoscaler for up to ``--max-workers`` GPUs, reschedules the in-flight units of an actor or node
that died, and fails the run with the underlying error when one unit fails the same way
``max_retries`` times. Results go to a callback (the aggregator) on the driver, one per unit.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError

from workers.contract import ModelSpec, UnitRecord, WorkUnit
from workers.errors import UserError, first_line
from workers.worker import CertifyWorker

log = logging.getLogger(__name__)

# Units queued per actor: one running, one waiting, so an actor never idles between units.
_INFLIGHT_PER_ACTOR = 2
_TICK_SECONDS = 0.5


class UnitFailedError(RuntimeError):
    """A unit failed the same way ``max_retries`` times: the run stops with that error."""


@dataclass
class _Actor:
    handle: Any
    inflight: set = field(default_factory=set)
    results: int = 0


def connect(address: str | None = None) -> None:
    """Connect to the Ray cluster at ``address`` or RAY_ADDRESS (``ray job submit`` sets it);
    with neither, start a private local instance on the loopback interface (a laptop run)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", logging_level=logging.WARNING, include_dashboard=False)


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
    ):
        self.spec = spec
        self.fixed_workers = workers
        self.max_workers = max_workers
        self.max_retries = max_retries
        self.gpu = use_gpu_actors(spec.device, max_workers) if gpu is None else gpu
        resources = {"num_gpus": 1, "num_cpus": 1} if self.gpu else {"num_cpus": self._cpus_per_cpu_actor()}
        self._actor_cls = ray.remote(max_restarts=0, max_task_retries=0, **resources)(CertifyWorker)
        self._actors: dict[str, _Actor] = {}
        self._serial = 0
        self._startup_failures = 0
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
        if self.fixed_workers is not None:
            return self.fixed_workers
        key = "GPU" if self.gpu else "CPU"
        available = int(ray.cluster_resources().get(key, 0))
        if not self.gpu:
            available = max(1, available)
        if self.max_workers is not None:
            available = min(available, self.max_workers)
        return available

    def _scale(self) -> None:
        for _ in range(self.target_workers() - len(self._actors)):
            self._serial += 1
            name = f"worker-{self._serial}"
            self._actors[name] = _Actor(self._actor_cls.options(name=None).remote(self.spec))
        self.peak_workers = max(self.peak_workers, len(self._actors))

    @property
    def num_workers(self) -> int:
        return len(self._actors)

    # -- running --------------------------------------------------------------------------

    def run(self, units: Sequence[WorkUnit], on_result: Callable[[UnitRecord], None], on_tick: Callable[[], None] | None = None) -> None:
        """Run every unit once to completion, calling ``on_result(record)`` as each finishes."""
        pending: collections.deque[WorkUnit] = collections.deque(units)
        inflight: dict[Any, tuple[str, WorkUnit]] = {}
        failures: dict[str, list[str]] = collections.defaultdict(list)
        try:
            while pending or inflight:
                self._scale()
                for name, actor in self._actors.items():
                    while pending and len(actor.inflight) < _INFLIGHT_PER_ACTOR:
                        unit = pending.popleft()
                        ref = actor.handle.run.remote(unit)
                        actor.inflight.add(ref)
                        inflight[ref] = (name, unit)
                if not inflight:
                    time.sleep(_TICK_SECONDS)  # waiting for the autoscaler to bring a node
                    if on_tick:
                        on_tick()
                    continue
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=_TICK_SECONDS)
                for ref in ready:
                    name, unit = inflight.pop(ref)
                    actor = self._actors.get(name)
                    if actor is not None:
                        actor.inflight.discard(ref)
                    try:
                        record = ray.get(ref)
                    except RayActorError as exc:
                        self._lose_actor(name, exc, pending, inflight, unit)
                        continue
                    except RayTaskError as exc:
                        self._unit_failed(unit, exc, failures)
                        pending.appendleft(unit)
                        continue
                    if actor is not None:
                        actor.results += 1
                    on_result(record)
                if on_tick:
                    on_tick()
        finally:
            self.shutdown()

    def _lose_actor(self, name: str, exc: Exception, pending: collections.deque, inflight: dict, unit: WorkUnit) -> None:
        """An actor (or its node) died: requeue everything it held; a replacement comes at the next tick."""
        actor = self._actors.pop(name, None)
        requeue = [unit]
        if actor is not None:
            for ref in list(actor.inflight):
                requeue.append(inflight.pop(ref)[1])
            if actor.results == 0:
                # Died before finishing anything: most likely it cannot start (bad model, OOM).
                self._startup_failures += 1
                if self._startup_failures >= self.max_retries * max(1, self.target_workers()):
                    raise UnitFailedError(f"workers keep dying before finishing a unit: {first_line(exc)}") from exc
            else:
                self._startup_failures = 0
        log.warning("worker %s died (%s); rescheduling %d unit(s)", name, first_line(exc), len(requeue))
        pending.extendleft(reversed(requeue))

    def _unit_failed(self, unit: WorkUnit, exc: RayTaskError, failures: dict[str, list[str]]) -> None:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        if isinstance(cause, UserError):
            raise cause
        signature = f"{type(cause).__name__}: {cause}"
        failures[unit.unit_id].append(signature)
        history = failures[unit.unit_id]
        if len(history) >= self.max_retries and len(set(history[-self.max_retries :])) == 1:
            raise UnitFailedError(f"unit {unit.unit_id} failed {len(history)} times with {signature}") from cause
        log.warning("unit %s failed (%s); retrying", unit.unit_id, signature)

    def shutdown(self) -> None:
        for actor in self._actors.values():
            try:
                ray.kill(actor.handle)
            except Exception:  # already dead
                pass
        self._actors.clear()


