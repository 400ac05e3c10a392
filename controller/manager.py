"""The controller process: builds the parts and runs them together.

``Controller`` owns the lifecycle (adopt, start loops, stop in order) and the
few counters that span parts (arrivals per pool). It holds no business logic of
its own; the HTTP API reads it and calls ``submit`` on enqueue.

Start order: load the policy, open the queue, adopt what the engine already
runs, then start the prober, dispatcher and reconcile loop. Stop order is the
reverse, and workers are stopped unless ``keep_workers`` is set.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from controller.aio import cancel_and_wait
from controller.dispatcher import Dispatcher, Outcome
from controller.errors import TransientError, UnknownPool
from controller.health import HealthProber
from controller.queues.base import EnqueueRequest, Task, TaskQueue
from controller.reconciler import Reconciler
from controller.registry import Registry
from controller.runtimes.base import Runtime
from controller.store import PolicyStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControllerConfig:
    manifests: Path
    keep_workers: bool = False
    relist_interval_s: float = 5.0
    shutdown_grace_s: float = 5.0
    extra_labels: dict[str, str] | None = None


class Controller:
    def __init__(
        self,
        *,
        config: ControllerConfig,
        runtime: Runtime,
        queue: TaskQueue,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.queue = queue
        self.store = PolicyStore(config.manifests)
        self.registry = Registry()
        self._arrivals: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.started_at = time.time()
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self.reconciler = Reconciler(
            store=self.store,
            registry=self.registry,
            runtime=runtime,
            queue=queue,
            arrivals=lambda pool: self._arrivals[pool],
            relist_interval_s=config.relist_interval_s,
            extra_labels=config.extra_labels,
        )
        self.dispatcher: Dispatcher | None = None
        self.prober: HealthProber | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.store.subscribe(self.reconciler.wake)

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "controller not started"
        return self._session

    async def start(self) -> None:
        self.store.load()
        # A worker may run a task for minutes: no total timeout, only a connect bound.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0),
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
        )
        self.prober = HealthProber(
            self.registry, session=self._session, on_ready=self.reconciler.on_worker_ready
        )
        self.dispatcher = Dispatcher(
            queue=self.queue,
            registry=self.registry,
            pools=lambda: self.store.pools,
            session=self._session,
            on_outcome=self._on_outcome,
        )
        # Adopt first, so the first pass counts what already runs and starts nothing extra.
        await self.reconciler.relist()
        await self.prober.probe_due()
        self.store.start()
        self.prober.start()
        self.dispatcher.start()
        self.reconciler.start()
        self._tasks = [asyncio.get_running_loop().create_task(self._reap(), name="lease-reaper")]
        logger.info(
            "controller running with the %s runtime; pools: %s",
            self.runtime.name,
            ", ".join(sorted(self.store.pools)) or "none",
        )

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        await self.reconciler.stop()
        if self.dispatcher is not None:
            await self.dispatcher.stop(drain_timeout_s=0.0)
        if self.prober is not None:
            await self.prober.stop()
        await self.store.stop()
        try:
            if self.config.keep_workers:
                logger.info("leaving workers running (--keep-workers)")
            else:
                stopped = await self.reconciler.stop_all(grace_s=self.config.shutdown_grace_s)
                logger.info("stopped %d worker(s)", stopped)
        except TransientError as exc:
            # The engine went first: its workers outlive us and the next start adopts them.
            logger.error("could not stop the workers (%s); the next start adopts them", exc)
        finally:
            if self._session is not None:
                await self._session.close()
            await self.runtime.close()
            await self.queue.close()

    async def submit(self, request: EnqueueRequest) -> tuple[Task, bool]:
        """Enqueues a task and wakes the dispatcher and reconciler at once."""
        if self.store.get(request.pool) is None:
            raise UnknownPool(request.pool)
        task, created = await self.queue.enqueue(request)
        if created:
            self._arrivals[request.pool] += 1
            if self.dispatcher is not None:
                self.dispatcher.wake()
            self.reconciler.wake()
        return task, created

    def arrivals(self, pool: str) -> int:
        return self._arrivals[pool]

    def _on_outcome(self, outcome: Outcome) -> None:
        self.outcomes[outcome.kind] += 1
        if outcome.kind == "succeeded":
            record_pool = self._pool_of_worker(outcome.worker)
            if record_pool is not None:
                self.reconciler.on_task_done(record_pool, outcome.duration_s)
        self.reconciler.wake()

    def _pool_of_worker(self, name: str) -> str | None:
        record = self.registry.find(name)
        return record.pool if record is not None else None

    async def _reap(self) -> None:
        """Puts tasks whose lease ran out (their worker or a previous controller died) back."""
        while True:
            await asyncio.sleep(1.0)
            try:
                reclaimed = await self.queue.reclaim_expired()
            except Exception as exc:  # the reaper must outlive a bad tick
                logger.warning("lease reaper failed: %s", exc)
                continue
            if reclaimed:
                logger.info("requeued %d task(s) whose lease expired", reclaimed)
                if self.dispatcher is not None:
                    self.dispatcher.wake()

    def snapshot(self) -> dict[str, Any]:
        """Everything the status endpoints show, in one consistent read."""
        return {
            "pools": {name: self.reconciler.status(name) for name in sorted(self.store.pools)},
            "workers": [w.to_json() for w in self.registry.list()],
            "policyError": self.store.error.to_json() if self.store.error else None,
        }
