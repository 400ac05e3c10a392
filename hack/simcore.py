"""The simulated pool: workers, a FIFO queue and a virtual clock, shared by every policy.

This module owns the mechanics that do not depend on who decides: arrivals, dispatch to the
least-loaded ready worker, start-up delay, service, draining and killing, and the figures
(queue waits, worker-seconds, scaling actions). A policy (``Controller``) only reads the
pool's counters and calls ``start_worker``, ``drain`` or ``terminate``.

``hack/simulate.py`` drives it; ``hack/baselines.py`` holds the anchors' controllers. It is a
script helper, not part of the ``controller`` package, and does no I/O.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

WorkerState = Literal["starting", "ready", "draining", "stopped"]


class Task:
    __slots__ = ("arrived_s", "enqueued_s", "retries", "service_s", "started_s", "wait_s")

    def __init__(self, *, arrived_s: float, service_s: float) -> None:
        self.arrived_s = arrived_s
        self.enqueued_s = arrived_s
        self.service_s = service_s
        self.wait_s = 0.0
        self.retries = 0
        self.started_s: float | None = None


class Worker:
    __slots__ = ("created_s", "epoch", "id", "ready_s", "running", "state", "stopped_s")

    def __init__(self, *, worker_id: int, created_s: float) -> None:
        self.id = worker_id
        self.created_s = created_s
        self.ready_s: float | None = None
        self.stopped_s: float | None = None
        self.state: WorkerState = "starting"
        self.running: dict[int, Task] = {}
        # Bumped on stop so that events scheduled for an earlier life are ignored.
        self.epoch = 0


class Controller(Protocol):
    """A scaling policy. ``tick`` runs at ``first_tick_s`` and then when it asks again."""

    name: str

    def tick(self, pool: Pool, now_s: float) -> float | None:
        """Scales the pool; returns when to be called next (None: never again)."""
        ...

    def on_arrival(self, pool: Pool, now_s: float) -> None:
        """Called for each arrival, e.g. to wake a pool at zero (Knative's activator)."""
        ...


@dataclass
class Figures:
    waits_s: list[float] = field(default_factory=list)
    retries: int = 0
    scaling_actions: int = 0
    scale_ups: int = 0
    max_replicas: int = 0
    killed_tasks: int = 0
    # (t_s, replicas, queued) every sample_interval_s, for the plot.
    series: list[tuple[float, int, int]] = field(default_factory=list)


class Pool:
    """One pool under one controller. Times are virtual seconds from the start of the run."""

    def __init__(self, *, concurrency: int, startup_s: float, measure_from_s: float = 0.0) -> None:
        self.concurrency = concurrency
        self.startup_s = startup_s
        # Figures count from here on; before it the pool warms up.
        self.measure_from_s = measure_from_s
        self.now_s = 0.0
        self.queue: deque[Task] = deque()
        self.workers: dict[int, Worker] = {}
        self.stopped: list[Worker] = []
        self.arrivals_total = 0
        self.completed = 0
        self.in_flight = 0
        self.figures = Figures()
        self.desired: int | None = None
        self._ids = itertools.count(1)
        self._seq = itertools.count()
        self._events: list[tuple[float, int, str, object]] = []
        # Ready, not draining workers with a free slot, bucketed by load (least-loaded first).
        self._free: list[dict[int, Worker]] = [{} for _ in range(concurrency)]
        self.service_mean_s: float | None = None

    # -- counters a controller reads ---------------------------------------------

    def count(self, state: WorkerState) -> int:
        return sum(1 for w in self.workers.values() if w.state == state)

    def active(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.state in ("starting", "ready")]

    def set_desired(self, desired: int) -> None:
        """Records the controller's target; each change is one scaling action."""
        measured = self.now_s >= self.measure_from_s
        if self.desired is not None and desired != self.desired and measured:
            self.figures.scaling_actions += 1
            if desired > self.desired:
                self.figures.scale_ups += 1
        self.desired = desired

    # -- actions a controller takes ----------------------------------------------

    def start_worker(self, now_s: float, *, ready: bool = False) -> Worker:
        worker = Worker(worker_id=next(self._ids), created_s=now_s)
        self.workers[worker.id] = worker
        if ready:
            self._become_ready(worker, now_s)
        else:
            self.schedule(now_s + self.startup_s, "ready", (worker, worker.epoch))
        self._note_size()
        return worker

    def drain(self, worker: Worker, now_s: float, *, timeout_s: float) -> None:
        """No new work; stops when idle or, at ``timeout_s``, kills what is left."""
        if worker.state == "starting" or not worker.running:
            self.stop(worker, now_s)
            return
        self._unfree(worker)
        worker.state = "draining"
        self.schedule(now_s + timeout_s, "deadline", (worker, worker.epoch))

    def stop(self, worker: Worker, now_s: float) -> None:
        """Stops at once; tasks still running are killed and go back to the queue front."""
        self._unfree(worker)
        for task in worker.running.values():
            task.retries += 1
            task.enqueued_s = now_s
            self.figures.killed_tasks += 1
            self.queue.appendleft(task)
        self.in_flight -= len(worker.running)
        worker.running.clear()
        worker.state = "stopped"
        worker.stopped_s = now_s
        worker.epoch += 1
        del self.workers[worker.id]
        self.stopped.append(worker)
        self._dispatch(now_s)

    # -- the event loop ----------------------------------------------------------

    def schedule(self, at_s: float, kind: str, payload: object) -> None:
        heapq.heappush(self._events, (at_s, next(self._seq), kind, payload))

    def run(
        self,
        controller: Controller,
        *,
        tasks: list[Task],
        first_tick_s: float,
        end_s: float,
        sample_interval_s: float = 1.0,
        hard_end_s: float | None = None,
    ) -> float:
        """Runs until ``end_s`` and every task is done; returns the end time used."""
        hard_end_s = hard_end_s if hard_end_s is not None else end_s + 3600.0
        arrivals = iter(tasks)
        next_task = next(arrivals, None)
        self.schedule(first_tick_s, "tick", None)
        self.schedule(0.0, "sample", None)
        total = len(tasks)
        now_s = 0.0
        while True:
            event_s = self._events[0][0] if self._events else math.inf
            if next_task is not None and next_task.arrived_s <= event_s:
                now_s = self.now_s = next_task.arrived_s
                self._arrive(next_task, controller, now_s)
                next_task = next(arrivals, None)
                continue
            if self.completed >= total and now_s >= end_s:
                break
            at_s, _, kind, payload = heapq.heappop(self._events)
            if at_s > hard_end_s:
                now_s = hard_end_s
                break
            now_s = self.now_s = at_s
            self._handle(kind, payload, controller, now_s, sample_interval_s)
        return max(now_s, end_s)

    def _handle(
        self,
        kind: str,
        payload: object,
        controller: Controller,
        now_s: float,
        sample_interval_s: float,
    ) -> None:
        if kind == "tick":
            next_s = controller.tick(self, now_s)
            if next_s is not None:
                self.schedule(max(next_s, now_s + 1e-6), "tick", None)
        elif kind == "done":
            worker, epoch, task = payload  # type: ignore[misc]
            if worker.epoch == epoch:
                self._finish(worker, task, now_s)
        elif kind == "ready":
            worker, epoch = payload  # type: ignore[misc]
            if worker.epoch == epoch and worker.state == "starting":
                self._become_ready(worker, now_s)
        elif kind == "deadline":
            worker, epoch = payload  # type: ignore[misc]
            if worker.epoch == epoch and worker.state == "draining":
                self.stop(worker, now_s)
        elif kind == "sample":
            if now_s >= self.measure_from_s:
                size = len(self.active())
                self.figures.series.append((now_s, size, len(self.queue)))
                self.figures.max_replicas = max(self.figures.max_replicas, size)
            self.schedule(now_s + sample_interval_s, "sample", None)
        elif kind == "call":
            callback: Callable[[float], None] = payload  # type: ignore[assignment]
            callback(now_s)

    def _arrive(self, task: Task, controller: Controller, now_s: float) -> None:
        self.arrivals_total += 1
        self.queue.append(task)
        self._dispatch(now_s)
        controller.on_arrival(self, now_s)

    def _become_ready(self, worker: Worker, now_s: float) -> None:
        worker.state = "ready"
        worker.ready_s = now_s
        self._free[0][worker.id] = worker
        self._dispatch(now_s)

    def _finish(self, worker: Worker, task: Task, now_s: float) -> None:
        del worker.running[id(task)]
        self.in_flight -= 1
        self.completed += 1
        # The measured mean service time, as a worker's metrics would report it.
        if self.service_mean_s is None:
            self.service_mean_s = task.service_s
        else:
            self.service_mean_s += 0.02 * (task.service_s - self.service_mean_s)
        if worker.state == "draining":
            if not worker.running:
                self.stop(worker, now_s)
            return
        load = len(worker.running)
        if load + 1 < self.concurrency:
            self._free[load + 1].pop(worker.id, None)
        self._free[load][worker.id] = worker
        self._dispatch(now_s)

    def _unfree(self, worker: Worker) -> None:
        for bucket in self._free:
            bucket.pop(worker.id, None)

    def _dispatch(self, now_s: float) -> None:
        while self.queue:
            worker = self._least_loaded()
            if worker is None:
                return
            task = self.queue.popleft()
            task.wait_s += now_s - task.enqueued_s
            if task.started_s is None:
                task.started_s = now_s
            load = len(worker.running)
            del self._free[load][worker.id]
            worker.running[id(task)] = task
            if load + 1 < self.concurrency:
                self._free[load + 1][worker.id] = worker
            self.in_flight += 1
            self.schedule(now_s + task.service_s, "done", (worker, worker.epoch, task))

    def _least_loaded(self) -> Worker | None:
        for bucket in self._free:
            if bucket:
                return next(iter(bucket.values()))
        return None

    def _note_size(self) -> None:
        size = len(self.active())
        if self.now_s >= self.measure_from_s and size > self.figures.max_replicas:
            self.figures.max_replicas = size

    def worker_seconds(self, end_s: float) -> float:
        """Seconds of every worker's life (start-up included) within the measured span."""
        start_s = self.measure_from_s
        lives = [(w.created_s, end_s) for w in self.workers.values()]
        lives += [(w.created_s, w.stopped_s or end_s) for w in self.stopped]
        return sum(max(0.0, min(stop, end_s) - max(born, start_s)) for born, stop in lives)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(values)))
    return values[rank - 1]


def k8s_victims(pool: Pool, n: int) -> list[Worker]:
    """The pods a ReplicaSet deletes first: not ready before ready, then the newest ready.

    Kubernetes cannot see which pod is busy, so the in-flight work plays no part.
    """
    ranked = sorted(
        pool.active(),
        key=lambda w: (w.state == "ready", -(w.ready_s or w.created_s), -w.id),
    )
    return ranked[:n]


def k8s_resize(pool: Pool, desired: int, now_s: float, *, grace_s: float) -> None:
    """What a Deployment does with a new replica count: create or terminate pods at once.

    A terminated pod leaves the endpoints at once and gets ``grace_s`` (the pod's
    ``terminationGracePeriodSeconds``) for its in-flight tasks before it is killed.
    """
    active = pool.active()
    if desired > len(active):
        for _ in range(desired - len(active)):
            pool.start_worker(now_s)
    elif desired < len(active):
        for worker in k8s_victims(pool, len(active) - desired):
            pool.drain(worker, now_s, timeout_s=grace_s)
