"""The dispatcher: the only code that leases tasks.

Per pool, it waits until a routable worker has a free slot and a task is
leasable, leases exactly one task for exactly that worker, and POSTs it to the
worker's ``/process-task``. While the request is open it extends the lease, so
a task that runs longer than ``leaseTimeout`` on a live worker is not handed to
a second one. Tasks stay in the durable queue until a worker has room: the
dispatcher never buffers work in memory.

Outcomes map onto the queue contract:

- 200: ``ack`` with the worker's result.
- 429 or 503 (the worker is full or draining): ``release``; no attempt spent.
- 422 (the task itself is bad): ``fail(permanent=True)``.
- anything else, a connection error, or the worker vanishing: ``fail`` with
  the pool's retry policy; the worker is ejected from routing until its next
  good probe.

It is woken at once by an enqueue (``wake``) and by registry changes (a worker
became ready, a slot freed), and otherwise polls at ``idle_poll_s`` for tasks
coming out of retry back-off and for enqueues made by other processes.

Each delivery is traced in the task's own trace (see ``controller.telemetry``): a
``queue wait`` span on the first attempt, a client ``dispatch`` span whose
``traceparent`` goes to the worker, and a ``worker`` span made here from the
timing the worker reports. Succeeded tasks feed the queue-wait and run-time
histograms in ``timings``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from controller import logfields, telemetry
from controller.aio import cancel_and_wait, wait_event
from controller.errors import QueueUnavailable
from controller.policy import WorkerPool
from controller.queues.base import RetryPolicy, Task, TaskQueue
from controller.registry import Registry, WorkerRecord

logger = logging.getLogger(__name__)


def pick_least_connections(workers: list[WorkerRecord]) -> WorkerRecord | None:
    """The routable worker with the most free room; ties go to the fewest in flight, then name."""
    candidates = [w for w in workers if w.routable and w.free_slots > 0]
    if not candidates:
        return None
    return min(candidates, key=lambda w: (w.in_flight / w.concurrency, w.in_flight, w.name))


def retry_policy_of(pool: WorkerPool) -> RetryPolicy:
    delivery = pool.spec.delivery
    return RetryPolicy(
        max_attempts=delivery.max_attempts,
        backoff_initial_s=delivery.backoff.initial,
        backoff_max_s=delivery.backoff.max,
        jitter=delivery.backoff.jitter,
    )


@dataclass(frozen=True)
class Outcome:
    """What one delivery attempt came to, for logs, metrics and tests."""

    task_id: str
    worker: str
    kind: str  # "succeeded" | "released" | "failed" | "retry" | "dead" | "lost-lease"
    duration_s: float
    detail: str = ""


@dataclass
class TaskTimings:
    """Histograms of succeeded tasks by pool, read by the metrics endpoints."""

    queue_wait: telemetry.DurationHistogram = field(default_factory=telemetry.DurationHistogram)
    run_time: telemetry.DurationHistogram = field(default_factory=telemetry.DurationHistogram)


class Dispatcher:
    def __init__(
        self,
        *,
        queue: TaskQueue,
        registry: Registry,
        pools: Callable[[], dict[str, WorkerPool]],
        session: aiohttp.ClientSession,
        idle_poll_s: float = 0.25,
        on_outcome: Callable[[Outcome], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._queue = queue
        self._registry = registry
        self._pools = pools
        self._session = session
        self.idle_poll_s = idle_poll_s
        self._on_outcome = on_outcome
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        # Workers that answered 429 are skipped until this monotonic time.
        self._full_until: dict[str, float] = {}
        self.timings = TaskTimings()
        registry.subscribe(lambda _event: self._wakeup.set())

    def wake(self) -> None:
        """Called on every enqueue so that a waiting task leaves without polling delay."""
        self._wakeup.set()

    @property
    def in_flight(self) -> int:
        return len(self._deliveries)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="dispatcher")

    async def stop(self, *, drain_timeout_s: float = 0.0) -> None:
        """Stops leasing; waits up to ``drain_timeout_s`` for deliveries, then abandons them.

        Abandoned leases are not acked: they expire and the tasks run again,
        which is the at-least-once promise.
        """
        await cancel_and_wait([self._task])
        if self._deliveries and drain_timeout_s > 0:
            await asyncio.wait(self._deliveries, timeout=drain_timeout_s)
        for delivery in list(self._deliveries):
            delivery.cancel()
        if self._deliveries:
            await asyncio.gather(*self._deliveries, return_exceptions=True)

    async def run(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                await self.dispatch_once()
            except QueueUnavailable as exc:
                logger.warning("queue unavailable, dispatch retries in %.1fs: %s", 1.0, exc)
                await asyncio.sleep(1.0)
            except Exception:
                # NB: dispatching must outlive a bad tick; the traceback is the news.
                logger.exception("dispatch failed unexpectedly; retrying in 1s")
                await asyncio.sleep(1.0)
            await wait_event(self._wakeup, timeout_s=self.idle_poll_s)

    async def dispatch_once(self) -> int:
        """Leases as many tasks as there are free slots on routable workers; returns how many."""
        started = 0
        for name, pool in self._pools().items():
            while True:
                worker = self._pick(name)
                if worker is None:
                    break
                task = await self._queue.lease(
                    name, worker=worker.name, lease_s=pool.spec.delivery.lease_timeout
                )
                if task is None:
                    break
                # NB: the lease awaited; the worker may have started draining meanwhile.
                current = self._registry.get(worker.worker_id)
                if current is None or not current.routable:
                    await self._queue.release(task.id, worker=worker.name)
                    continue
                worker = current
                self._registry.acquire_slot(worker.worker_id)
                delivery = asyncio.get_running_loop().create_task(
                    self._deliver(task, worker, pool), name=f"deliver-{task.id}"
                )
                self._deliveries.add(delivery)
                delivery.add_done_callback(self._deliveries.discard)
                started += 1
        return started

    def _pick(self, pool: str) -> WorkerRecord | None:
        now = self._clock()
        workers = [
            w for w in self._registry.list(pool) if self._full_until.get(w.worker_id, 0.0) <= now
        ]
        return pick_least_connections(workers)

    async def _deliver(self, task: Task, worker: WorkerRecord, pool: WorkerPool) -> None:
        """One delivery attempt, traced as a client span in the task's trace."""
        parent = telemetry.extract(task.traceparent)
        if task.attempts == 1 and task.started_at is not None:
            telemetry.record_span(
                "queue wait",
                parent=parent,
                start_s=task.created_at,
                end_s=task.started_at,
                attributes={"shoal.task.id": task.id, "shoal.pool": task.pool},
            )
        with telemetry.tracer.start_as_current_span(
            "dispatch",
            context=parent,
            kind=SpanKind.CLIENT,
            attributes={
                "shoal.task.id": task.id,
                "shoal.pool": task.pool,
                "shoal.task.attempt": task.attempts,
                "shoal.worker.name": worker.name,
                "server.address": worker.host,
                "server.port": worker.host_port or 0,
                "http.request.method": "POST",
            },
        ) as span:
            await self._attempt(task, worker, pool, span)

    async def _attempt(
        self, task: Task, worker: WorkerRecord, pool: WorkerPool, span: Span
    ) -> None:
        started = self._clock()
        lease_s = pool.spec.delivery.lease_timeout
        keeper = asyncio.get_running_loop().create_task(self._keep_lease(task, worker, lease_s))
        processed = failed = False
        try:
            traceparent = telemetry.traceparent_of(span) or task.traceparent
            kind, detail = await self._post(task, worker, traceparent=traceparent)
        except Exception as exc:
            # NB: whatever went wrong, the attempt must settle and the slot come back,
            # or this worker would look busy for ever.
            logger.exception("delivery of task %s to %s failed unexpectedly", task.id, worker.name)
            kind, detail = "retry", f"delivery failed: {type(exc).__name__}"
        except asyncio.CancelledError:
            # Shutdown: hand the task back now rather than when its lease expires.
            # The worker may still finish it, so it may run twice (at-least-once).
            with contextlib.suppress(Exception):
                await asyncio.shield(self._queue.release(task.id, worker=worker.name))
            self._registry.release_slot(worker.worker_id)
            raise
        finally:
            keeper.cancel()
            # Bounded: a client library that drops a cancel must not hang the delivery.
            await asyncio.wait({keeper}, timeout=2.0)

        try:
            kind, processed, failed = await self._settle(task, worker, pool, kind, detail)
        except QueueUnavailable as exc:
            # The lease will expire and the task run again: at-least-once, not lost.
            logger.warning(
                "could not record the outcome of task %s: %s",
                task.id,
                exc,
                extra={logfields.TASK_ID: task.id},
            )
            kind = "unrecorded"
        finally:
            self._registry.release_slot(worker.worker_id, processed=processed, failed=failed)
        outcome = Outcome(
            task_id=task.id,
            worker=worker.name,
            kind=kind,
            duration_s=self._clock() - started,
            detail=detail if isinstance(detail, str) else "",
        )
        span.set_attribute("shoal.outcome", kind)
        if kind == "succeeded":
            self._observe_success(task, worker, span, reply=detail, wall_s=outcome.duration_s)
        else:
            span.set_status(Status(StatusCode.ERROR, outcome.detail or kind))
        if self._on_outcome is not None:
            self._on_outcome(outcome)

    async def _settle(
        self, task: Task, worker: WorkerRecord, pool: WorkerPool, kind: str, detail: Any
    ) -> tuple[str, bool, bool]:
        """Writes the outcome to the queue; returns (kind, processed, failed) for the registry."""
        log_extra = {logfields.TASK_ID: task.id, logfields.WORKER_ID: worker.short_id}
        if kind == "succeeded":
            if await self._queue.ack(task.id, worker=worker.name, result=detail):
                return "succeeded", True, False
            logger.warning(
                "task %s finished on %s after its lease moved on; result dropped",
                task.id,
                worker.name,
                extra=log_extra,
            )
            return "lost-lease", True, False
        if kind == "released":
            await self._queue.release(task.id, worker=worker.name)
            return "released", False, False
        permanent = kind == "failed"
        updated = await self._queue.fail(
            task.id,
            worker=worker.name,
            error=str(detail),
            retry=retry_policy_of(pool),
            permanent=permanent,
        )
        state = updated.state if updated is not None else "unknown"
        logger.info(
            "task %s attempt %d on %s did not succeed (%s); now %s",
            task.id,
            task.attempts,
            worker.name,
            detail,
            state,
            extra={**log_extra, logfields.ATTEMPT: task.attempts},
        )
        if permanent:
            return "failed", False, True
        # Out of attempts: the queue moved it to dead, and metrics must say so.
        return ("dead" if state == "dead" else "retry"), False, True

    def _observe_success(
        self, task: Task, worker: WorkerRecord, span: Span, *, reply: Any, wall_s: float
    ) -> None:
        """Feeds the histograms and makes the ``worker`` span from the worker's reported timing.

        NB: the worker exports no spans of its own (it is stdlib-only); this span is made
        here, as a child of the dispatch span, from ``startedAt``/``finishedAt`` in its reply.
        """
        times = _reported_times(reply)
        reported_s = reply.get("durationS") if isinstance(reply, dict) else None
        if isinstance(reported_s, int | float) and not isinstance(reported_s, bool):
            run_s = float(reported_s)
        else:
            run_s = times[1] - times[0] if times is not None else wall_s
        self.timings.run_time.observe(run_s, label=task.pool)
        if task.started_at is not None:
            self.timings.queue_wait.observe(task.started_at - task.created_at, label=task.pool)
        if times is None:
            return
        echo = _echoed_traceparent(reply)
        context = span.get_span_context()
        sent = (trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id))
        telemetry.record_span(
            "worker",
            parent=trace.set_span_in_context(span),
            start_s=times[0],
            end_s=times[1],
            kind=SpanKind.SERVER,
            attributes={
                "shoal.task.id": task.id,
                "shoal.worker.name": worker.name,
                "shoal.span.source": "timing reported by the worker",
                "shoal.worker.traceparent": echo or "",
                "shoal.worker.propagated": telemetry.span_ids(echo) == sent,
            },
        )

    async def _post(
        self, task: Task, worker: WorkerRecord, *, traceparent: str | None
    ) -> tuple[str, Any]:
        url = f"http://{worker.host}:{worker.host_port}/process-task"
        body: dict[str, Any] = {"id": task.id, "payload": task.payload}
        if task.work_seconds is not None:
            body["work_seconds"] = task.work_seconds
        headers = {"traceparent": traceparent} if traceparent else {}
        try:
            async with self._session.post(url, json=body, headers=headers) as response:
                trace.get_current_span().set_attribute("http.response.status_code", response.status)
                if response.status == 200:
                    return "succeeded", await response.json()
                text = (await response.text())[:500]
                if response.status in (429, 503):
                    # Full or draining: our slot count was stale. Skip it briefly.
                    self._full_until[worker.worker_id] = self._clock() + 0.2
                    return "released", f"worker answered {response.status}"
                if response.status in (400, 422):
                    # The worker refused the task itself: another attempt gets the same answer.
                    return "failed", _error_text(text) or "task rejected by worker"
                return "retry", f"worker answered {response.status}: {_error_text(text)}"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self._registry.mark_unhealthy(worker.worker_id, eject=True)
            return "retry", f"connection to {worker.name} failed: {type(exc).__name__}: {exc}"
        except ValueError as exc:
            # A 200 whose body is not JSON, or a body that is not UTF-8: the worker
            # misbehaved; the attempt counts and the task goes elsewhere.
            return "retry", f"unreadable answer from {worker.name}: {type(exc).__name__}"

    async def _keep_lease(self, task: Task, worker: WorkerRecord, lease_s: float) -> None:
        """Extends the lease every third of its length while the worker holds the task."""
        while True:
            await asyncio.sleep(lease_s / 3)
            try:
                if not await self._queue.extend(task.id, worker=worker.name, lease_s=lease_s):
                    return
            except QueueUnavailable as exc:
                logger.warning("could not extend the lease of task %s: %s", task.id, exc)


def _reported_times(reply: Any) -> tuple[float, float] | None:
    """The worker's (startedAt, finishedAt) as unix seconds, when it reported both."""
    if not isinstance(reply, dict):
        return None
    try:
        started = datetime.fromisoformat(str(reply["startedAt"])).timestamp()
        finished = datetime.fromisoformat(str(reply["finishedAt"])).timestamp()
    except (KeyError, ValueError):
        return None
    return started, finished


def _echoed_traceparent(reply: Any) -> str | None:
    result = reply.get("result") if isinstance(reply, dict) else None
    echo = result.get("traceparent") if isinstance(result, dict) else None
    return echo if isinstance(echo, str) else None


def _error_text(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return text.strip()
