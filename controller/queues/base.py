"""The task queue contract, shared by every backend (sqlite, memory, redis).

A task leaves the queue only when a worker reported its result (``ack``) or it
ran out of attempts (``dead``). Everything between is a lease: the holder must
ack, fail or extend it before ``lease_expires_at``; an expired lease puts the
task back (``reclaim_expired``), which is how crashes turn into retries.

Backends own storage only; the dispatcher decides when to lease and whom to
send a task to.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from controller.errors import PermanentError

TaskState = Literal["queued", "running", "succeeded", "failed", "dead", "cancelled"]
TASK_STATES: tuple[TaskState, ...] = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "dead",
    "cancelled",
)
FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "dead", "cancelled"})


@dataclass(frozen=True)
class Task:
    id: str
    pool: str
    payload: Any
    state: TaskState
    attempts: int  # leases handed out so far
    max_attempts: int
    created_at: float  # unix time, as every timestamp here
    work_seconds: float | None = None
    idempotency_key: str | None = None
    worker: str | None = None  # the worker of the current or last attempt
    result: Any = None
    error: str | None = None
    started_at: float | None = None  # first lease
    finished_at: float | None = None
    lease_expires_at: float | None = None
    not_before: float | None = None  # retry back-off: not leased before this
    # W3C trace context of the enqueue, so a task's spans form one trace.
    traceparent: str | None = None
    # Every worker that held a lease on this task, in order.
    history: tuple[str, ...] = ()
    # sha256 of the request that made the task, kept only when it came with an
    # idempotency key: a reuse of the key is compared against it. None on tasks
    # stored before fingerprints existed.
    fingerprint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pool": self.pool,
            "state": self.state,
            "attempts": self.attempts,
            "maxAttempts": self.max_attempts,
            "payload": self.payload,
            "workSeconds": self.work_seconds,
            "idempotencyKey": self.idempotency_key,
            "worker": self.worker,
            "result": self.result,
            "error": self.error,
            "createdAt": self.created_at,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "leaseExpiresAt": self.lease_expires_at,
            "notBefore": self.not_before,
            "workers": list(self.history),
        }


@dataclass(frozen=True)
class QueueCounts:
    """Tasks of one pool by state. ``ready`` is the part of ``queued`` leasable now."""

    queued: int = 0
    ready: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    dead: int = 0
    cancelled: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "queued": self.queued,
            "ready": self.ready,
            "running": self.running,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "dead": self.dead,
            "cancelled": self.cancelled,
        }


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed attempt is retried; the pool's ``spec.delivery``."""

    max_attempts: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    jitter: bool = True


@dataclass
class EnqueueRequest:
    pool: str
    payload: Any
    work_seconds: float | None = None
    max_attempts: int = 5
    idempotency_key: str | None = None
    traceparent: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # What the idempotency key is checked against; computed from the fields
    # above when None. The API passes one made from the body as the client sent
    # it, so a pool default that changed between two retries refuses nothing.
    fingerprint: str | None = None


class IdempotencyConflict(PermanentError):
    """An idempotency key already names a task made from a different request."""

    def __init__(self, *, pool: str, idempotency_key: str, task_id: str) -> None:
        self.pool = pool
        self.idempotency_key = idempotency_key
        self.task_id = task_id
        super().__init__(
            f"idempotency key {idempotency_key!r} was already used in pool {pool!r} "
            f"for a different request (task {task_id}); use a new key for a new task"
        )


