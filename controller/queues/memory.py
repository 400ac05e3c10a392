"""The in-process queue behind ``memory://``: dicts and heaps, nothing on disk.

It owns the same contract as the durable backends (``controller.queues.base``)
and is what unit tests and throwaway runs use; a restart forgets everything.
Callers are the dispatcher and the HTTP API, on one event loop: no method
awaits between reading and writing, so each call is atomic without locks.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controller.queues import base
from controller.queues.base import (
    EnqueueRequest,
    QueueCounts,
    RetryPolicy,
    Task,
    TaskState,
)
from controller.queues.retention import DEFAULT_INTERVAL_S, RetentionJob

logger = logging.getLogger(__name__)


@dataclass
class _PoolIndex:
    # Ids of queued tasks leasable by now, oldest first. Entries go stale when a
    # task leaves ``queued`` and are dropped lazily when popped.
    ready: list[str] = field(default_factory=list)
    # (not_before, id) of queued tasks waiting out a back-off.
    delayed: list[tuple[float, str]] = field(default_factory=list)
    delayed_ids: set[str] = field(default_factory=set)
    counts: Counter[str] = field(default_factory=Counter)


class MemoryQueue:
    """A ``TaskQueue`` held in memory."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._clock = clock
        self._rand = rand
        self._tasks: dict[str, Task] = {}
        # NB: ids are made increasing within a process, so appending keeps this sorted.
        self._order: list[str] = []
        self._pools: dict[str, _PoolIndex] = {}
        self._idempotency: dict[tuple[str, str], str] = {}
        self._running: set[str] = set()
        self._retention: RetentionJob | None = None

    def _pool(self, pool: str) -> _PoolIndex:
        index = self._pools.get(pool)
        if index is None:
            index = self._pools[pool] = _PoolIndex()
        return index

    def _store(self, old: Task | None, new: Task) -> Task:
        """Writes ``new`` and keeps every index in step with its state."""
        index = self._pool(new.pool)
        if old is not None:
            index.counts[old.state] -= 1
            index.delayed_ids.discard(old.id)
            self._running.discard(old.id)
        index.counts[new.state] += 1
        self._tasks[new.id] = new
        if new.state == "running":
            self._running.add(new.id)
        elif new.state == "queued":
            if new.not_before is not None and new.not_before > self._clock():
                index.delayed_ids.add(new.id)
                heapq.heappush(index.delayed, (new.not_before, new.id))
            else:
                heapq.heappush(index.ready, new.id)
        return new

    def _promote_due(self, index: _PoolIndex, *, now: float) -> None:
        while index.delayed and index.delayed[0][0] <= now:
            _, task_id = heapq.heappop(index.delayed)
            if task_id in index.delayed_ids:
                index.delayed_ids.discard(task_id)
                heapq.heappush(index.ready, task_id)

    async def enqueue(self, request: EnqueueRequest) -> tuple[Task, bool]:
        key = request.idempotency_key
        if key is not None:
            existing = self._idempotency.get((request.pool, key))
            if existing is not None:
                return base.same_request(self._tasks[existing], request), False
        task = base.make_task(request, task_id=base.new_task_id(), now=self._clock())
        self._store(None, task)
        self._order.append(task.id)
        if key is not None:
            self._idempotency[(request.pool, key)] = task.id
        return task, True

    async def lease(self, pool: str, *, worker: str, lease_s: float) -> Task | None:
        index = self._pools.get(pool)
        if index is None:
            return None
        now = self._clock()
        self._promote_due(index, now=now)
        while index.ready:
            task_id = heapq.heappop(index.ready)
            task = self._tasks.get(task_id)  # None: pruned since it was queued
            if task is None or task.state != "queued" or task_id in index.delayed_ids:
                continue
            return self._store(task, base.leased(task, worker=worker, now=now, lease_s=lease_s))
        return None

    def _held(self, task_id: str, worker: str) -> Task | None:
        task = self._tasks.get(task_id)
        if task is None or not base.holds_lease(task, worker):
            return None
        return task

    async def extend(self, task_id: str, *, worker: str, lease_s: float) -> bool:
        task = self._held(task_id, worker)
        if task is None:
            return False
        self._store(task, base.extended(task, now=self._clock(), lease_s=lease_s))
        return True

    async def ack(self, task_id: str, *, worker: str, result: Any) -> bool:
        task = self._held(task_id, worker)
        if task is None:
            return False
        self._store(task, base.acked(task, now=self._clock(), result=result))
        return True

    async def fail(
        self,
        task_id: str,
        *,
        worker: str,
        error: str,
        retry: RetryPolicy | None,
        permanent: bool = False,
    ) -> Task | None:
        # One draw per call, accepted or not, as the sqlite backend does: the
        # model test replays both with the same sequence of draws.
        jitter = self._rand()
        task = self._held(task_id, worker)
        if task is None:
            return None
        new = base.failed(
            task,
            now=self._clock(),
            error=error,
            retry=retry,
            permanent=permanent,
            rand=lambda: jitter,
        )
        return self._store(task, new)

    async def release(self, task_id: str, *, worker: str) -> bool:
        task = self._held(task_id, worker)
        if task is None:
            return False
        self._store(task, base.released(task))
        return True

    async def reclaim_expired(self, *, now: float | None = None) -> int:
        now = self._clock() if now is None else now
        expired = [
            self._tasks[task_id]
            for task_id in self._running
            if (self._tasks[task_id].lease_expires_at or 0.0) <= now
        ]
        for task in sorted(expired, key=lambda t: t.id):
            self._store(task, base.reclaimed(task, now=now))
        return len(expired)

    async def get(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)

    async def list(
        self,
        *,
        pool: str | None = None,
        state: TaskState | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[Task]:
        start = 0 if after is None else bisect.bisect_right(self._order, after)
        page: list[Task] = []
        for task_id in self._order[start:]:
            if len(page) >= limit:
                break
            task = self._tasks[task_id]
            if (pool is None or task.pool == pool) and (state is None or task.state == state):
                page.append(task)
        return page

    async def counts(self, pool: str) -> QueueCounts:
        index = self._pools.get(pool)
        if index is None:
            return QueueCounts()
        self._promote_due(index, now=self._clock())
        c = index.counts
        return QueueCounts(
            queued=c["queued"],
            ready=c["queued"] - len(index.delayed_ids),
            running=c["running"],
            succeeded=c["succeeded"],
            failed=c["failed"],
            dead=c["dead"],
            cancelled=c["cancelled"],
        )

    async def cancel(self, task_id: str) -> Task | None:
        task = self._tasks.get(task_id)
        if task is None or task.state != "queued":
            return task
        return self._store(task, base.cancelled(task, now=self._clock()))

    async def redrive(self, task_id: str) -> Task | None:
        task = self._tasks.get(task_id)
        if task is None or task.state not in ("dead", "failed"):
            return task
        return self._store(task, base.redriven(task))

    async def prune(self, *, retention_s: float, limit: int = 500) -> int:
        cutoff = self._clock() - retention_s
        # A scan: this backend holds test-sized queues, not millions of tasks.
        old = sorted(
            (task.finished_at, task.id)
            for task in self._tasks.values()
            if task.state in base.FINAL_STATES
            and task.finished_at is not None
            and task.finished_at <= cutoff
        )[: max(0, limit)]
        for _, task_id in old:
            task = self._tasks.pop(task_id)
            self._pool(task.pool).counts[task.state] -= 1
            if task.idempotency_key is not None:
                self._idempotency.pop((task.pool, task.idempotency_key), None)
        if old:
            gone = {task_id for _, task_id in old}
            self._order = [task_id for task_id in self._order if task_id not in gone]
        return len(old)

    def start_retention(
        self, *, retention_s: float, interval_s: float = DEFAULT_INTERVAL_S
    ) -> None:
        """Prunes finished tasks every ``interval_s`` until ``close``."""
        self._retention = RetentionJob(self.prune, retention_s=retention_s, interval_s=interval_s)
        self._retention.start()

    async def close(self) -> None:
        if self._retention is not None:
            await self._retention.stop()
