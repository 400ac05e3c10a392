"""Where the balancer learns which workers it may route to: the registry, and nothing else.

It owns the two ways of following the registry and of asking for capacity:
``RegistryControlPlane`` subscribes to the controller's ``Registry`` in the same
process (``shoal up --balancer-port``), and ``HttpControlPlane`` lists and watches
``GET /v1/workers`` of a controller over HTTP (``shoal balancer --controller``),
resuming from its last ``resourceVersion`` and listing again on 410 or when a
resume fails, as a Kubernetes informer does. Both hand the proxy the routable
set (ready, healthy, with a host port) as ``Backend`` snapshots, and only when
that set changes. It never writes to the registry and never starts a worker:
it only asks the reconciler for capacity and reports the balancer's load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from api.balancer import Backend, StrategyName
from controller import logfields
from controller.aio import cancel_and_wait
from controller.registry import Registry, WatchEvent, WorkerRecord

if TYPE_CHECKING:
    from controller.manager import Controller

logger = logging.getLogger(__name__)

# Called with every routable worker by id, after each change of that set.
OnChange = Callable[[Mapping[str, Backend]], None]
# Called with a worker's id once it left the registry: its container is stopped or dead.
OnGone = Callable[[str], None]


@dataclass(frozen=True)
class PoolInfo:
    name: str
    max_replicas: int
    strategy: StrategyName = "least-connections"


class ControlPlane(Protocol):
    """What the proxy needs from the controller; the seam its tests fake."""

    async def start(self, on_change: OnChange, on_gone: OnGone | None = None) -> None:
        """Begins following the registry; ``on_change`` gets the first routable set at once.

        ``on_gone`` hears of each worker deleted from the registry (DELETED): by then its
        container has stopped, so nothing still in flight on it can complete.
        """
        ...

    def pools(self) -> Mapping[str, PoolInfo]: ...

    async def refresh_pools(self) -> None:
        """Reads the declared pools again (a request named one not known yet)."""
        ...

    async def request_capacity(self, pool: str, *, hold_s: float = 30.0) -> bool | None:
        """Asks for at least one worker for ``hold_s``: True asked, False refused (max 0),
        None unknown."""
        ...

    async def report_load(self, pool: str, in_flight: int) -> None:
        """Reports the balancer's requests in flight to ``pool``; they count as work."""
        ...

    def refused_by_controller(self) -> bool:
        """True while the controller refuses this balancer's token (401/403)."""
        ...

    async def close(self) -> None: ...


class CapacityHook(Protocol):
    """``Reconciler.request_capacity``: True when asked, False when the pool cannot grow."""

    def __call__(self, pool: str, *, hold_s: float) -> bool: ...


class LoadHook(Protocol):
    """``Reconciler.report_sync_load``."""

    def __call__(self, pool: str, *, in_flight: int) -> None: ...


def backend_of(record: WorkerRecord) -> Backend | None:
    if not record.routable or record.host_port is None:
        return None
    return Backend(
        worker_id=record.worker_id,
        name=record.name,
        pool=record.pool,
        host=record.host,
        port=record.host_port,
        concurrency=max(1, record.concurrency),
    )


def backend_from_json(doc: Mapping[str, Any]) -> Backend | None:
    """A worker object of the watch API as a Backend, or None when it may not get traffic."""
    port = doc.get("hostPort")
    if doc.get("state") != "ready" or doc.get("healthy") is not True or not isinstance(port, int):
        return None
    concurrency = doc.get("concurrency")
    return Backend(
        worker_id=str(doc["workerId"]),
        name=str(doc.get("name", "")),
        pool=str(doc.get("pool", "")),
        host=str(doc.get("host") or "127.0.0.1"),
        port=port,
        concurrency=concurrency if isinstance(concurrency, int) and concurrency > 0 else 1,
    )


class _RoutableSet:
    """The routable workers by id; reports to the proxy only when the set really changed."""

    def __init__(self, on_change: OnChange, on_gone: OnGone | None = None) -> None:
        self._on_change = on_change
        self._on_gone = on_gone
        self._backends: dict[str, Backend] = {}

    def gone(self, worker_id: str) -> None:
        self.put(worker_id, None)
        if self._on_gone is not None:
            self._on_gone(worker_id)

    def put(self, worker_id: str, backend: Backend | None) -> None:
        old = self._backends.get(worker_id)
        if backend == old:
            return
        if backend is None:
            del self._backends[worker_id]
        else:
            self._backends[worker_id] = backend
        self._on_change(dict(self._backends))

    def replace(self, backends: Mapping[str, Backend], *, force: bool = False) -> None:
        if dict(backends) == self._backends and not force:
            return
        self._backends = dict(backends)
        self._on_change(dict(self._backends))


