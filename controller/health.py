"""Health probes: the only path by which a worker becomes ``ready``.

A starting worker is probed often (``starting_interval_s``) so that it takes
work as soon as it answers ``/healthz``; a ready one is probed at a calmer pace
and loses its routing after ``failure_threshold`` misses in a row (passive
ejection by the dispatcher is immediate; this is the slow path that also brings
it back). The prober reads and writes lifecycle states in the registry; it
never starts or stops a container.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

from controller import logfields
from controller.aio import cancel_and_wait
from controller.registry import Registry, WorkerRecord

logger = logging.getLogger(__name__)


class HealthProber:
    def __init__(
        self,
        registry: Registry,
        *,
        session: aiohttp.ClientSession,
        starting_interval_s: float = 0.05,
        ready_interval_s: float = 2.0,
        timeout_s: float = 1.0,
        failure_threshold: int = 3,
        on_ready: Callable[[WorkerRecord, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._session = session
        self.starting_interval_s = starting_interval_s
        self.ready_interval_s = ready_interval_s
        self.timeout_s = timeout_s
        self.failure_threshold = failure_threshold
        self._on_ready = on_ready
        self._clock = clock
        self._last_probe: dict[str, float] = {}
        self._first_seen: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="health-prober")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])

    async def run(self) -> None:
        while True:
            try:
                await self.probe_due()
            except Exception:
                # NB: probing must outlive a bad tick, or no worker would ever become ready.
                logger.exception("health probing failed unexpectedly")
            await asyncio.sleep(self.starting_interval_s)

    async def probe_due(self) -> None:
        """Probes every worker whose interval has passed, concurrently."""
        now = self._clock()
        due = []
        known = set()
        for worker in self._registry.list():
            known.add(worker.worker_id)
            if worker.host_port is None or worker.state == "gone":
                continue
            self._first_seen.setdefault(worker.worker_id, now)
            interval = (
                self.starting_interval_s if worker.state == "starting" else self.ready_interval_s
            )
            if now - self._last_probe.get(worker.worker_id, 0.0) >= interval:
                self._last_probe[worker.worker_id] = now
                due.append(worker)
        for stale in set(self._last_probe) - known:
            self._last_probe.pop(stale, None)
            self._first_seen.pop(stale, None)
        if due:
            await asyncio.gather(*(self._probe(w) for w in due))

    async def _probe(self, worker: WorkerRecord) -> None:
        url = f"http://{worker.host}:{worker.host_port}/healthz"
        try:
            async with self._session.get(
                url, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            ) as response:
                ok = response.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            ok = False

        current = self._registry.get(worker.worker_id)
        if current is None:
            return
        if ok:
            if current.state == "starting":
                startup_s = self._clock() - self._first_seen.get(worker.worker_id, self._clock())
                self._registry.mark_ready(current.worker_id)
                logger.info(
                    "worker %s is ready on 127.0.0.1:%s",
                    current.name,
                    current.host_port,
                    extra={
                        logfields.POOL: current.pool,
                        logfields.WORKER_ID: current.short_id,
                        logfields.HOST_PORT: current.host_port,
                    },
                )
                if self._on_ready is not None:
                    self._on_ready(current, startup_s)
            elif not current.healthy or current.probe_failures:
                self._registry.mark_ready(current.worker_id)
                logger.info("worker %s passes its health checks again", current.name)
            return

        # A starting worker that does not answer yet is normal; only count misses once ready.
        if current.state == "starting":
            return
        updated = self._registry.mark_unhealthy(
            current.worker_id,
            eject=current.probe_failures + 1 >= self.failure_threshold,
        )
        if updated is not None and current.healthy and not updated.healthy:
            logger.warning(
                "worker %s failed %d health checks in a row; no work is routed to it",
                current.name,
                updated.probe_failures,
                extra={logfields.WORKER_ID: current.short_id},
            )
