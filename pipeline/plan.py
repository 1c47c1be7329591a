"""Planning: the run as deterministic, seeded work units (``workers.contract.WorkUnit``), in rounds.

A unit is (image, sigma, method, phase, draws [start, start + num_draws)); its draws' seeds are a
pure function of those numbers (``workers/seeds.py``), so the plan can be recomputed on resume and
any unit can run anywhere, any number of times, with the same result.

Every (image, sigma, method) is a *group*: n0 selection draws, then estimation draws in rounds
that end at the looks of its schedule. Fixed sampling has one look, at n: the group is all of its
units at once. Sequential sampling has the geometric looks of ``pipeline.sequential``; when a
round's units and the selection units are all logged, the stopping rule decides from the counts
at that look alone whether the group is finished or its next round is planned. Because a decision
is a function of logged counts only, replaying the unit log gives the same decisions on resume,
with any number of workers, in any order: ``GroupState`` is used by the driver as units finish
and by ``pipeline.aggregate`` to rebuild the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from pipeline.config import RunConfig
from pipeline.sequential import SequentialPlan, look_schedule, should_stop
from workers.contract import WorkUnit, table_steps
from workers.seeds import sigma_key

__all__ = ["GroupState", "group_key", "groups_of", "looks_of", "plan_units", "sequential_plan"]

GroupKey = tuple[int, int, str]


def group_key(image_id: int, sigma: float, method: str) -> GroupKey:
    """(image, sigma as its 6-decimal key, method): the groups of a run."""
    return int(image_id), sigma_key(sigma), str(method)


def looks_of(config: RunConfig) -> tuple[int, ...]:
    """Estimation draw counts at which a group is looked at: (n,) for fixed sampling."""
    if config.sampling == "fixed":
        return (int(config.n),)
    return look_schedule(config.n, config.first_look, config.look_growth)


def sequential_plan(config: RunConfig, sigma: float) -> SequentialPlan | None:
    """The stopping rule's plan for one sigma (None for fixed sampling)."""
    if config.sampling == "fixed":
        return None
    return SequentialPlan(budget=config.n, alpha=config.alpha, sigma=sigma, radii=tuple(config.radii or ()),
                          looks=looks_of(config), futility=config.futility)


def _chunks(lo: int, hi: int, size: int) -> Iterable[tuple[int, int]]:
    for start in range(lo, hi, size):
        yield start, min(size, hi - start)


@dataclass
class GroupState:
    """One (image, sigma, method): which of its units are logged, their counts, and its decisions."""

    config: RunConfig
    image_id: int
    label: int
    sigma: float
    method: str
    looks: tuple[int, ...]
    plan: SequentialPlan | None
    logged: set[str] = field(default_factory=set)
    select_draws: int = 0
    counts0: np.ndarray | None = None
    estimate: dict[int, np.ndarray] = field(default_factory=dict)
    """Counts of logged estimation units, by start draw."""
    look: int = 0
    """Index of the look the group is drawing towards (or stopped at, once finished)."""
    finished: bool = False

    @property
    def steps(self) -> int:
        return table_steps(self.method, self.config.steps)

    @property
    def votes(self) -> tuple[int, ...]:
        return tuple(self.config.vote_counts(self.method))

    @property
    def n_used(self) -> int:
        """Estimation draws up to the current look (the stopping look once finished)."""
        return self.looks[self.look]

    def _unit(self, phase: str, start: int, count: int) -> WorkUnit:
        return WorkUnit(self.image_id, self.label, self.sigma, self.method, self.steps, self.votes, phase, start,
                        count, self.config.seed)

    def round_units(self, look: int) -> list[WorkUnit]:
        """The estimation units of round ``look``: draws [looks[look - 1], looks[look])."""
        lo = self.looks[look - 1] if look > 0 else 0
        return [self._unit("estimate", s, c) for s, c in _chunks(lo, self.looks[look], self.config.chunk)]

    def select_units(self) -> list[WorkUnit]:
        return [self._unit("select", s, c) for s, c in _chunks(0, self.config.n0, self.config.chunk)]

    def add(self, unit_id: str, phase: str, start: int, num_draws: int, counts: Any) -> None:
        """Take a logged unit of this group (a unit already taken is ignored)."""
        if unit_id in self.logged:
            return
        self.logged.add(unit_id)
        # Row by row: the unit log hands back one array per vote prefix (an object array, or
        # lists), which np.asarray alone cannot stack.
        counts = np.array([np.asarray(c, dtype=np.int64) for c in counts], dtype=np.int64)
        if phase == "select":
            self.select_draws += int(num_draws)
            self.counts0 = counts if self.counts0 is None else self.counts0 + counts
        else:
            self.estimate[int(start)] = counts

    def estimate_counts(self, upto: int) -> np.ndarray | None:
        """Summed counts of the estimation draws [0, upto), None unless all of them are logged."""
        parts = [c for s, c in self.estimate.items() if s < upto]
        starts = {s for s in self.estimate if s < upto}
        expected = {s for look in range(self.looks.index(upto) + 1) for s, _ in _chunks(
            self.looks[look - 1] if look > 0 else 0, self.looks[look], self.config.chunk)}
        if starts != expected:
            return None
        return np.sum(parts, axis=0)

    def advance(self) -> list[WorkUnit]:
        """Decide at every look whose draws are all logged; return the units of the next round to
        run (not yet logged), or [] when the group is finished or still waiting for units."""
        while not self.finished:
            counts = self.estimate_counts(self.looks[self.look])
            if counts is None or self.counts0 is None or self.select_draws < self.config.n0:
                return []
            if self._stop(counts):
                self.finished = True
                return []
            self.look += 1
            todo = [u for u in self.round_units(self.look) if u.unit_id not in self.logged]
            if todo:
                return todo
        return []

    def _stop(self, counts: np.ndarray) -> bool:
        """The stopping rule at the current look: every reported K settled at every radius."""
        if self.plan is None or self.look == len(self.looks) - 1:
            return True
        assert self.counts0 is not None
        n_as = [int(counts[v, int(np.argmax(self.counts0[v]))]) for v in range(len(self.votes))]
        return should_stop(n_as, self.looks[self.look], self.plan)

    def pending(self) -> list[WorkUnit]:
        """Units to run now, after replaying what is logged: missing selection units and the
        missing units of the current round (a resumed group continues where it stopped)."""
        todo = self.advance()
        if self.finished:
            return []
        missing = [u for u in self.select_units() + self.round_units(self.look) if u.unit_id not in self.logged]
        return missing or todo


def groups_of(config: RunConfig, images: list[tuple[int, int]]) -> dict[GroupKey, GroupState]:
    """Every group of a run, in the order (image, sigma, method): whole images finish first."""
    looks = looks_of(config)
    groups: dict[GroupKey, GroupState] = {}
    for image_id, label in images:
        for sigma in config.sigmas:
            plan = sequential_plan(config, sigma)
            for method in config.methods:
                groups[group_key(image_id, sigma, method)] = GroupState(config, image_id, label, sigma, method, looks, plan)
    return groups


def plan_units(config: RunConfig, images: list[tuple[int, int]]) -> list[WorkUnit]:
    """Every unit the budget allows, in a fixed order: the whole run for fixed sampling, the
    upper bound of a sequential one (which stops groups early)."""
    units: list[WorkUnit] = []
    for group in groups_of(config, images).values():
        units += group.select_units()
        for look in range(len(group.looks)):
            units += group.round_units(look)
    return units