class RegistryControlPlane:
    """Follows a ``Registry`` in the same event loop, synchronously.

    NB: the registry calls listeners inside ``_publish``, so a worker marked
    draining leaves the routing table before the reconciler's next await, and
    therefore before its container is asked to stop.
    """

    def __init__(
        self,
        *,
        registry: Registry,
        pools: Callable[[], Mapping[str, PoolInfo]],
        request_capacity: CapacityHook,
        report_load: LoadHook | None = None,
    ) -> None:
        self._registry = registry
        self._pools = pools
        self._request_capacity = request_capacity
        self._report_load = report_load
        self._routable: _RoutableSet | None = None
        self._subscribed = False

    @classmethod
    def from_controller(cls, controller: Controller) -> RegistryControlPlane:
        cache: dict[str, PoolInfo] = {}
        seen = [-1]

        def pools() -> dict[str, PoolInfo]:
            # Rebuilt only when the store accepted a new policy; this runs once per request.
            store = controller.store
            if store.generation != seen[0] or not cache:
                seen[0] = store.generation
                cache.clear()
                for name, pool in store.pools.items():
                    cache[name] = PoolInfo(
                        name=name,
                        max_replicas=pool.spec.replicas.max,
                        strategy=pool.spec.balancer.strategy,
                    )
            return cache

        return cls(
            registry=controller.registry,
            pools=pools,
            request_capacity=controller.reconciler.request_capacity,
            report_load=controller.reconciler.report_sync_load,
        )

    async def start(self, on_change: OnChange, on_gone: OnGone | None = None) -> None:
        self._routable = _RoutableSet(on_change, on_gone)
        current: dict[str, Backend] = {}
        for record in self._registry.list():
            backend = backend_of(record)
            if backend is not None:
                current[record.worker_id] = backend
        self._routable.replace(current, force=True)
        if not self._subscribed:
            # The registry has no unsubscribe; a closed plane just ignores events.
            self._registry.subscribe(self._on_event)
            self._subscribed = True

    def _on_event(self, event: WatchEvent) -> None:
        if self._routable is None:
            return
        worker = event.worker
        if event.type == "DELETED":
            self._routable.gone(worker.worker_id)
        else:
            self._routable.put(worker.worker_id, backend_of(worker))

    def pools(self) -> Mapping[str, PoolInfo]:
        return self._pools()

    async def refresh_pools(self) -> None:
        return None

    async def request_capacity(self, pool: str, *, hold_s: float = 30.0) -> bool | None:
        return self._request_capacity(pool, hold_s=hold_s)

    async def report_load(self, pool: str, in_flight: int) -> None:
        if self._report_load is not None:
            self._report_load(pool, in_flight=in_flight)

    def refused_by_controller(self) -> bool:
        return False

    async def close(self) -> None:
        self._routable = None


class _WatchExpired(Exception):
    pass


