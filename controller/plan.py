"""The plan: what to do about the difference between desired and observed.

A pure function of one pool's registry records, the desired replica count and
a few facts about spawns in progress. It returns actions; ``Reconciler.apply``
carries them out. Keeping it pure lets the tests (and the property tests) pin
down the rules that matter most to users:

- Scale-in picks idle workers first, starting ones before ready ones, the
  newest first; a busy worker is only ever *drained* (it finishes its tasks),
  and stopped once idle or after ``drainTimeout``.
- A changed template rolls one surge worker at a time: a new worker starts,
  and only once it is ready does an outdated one drain. Capacity never dips.
- Spawns are single-flight and debounced: at most one spawn action per pass,
  and none while ``can_spawn`` is False.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from controller.registry import WorkerRecord

ActionKind = Literal["spawn", "drain", "stop"]


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    reason: str
    worker: WorkerRecord | None = None  # None for spawn

    def describe(self) -> str:
        target = self.worker.name if self.worker is not None else "new worker"
        return f"{self.kind} {target}: {self.reason}"


@dataclass(frozen=True)
class PlanInput:
    desired: int
    workers: Sequence[WorkerRecord]  # this pool's registry records
    template_hash: str
    spawns_in_flight: int
    can_spawn: bool  # debounce, single-flight and back-off all allow a spawn now
    drain_timeout_s: float
    now: float  # unix time, the registry's clock


def _victim_order(worker: WorkerRecord, template_hash: str) -> tuple[bool, bool, bool, float]:
    # Outdated before current, idle before busy, starting before ready, newest first.
    return (
        worker.template_hash == template_hash,
        worker.in_flight > 0,
        worker.state == "ready",
        -worker.created_at,
    )


def plan(inp: PlanInput) -> list[Action]:
    actions: list[Action] = []
    active = [w for w in inp.workers if w.state in ("starting", "ready")]
    draining = [w for w in inp.workers if w.state == "draining"]
    outdated = [w for w in active if w.template_hash != inp.template_hash]
    fresh_starting = [
        w for w in active if w.state == "starting" and w.template_hash == inp.template_hash
    ]
    live = len(active) + inp.spawns_in_flight

    # Draining workers stop as soon as they are idle, or when their time is up.
    for worker in draining:
        if worker.in_flight == 0:
            actions.append(Action("stop", "drained", worker))
        elif (
            worker.draining_since is not None
            and inp.now - worker.draining_since >= inp.drain_timeout_s
        ):
            actions.append(
                Action("stop", f"drain timeout with {worker.in_flight} task(s) in flight", worker)
            )

    # A surge worker of the new template is on its way: hold scale-in for one
    # worker until it is ready, so a rollout never lowers capacity.
    surge_pending = bool(outdated) and (inp.spawns_in_flight > 0 or bool(fresh_starting))

    if live < inp.desired:
        if inp.can_spawn:
            actions.append(Action("spawn", f"{live} of {inp.desired} desired"))
        return actions

    if outdated and not surge_pending and live <= inp.desired:
        if inp.can_spawn:
            actions.append(
                Action("spawn", f"surge for rollout: {len(outdated)} worker(s) on an old template")
            )
        return actions

    excess = live - inp.desired - int(surge_pending)
    if excess > 0:
        victims = sorted(active, key=lambda w: _victim_order(w, inp.template_hash))[:excess]
        for worker in victims:
            if worker.template_hash != inp.template_hash:
                reason = "replaced by the new template"
            else:
                reason = f"scale in: {live} live, {inp.desired} desired"
            actions.append(Action("drain", reason, worker))
    return actions