class TaskQueue(Protocol):
    """Durable tasks. Every method may raise ``QueueUnavailable``."""

    async def enqueue(self, request: EnqueueRequest) -> tuple[Task, bool]:
        """Stores a new task and returns it with ``True``.

        With an idempotency key already used in the same pool, stores nothing:
        the same request (``request_fingerprint``) returns the first task with
        ``False``; a different one raises ``IdempotencyConflict``.
        """
        ...

    async def lease(self, pool: str, *, worker: str, lease_s: float) -> Task | None:
        """Hands out the oldest leasable task of ``pool`` (FIFO), or None."""
        ...

    async def extend(self, task_id: str, *, worker: str, lease_s: float) -> bool:
        """Pushes a held lease further out; False if the lease is no longer ``worker``'s."""
        ...

    async def ack(self, task_id: str, *, worker: str, result: Any) -> bool:
        """Records success. False (and nothing changes) if the lease is not ``worker``'s."""
        ...

    async def fail(
        self,
        task_id: str,
        *,
        worker: str,
        error: str,
        retry: RetryPolicy | None,
        permanent: bool = False,
    ) -> Task | None:
        """Ends an attempt that did not succeed.

        ``permanent`` marks the task failed at once. Otherwise it is queued
        again after a back-off, or dead once ``max_attempts`` leases were used.
        Returns the updated task, or None if the lease is not ``worker``'s.
        """
        ...

    async def release(self, task_id: str, *, worker: str) -> bool:
        """Gives a lease back unused (e.g. the worker answered 429): no attempt is spent."""
        ...

    async def reclaim_expired(self, *, now: float | None = None) -> int:
        """Requeues tasks whose lease ran out; returns how many."""
        ...

    async def get(self, task_id: str) -> Task | None: ...

    async def list(
        self,
        *,
        pool: str | None = None,
        state: TaskState | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[Task]:
        """Tasks ordered by creation; ``after`` is the last id of the previous page."""
        ...

    async def counts(self, pool: str) -> QueueCounts: ...

    async def cancel(self, task_id: str) -> Task | None:
        """Cancels a queued task; running or finished tasks are returned unchanged."""
        ...

    async def redrive(self, task_id: str) -> Task | None:
        """Puts a dead or failed task back in the queue with fresh attempts."""
        ...

    async def prune(self, *, retention_s: float, limit: int = 500) -> int:
        """Deletes up to ``limit`` final tasks that finished ``retention_s`` ago or earlier.

        Final: succeeded, failed, dead or cancelled; queued and running tasks
        are never deleted. Oldest ``finished_at`` first (then id), by the queue's clock.
        A pruned task's idempotency key is free again. Returns how many went.
        """
        ...

    async def close(self) -> None: ...


# --- Shared semantics ------------------------------------------------------
# Every backend loads a task, applies one of these pure transitions and stores
# the result, so the rules below hold identically for memory, sqlite and redis.
# NB: callers check ``holds_lease`` (or the state) before a transition; the
# transitions themselves do not re-check.

_id_lock = threading.Lock()
_last_id_us = 0


def new_task_id() -> str:
    """A 24-hex-digit id that sorts in creation order.

    Microseconds since the epoch (forced strictly increasing within a process)
    followed by 40 random bits, so ids made by several processes stay unique
    and still sort roughly by time across them.
    """
    global _last_id_us
    now_us = time.time_ns() // 1000
    with _id_lock:
        now_us = max(now_us, _last_id_us + 1)
        _last_id_us = now_us
    return f"{now_us:014x}{os.urandom(5).hex()}"


def backoff_delay_s(
    retry: RetryPolicy,
    *,
    attempts: int,
    rand: Callable[[], float] = random.random,
) -> float:
    """The wait before the next attempt after ``attempts`` leases were used.

    ``min(max, initial * 2**(attempts-1))``; with ``jitter`` it is "equal
    jitter": half of that plus a random part of up to the other half, so a
    retry storm spreads out but never comes back sooner than half the delay.
    """
    exponent = max(0, attempts - 1)
    # Cap the exponent so a large attempt count cannot overflow a float.
    delay_s = min(retry.backoff_max_s, retry.backoff_initial_s * 2.0 ** min(exponent, 64))
    if retry.jitter:
        delay_s = delay_s / 2 + rand() * delay_s / 2
    return delay_s


def request_fingerprint(
    *, payload: Any, work_seconds: float | None, max_attempts: int | None
) -> str:
    """sha256 (hex) of the canonical JSON of what defines a task.

    Canonical: keys sorted, no spaces, so ``{"a":1,"b":2}`` and ``{"b":2,"a":1}``
    match. The pool is not in it (a key is scoped to its pool), nor is the
    trace context (a retry rightly carries a new one).
    """
    canonical = json.dumps(
        {
            "payload": payload,
            "workSeconds": None if work_seconds is None else float(work_seconds),
            "maxAttempts": max_attempts,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def fingerprint_of(request: EnqueueRequest) -> str | None:
    """The fingerprint to store with a task; None without an idempotency key."""
    if request.idempotency_key is None:
        return None
    if request.fingerprint is not None:
        return request.fingerprint
    return request_fingerprint(
        payload=request.payload,
        work_seconds=request.work_seconds,
        max_attempts=request.max_attempts,
    )


def same_request(first: Task, request: EnqueueRequest) -> Task:
    """``first`` if ``request`` is a retry of the one that made it; else raises.

    A task stored before fingerprints existed has none and matches any request:
    refusing a retry we cannot judge would break clients that did nothing wrong.
    """
    if first.fingerprint is None or first.fingerprint == fingerprint_of(request):
        return first
    raise IdempotencyConflict(
        pool=first.pool, idempotency_key=request.idempotency_key or "", task_id=first.id
    )


def holds_lease(task: Task, worker: str) -> bool:
    """True while ``worker`` holds the current lease of ``task``."""
    return task.state == "running" and task.worker == worker


def is_leasable(task: Task, *, now: float) -> bool:
    return task.state == "queued" and (task.not_before is None or task.not_before <= now)


def make_task(request: EnqueueRequest, *, task_id: str, now: float) -> Task:
    return Task(
        id=task_id,
        pool=request.pool,
        payload=request.payload,
        state="queued",
        attempts=0,
        max_attempts=request.max_attempts,
        created_at=now,
        work_seconds=request.work_seconds,
        idempotency_key=request.idempotency_key,
        traceparent=request.traceparent,
        fingerprint=fingerprint_of(request),
    )


def leased(task: Task, *, worker: str, now: float, lease_s: float) -> Task:
    return replace(
        task,
        state="running",
        attempts=task.attempts + 1,
        worker=worker,
        started_at=task.started_at if task.started_at is not None else now,
        lease_expires_at=now + lease_s,
        history=(*task.history, worker),
    )


def extended(task: Task, *, now: float, lease_s: float) -> Task:
    return replace(task, lease_expires_at=now + lease_s)


def acked(task: Task, *, now: float, result: Any) -> Task:
    return replace(
        task,
        state="succeeded",
        result=result,
        error=None,
        finished_at=now,
        lease_expires_at=None,
    )


def failed(
    task: Task,
    *,
    now: float,
    error: str,
    retry: RetryPolicy | None,
    permanent: bool,
    rand: Callable[[], float] = random.random,
) -> Task:
    """Permanent -> ``failed``; out of attempts -> ``dead``; else queued after a back-off.

    The task's own ``max_attempts`` (fixed at enqueue) decides when it is dead;
    ``retry`` only shapes the back-off (defaults when None).
    """
    if permanent:
        return replace(task, state="failed", error=error, finished_at=now, lease_expires_at=None)
    if task.attempts >= task.max_attempts:
        return replace(task, state="dead", error=error, finished_at=now, lease_expires_at=None)
    delay_s = backoff_delay_s(retry or RetryPolicy(), attempts=task.attempts, rand=rand)
    return replace(
        task, state="queued", error=error, lease_expires_at=None, not_before=now + delay_s
    )


def released(task: Task) -> Task:
    """Back to the queue at once; the attempt the lease counted is given back.

    So is its place in ``history``: the worker refused the task unread (full or
    draining), and a worker that keeps refusing would otherwise grow the record at
    every retry.
    """
    return replace(
        task,
        state="queued",
        attempts=max(0, task.attempts - 1),
        history=task.history[:-1],
        lease_expires_at=None,
        not_before=None,
    )


def reclaimed(task: Task, *, now: float) -> Task:
    """An expired lease: the attempt stays spent; dead when none are left."""
    error = f"lease of worker {task.worker} expired"
    if task.attempts >= task.max_attempts:
        return replace(task, state="dead", error=error, finished_at=now, lease_expires_at=None)
    return replace(task, state="queued", error=error, lease_expires_at=None, not_before=None)


def cancelled(task: Task, *, now: float) -> Task:
    return replace(task, state="cancelled", finished_at=now)


def redriven(task: Task) -> Task:
    # A fresh start: the last worker and error belong to the run that ended;
    # ``history`` keeps every worker that ever held it.
    return replace(
        task,
        state="queued",
        attempts=0,
        worker=None,
        error=None,
        result=None,
        finished_at=None,
        lease_expires_at=None,
        not_before=None,
    )
