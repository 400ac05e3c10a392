"""An in-memory runtime for tests of the reconciler and for dry runs.

It implements the ``Runtime`` protocol without running anything: workers are records with
fake ids and fake host ports, and nothing listens on those ports. It owns a journal of every
call made to it (``calls``) and a few levers a test pulls to shape what happens next: fail the
next starts, make the engine unavailable, hold starts until released, crash a worker, or seed
workers that "were already there" for adoption tests. Time comes from an injected clock.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from controller.errors import RuntimeUnavailable, StartFailed
from controller.runtimes.base import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_POOL,
    LABEL_TEMPLATE_HASH,
    EngineState,
    ObservedWorker,
    RuntimeEvent,
    WorkerId,
    WorkerSpec,
)

FIRST_FAKE_PORT = 40000


class FakeRuntime:
    """Keeps workers in a dict; records calls as tuples of strings, e.g. ``("start", name)``.

    Recorded calls: ``("start", name)``, ``("stop", worker_id, grace_s)``, ``("list",)``,
    ``("close",)``. A start that fails is still recorded, because it was asked for.
    """

    name = "fake"

    def __init__(
        self,
        *,
        instance: str = "default",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.instance = instance
        self.calls: list[tuple[str, ...]] = []
        self.workers: dict[WorkerId, ObservedWorker] = {}
        # When set, start() waits for it: lets a test see how many starts are in flight.
        self.start_gate: asyncio.Event | None = None
        self.unavailable = False
        self.starts_in_flight = 0
        self._clock = clock
        self._ids = itertools.count(1)
        self._ports = itertools.count(FIRST_FAKE_PORT)
        self._failures: list[str] = []
        self._subscribers: set[asyncio.Queue[RuntimeEvent | None]] = set()
        self._closed = False

    # -- levers for tests -------------------------------------------------------------------

    def fail_next_starts(self, count: int, *, reason: str = "injected start failure") -> None:
        """The next ``count`` starts raise ``StartFailed(reason)`` and leave nothing behind."""
        self._failures.extend([reason] * count)

    def crash(self, worker_id: WorkerId, *, exit_code: int = 137) -> ObservedWorker:
        """Marks a worker exited (it stays listed, as a dead container does) and emits ``die``."""
        worker = replace(self.workers[worker_id], engine_state="exited", exit_code=exit_code)
        self.workers[worker_id] = worker
        self._publish(worker_id, "die")
        return worker

    def seed(self, spec: WorkerSpec, *, engine_state: EngineState = "running") -> ObservedWorker:
        """Adds a worker as if it had been started before this runtime was created."""
        worker = self._make(spec)
        if engine_state != "running":
            exit_code = 0 if engine_state == "exited" else None
            worker = replace(worker, engine_state=engine_state, exit_code=exit_code)
        self.workers[worker.worker_id] = worker
        return worker

    def emit(self, worker_id: WorkerId, action: str) -> None:
        """Sends an arbitrary event to every subscriber."""
        self._publish(worker_id, action)

    def started(self) -> builtins.list[str]:
        """Names of the workers whose start was asked for, in order."""
        return [call[1] for call in self.calls if call[0] == "start"]

    def stopped(self) -> builtins.list[str]:
        """Ids of the workers whose stop was asked for, in order."""
        return [call[1] for call in self.calls if call[0] == "stop"]

    # -- the Runtime protocol ---------------------------------------------------------------

    async def start(self, spec: WorkerSpec) -> ObservedWorker:
        self.calls.append(("start", spec.name))
        self._check_available()
        self.starts_in_flight += 1
        try:
            if self.start_gate is not None:
                await self.start_gate.wait()
            if self._failures:
                raise StartFailed(f"cannot start {spec.name}: {self._failures.pop(0)}")
            if any(w.name == spec.name for w in self.workers.values()):
                raise StartFailed(f"cannot start {spec.name}: the name is already in use")
            worker = self._make(spec)
            self.workers[worker.worker_id] = worker
        finally:
            self.starts_in_flight -= 1
        self._publish(worker.worker_id, "start")
        return worker

    async def stop(self, worker_id: WorkerId, *, grace_s: float) -> None:
        self.calls.append(("stop", worker_id, f"{grace_s:g}"))
        self._check_available()
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        if worker.engine_state == "running":
            self._publish(worker_id, "die")
        self._publish(worker_id, "destroy")

    async def list(self) -> builtins.list[ObservedWorker]:
        self.calls.append(("list",))
        self._check_available()
        return builtins.list(self.workers.values())

    async def events(self) -> AsyncIterator[RuntimeEvent]:
        if self._closed:
            return
        queue: asyncio.Queue[RuntimeEvent | None] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._subscribers.discard(queue)

    async def close(self) -> None:
        self.calls.append(("close",))
        self._closed = True
        for queue in builtins.list(self._subscribers):
            queue.put_nowait(None)

    # -- plumbing ---------------------------------------------------------------------------

    def _check_available(self) -> None:
        if self.unavailable:
            raise RuntimeUnavailable("fake engine is unavailable")

    def _make(self, spec: WorkerSpec) -> ObservedWorker:
        return ObservedWorker(
            worker_id=WorkerId(f"fake-{next(self._ids):06d}"),
            name=spec.name,
            pool=spec.pool,
            template_hash=spec.template_hash,
            engine_state="running",
            host_port=next(self._ports),
            started_at=self._clock(),
            labels={
                **spec.labels,
                LABEL_MANAGED: "true",
                LABEL_POOL: spec.pool,
                LABEL_TEMPLATE_HASH: spec.template_hash,
                LABEL_INSTANCE: self.instance,
            },
        )

    def _publish(self, worker_id: WorkerId, action: str) -> None:
        event = RuntimeEvent(worker_id=worker_id, action=action)
        for queue in self._subscribers:
            queue.put_nowait(event)
