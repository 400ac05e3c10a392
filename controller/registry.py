"""The registry: Shoal's cache of observed workers, with a versioned watch.

It holds what is known about each worker now (its host port, lifecycle state,
tasks in flight, tasks processed) and publishes every change as an ADDED,
MODIFIED or DELETED event with a growing ``resource_version``, as a Kubernetes
watch does. It starts nothing and decides nothing: the reconciler and the
health prober write lifecycle states, the dispatcher writes slot counts, and
the balancer and the API only read.

NB: the registry is a cache. The engine is the truth; the reconciler rebuilds
the registry from ``Runtime.list()`` at start and on every relist.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from controller import logfields
from controller.runtimes.base import WorkerId

logger = logging.getLogger(__name__)

WorkerState = Literal["starting", "ready", "draining", "gone"]
EventType = Literal["ADDED", "MODIFIED", "DELETED"]

# How many past events a watch can resume from; older resource versions get
# ``WatchExpired`` and the client re-lists, as with Kubernetes' 410 Gone.
_EVENT_HISTORY = 4096


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: WorkerId
    name: str
    pool: str
    template_hash: str
    host: str
    host_port: int | None
    concurrency: int
    state: WorkerState = "starting"
    healthy: bool = False
    in_flight: int = 0
    processed: int = 0
    failed: int = 0
    created_at: float = 0.0  # unix time the registry first saw it
    ready_at: float | None = None
    draining_since: float | None = None
    # Consecutive failed probes or connection errors; reset by a good probe.
    probe_failures: int = 0

    @property
    def free_slots(self) -> int:
        return max(0, self.concurrency - self.in_flight)

    @property
    def routable(self) -> bool:
        """May receive work: ready, passing its health checks, not draining."""
        return self.state == "ready" and self.healthy and self.host_port is not None

    @property
    def short_id(self) -> str:
        return self.worker_id[:12]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.short_id,
            "workerId": self.worker_id,
            "name": self.name,
            "pool": self.pool,
            "templateHash": self.template_hash,
            "host": self.host,
            "hostPort": self.host_port,
            "state": self.state,
            "healthy": self.healthy,
            "inFlight": self.in_flight,
            "processed": self.processed,
            "failed": self.failed,
            "concurrency": self.concurrency,
            "createdAt": self.created_at,
            "readyAt": self.ready_at,
            "drainingSince": self.draining_since,
        }


@dataclass(frozen=True)
class WatchEvent:
    type: EventType
    resource_version: int
    worker: WorkerRecord

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "resourceVersion": self.resource_version,
            "object": self.worker.to_json(),
        }


class WatchExpired(Exception):
    """The requested resource version is older than the kept history; re-list."""


class Registry:
    """Known workers by id. All methods are synchronous and run on the event loop."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._workers: dict[WorkerId, WorkerRecord] = {}
        self._version = 0
        self._events: collections.deque[WatchEvent] = collections.deque(maxlen=_EVENT_HISTORY)
        # Replaced on every change; a watcher awaits the one it saw last.
        self._tick = asyncio.Event()
        self._listeners: list[Callable[[WatchEvent], None]] = []

    @property
    def resource_version(self) -> int:
        return self._version

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self._workers.get(WorkerId(worker_id))

    def find(self, ident: str) -> WorkerRecord | None:
        """By full id, short id or name, for API lookups."""
        for record in self._workers.values():
            if ident in (record.worker_id, record.short_id, record.name):
                return record
        return None

    def list(self, pool: str | None = None) -> list[WorkerRecord]:
        records = [w for w in self._workers.values() if pool is None or w.pool == pool]
        return sorted(records, key=lambda w: (w.pool, w.created_at, w.name))

    def subscribe(self, listener: Callable[[WatchEvent], None]) -> None:
        """Calls ``listener`` synchronously after every change (used to wake loops)."""
        self._listeners.append(listener)

    def add(
        self,
        *,
        worker_id: WorkerId,
        name: str,
        pool: str,
        template_hash: str,
        host: str,
        host_port: int | None,
        concurrency: int,
    ) -> WorkerRecord:
        """Adds a worker in ``starting``; an id already known is updated instead."""
        existing = self._workers.get(worker_id)
        if existing is not None:
            return self._update(existing, host=host, host_port=host_port)
        record = WorkerRecord(
            worker_id=worker_id,
            name=name,
            pool=pool,
            template_hash=template_hash,
            host=host,
            host_port=host_port,
            concurrency=concurrency,
            created_at=self._clock(),
        )
        self._workers[worker_id] = record
        self._publish("ADDED", record)
        return record

    def mark_ready(self, worker_id: WorkerId) -> WorkerRecord | None:
        record = self._workers.get(worker_id)
        if record is None:
            return None
        if record.state == "starting":
            return self._update(
                record, state="ready", healthy=True, ready_at=self._clock(), probe_failures=0
            )
        if not record.healthy or record.probe_failures:
            return self._update(record, healthy=True, probe_failures=0)
        return record

    def mark_unhealthy(self, worker_id: WorkerId, *, eject: bool) -> WorkerRecord | None:
        """Counts a failed probe or connection error; ``eject`` takes it out of routing now."""
        record = self._workers.get(worker_id)
        if record is None:
            return None
        failures = record.probe_failures + 1
        healthy = record.healthy and not eject
        return self._update(record, probe_failures=failures, healthy=healthy)

    def mark_draining(self, worker_id: WorkerId) -> WorkerRecord | None:
        record = self._workers.get(worker_id)
        if record is None or record.state in ("draining", "gone"):
            return record
        return self._update(record, state="draining", draining_since=self._clock())

    def acquire_slot(self, worker_id: WorkerId) -> WorkerRecord | None:
        record = self._workers.get(worker_id)
        if record is None:
            return None
        return self._update(record, in_flight=record.in_flight + 1)

    def release_slot(
        self, worker_id: WorkerId, *, processed: bool = False, failed: bool = False
    ) -> WorkerRecord | None:
        record = self._workers.get(worker_id)
        if record is None:
            return None
        return self._update(
            record,
            in_flight=max(0, record.in_flight - 1),
            processed=record.processed + int(processed),
            failed=record.failed + int(failed),
        )

    def remove(self, worker_id: WorkerId) -> WorkerRecord | None:
        """Drops the worker and its port; watchers see DELETED with state ``gone``."""
        record = self._workers.pop(worker_id, None)
        if record is None:
            return None
        gone = dataclasses.replace(record, state="gone", healthy=False)
        self._publish("DELETED", gone)
        logger.debug(
            "worker %s left the registry",
            record.name,
            extra={logfields.WORKER_ID: record.short_id, logfields.HOST_PORT: record.host_port},
        )
        return gone

    async def watch(self, *, since: int) -> AsyncIterator[WatchEvent]:
        """Yields every event after resource version ``since``, then new ones as they come.

        Raises ``WatchExpired`` when ``since`` is older than the kept history.
        """
        if since < self._version and (
            not self._events or self._events[0].resource_version > since + 1
        ):
            raise WatchExpired(f"resource version {since} is too old; list again")
        cursor = since
        while True:
            if self._events and self._events[0].resource_version > cursor + 1:
                # This watcher fell behind the kept history: it must re-list, not skip.
                raise WatchExpired(f"resource version {cursor} is too old; list again")
            backlog = [e for e in self._events if e.resource_version > cursor]
            for event in backlog:
                cursor = event.resource_version
                yield event
            if self._version <= cursor:
                await self._tick.wait()

    def _update(self, record: WorkerRecord, **changes: Any) -> WorkerRecord:
        updated = dataclasses.replace(record, **changes)
        if updated == record:
            return record
        self._workers[record.worker_id] = updated
        self._publish("MODIFIED", updated)
        return updated

    def _publish(self, kind: EventType, record: WorkerRecord) -> None:
        self._version += 1
        event = WatchEvent(type=kind, resource_version=self._version, worker=record)
        self._events.append(event)
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()
        for listener in self._listeners:
            listener(event)