class HttpControlPlane:
    """Lists and watches a controller's ``/v1/workers`` over HTTP; reads pools from status.

    While the controller cannot be reached the last known routable set stays in
    force (workers outlive a controller restart), and the client retries with
    back-off up to ``max_backoff_s``.
    """

    def __init__(
        self,
        url: str,
        *,
        pool: str | None = None,
        strategy: StrategyName = "least-connections",
        pools_interval_s: float = 10.0,
        watch_idle_s: float = 300.0,
        max_backoff_s: float = 5.0,
        first_list_timeout_s: float = 5.0,
        token: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url.rstrip("/")
        self._pool = pool
        self._strategy = strategy
        self._pools_interval_s = pools_interval_s
        self._watch_idle_s = watch_idle_s
        self._max_backoff_s = max_backoff_s
        self._first_list_timeout_s = first_list_timeout_s
        self._clock = clock
        self._pools: dict[str, PoolInfo] = {}
        self._pools_read_at = -float("inf")
        self._workers: dict[str, Backend | None] = {}
        self._routable: _RoutableSet | None = None
        self._session: aiohttp.ClientSession | None = None
        # The controller's API may require a bearer token (SHOAL_API_TOKEN).
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._tasks: list[asyncio.Task[None]] = []
        self._listed = asyncio.Event()
        self.resource_version = 0
        self.lists = 0  # how many full lists were made (tests and status read it)
        self._refused = False

    async def start(self, on_change: OnChange, on_gone: OnGone | None = None) -> None:
        self._routable = _RoutableSet(on_change, on_gone)
        self._routable.replace({}, force=True)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0),
            headers=self._headers,
        )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._follow(), name="balancer-watch"),
            loop.create_task(self._poll_pools(), name="balancer-pools"),
        ]
        # Serving may begin before the controller answers: requests then wait in the activator.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listed.wait(), timeout=self._first_list_timeout_s)

    def pools(self) -> Mapping[str, PoolInfo]:
        return self._pools

    async def refresh_pools(self) -> None:
        # At most once a second, so unknown pool names cannot flood the controller.
        if self._clock() - self._pools_read_at < 1.0:
            return
        self._pools_read_at = self._clock()
        try:
            await self._read_pools()
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            if not self._token_refused(exc):
                logger.warning("cannot read pools from %s: %s", self.url, exc)

    def refused_by_controller(self) -> bool:
        return self._refused

    def _token_refused(self, exc: BaseException) -> bool:
        """True when ``exc`` is the controller's 401/403; logs the first such refusal."""
        if not isinstance(exc, aiohttp.ClientResponseError) or exc.status not in (401, 403):
            return False
        if not self._refused:
            self._refused = True
            logger.error(
                "the controller at %s refused the balancer's API token (%d %s); "
                "set SHOAL_API_TOKEN or --api-token-file to the controller's token",
                self.url,
                exc.status,
                exc.message,
            )
        return True

    async def request_capacity(self, pool: str, *, hold_s: float = 30.0) -> bool | None:
        return await self._activate(pool, {"holdS": hold_s})

    async def report_load(self, pool: str, in_flight: int) -> None:
        await self._activate(pool, {"inFlight": in_flight})

    async def _activate(self, pool: str, body: dict[str, float] | None) -> bool | None:
        session = self._session
        if session is None:
            return None
        try:
            async with session.post(
                f"{self.url}/v1/pools/{pool}/activate",
                json=body,
                timeout=aiohttp.ClientTimeout(total=5.0),
            ) as response:
                if response.status in (200, 202):
                    return True
                if response.status in (404, 409):
                    return False
                logger.warning("activate %s answered %d", pool, response.status)
                return None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            logger.warning(
                "cannot ask %s for capacity in pool %s: %s",
                self.url,
                pool,
                exc,
                extra={logfields.POOL: pool},
            )
            return None

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- following -----------------------------------------------------------------

    async def _follow(self) -> None:
        failures = 0
        resume = False
        while True:
            try:
                if not resume:
                    await self._list()
                resume = False
                await self._watch()
                # The stream ended cleanly (controller restart or idle bound): resume.
                resume = True
                failures = 0
            except _WatchExpired:
                logger.info("watch of %s expired at %d; listing again", self.url, self._rv())
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError) as exc:
                failures += 1
                delay = min(self._max_backoff_s, 0.1 * 2 ** min(failures, 8))
                if self._token_refused(exc):
                    # Logged once as an ERROR; only a new token (or controller) fixes it.
                    await asyncio.sleep(delay)
                    continue
                logger.warning(
                    "following %s failed (attempt %d), retrying in %.1fs: %s",
                    self.url,
                    failures,
                    delay,
                    exc or type(exc).__name__,
                    extra={logfields.ATTEMPT: failures},
                )
                await asyncio.sleep(delay)

    def _rv(self) -> int:
        return self.resource_version

    def _query(self) -> dict[str, str]:
        return {"pool": self._pool} if self._pool else {}

    async def _list(self) -> None:
        assert self._session is not None and self._routable is not None
        async with self._session.get(
            f"{self.url}/v1/workers",
            params=self._query(),
            timeout=aiohttp.ClientTimeout(total=10.0),
        ) as response:
            response.raise_for_status()
            doc = await response.json()
        workers = {str(item["workerId"]): backend_from_json(item) for item in doc["items"]}
        vanished = [worker_id for worker_id in self._workers if worker_id not in workers]
        self._workers = workers
        self.resource_version = int(doc["resourceVersion"])
        self._routable.replace({k: v for k, v in workers.items() if v is not None})
        for worker_id in vanished:
            self._routable.gone(worker_id)
        self.lists += 1
        if self._refused:
            self._refused = False
            logger.info("the controller at %s accepts the balancer's token again", self.url)
        if not self._listed.is_set():
            await self.refresh_pools()
            self._listed.set()

    async def _watch(self) -> None:
        assert self._session is not None and self._routable is not None
        params = {**self._query(), "watch": "true", "resourceVersion": str(self._rv())}
        async with self._session.get(
            f"{self.url}/v1/workers",
            params=params,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=self._watch_idle_s),
        ) as response:
            response.raise_for_status()
            async for line in response.content:
                if line.strip():
                    self._apply(json.loads(line))

    def _apply(self, event: Mapping[str, Any]) -> None:
        assert self._routable is not None
        kind = event.get("type")
        if kind == "ERROR":
            if event.get("code") == 410:
                raise _WatchExpired
            raise ValueError(f"watch error: {event.get('error')}")
        obj = event["object"]
        worker_id = str(obj["workerId"])
        self.resource_version = int(event["resourceVersion"])
        if self._pool is not None and obj.get("pool") != self._pool:
            return
        if kind == "DELETED":
            self._workers.pop(worker_id, None)
            self._routable.gone(worker_id)
            return
        backend = backend_from_json(obj)
        self._workers[worker_id] = backend
        self._routable.put(worker_id, backend)

    async def _poll_pools(self) -> None:
        while True:
            await asyncio.sleep(self._pools_interval_s)
            await self.refresh_pools()

    async def _read_pools(self) -> None:
        assert self._session is not None
        async with self._session.get(
            f"{self.url}/autoscaler-status", timeout=aiohttp.ClientTimeout(total=5.0)
        ) as response:
            response.raise_for_status()
            doc = await response.json()
        pools: dict[str, PoolInfo] = {}
        for name, status in (doc.get("pools") or {}).items():
            replicas = status.get("replicas") or {}
            pools[name] = PoolInfo(
                name=name,
                max_replicas=int(replicas.get("max", 1)),
                strategy=self._strategy,
            )
        self._pools = pools
