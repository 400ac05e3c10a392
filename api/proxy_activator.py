"""The proxy's per-pool routing entry, and the activator that scales a pool from zero.

Owns ``PoolTable`` (one pool's routing table and the requests waiting for its first
worker) and ``Activator``: it holds a request while its pool has no routable worker,
asks the control plane for capacity (once at a time per pool, again while requests
wait), gives up with a 503 when the pool cannot scale or no worker is ready in time,
and keeps telling the control plane that a pool with traffic is wanted and how many of
its requests are in flight (about once a second, never per request). It does not
choose a backend or fill the tables: ``api.proxy.Proxy`` does both, creates the
activator, and calls ``hold`` from its slow dispatch path only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from api.balancer import Backend, Strategy
from api.endpoints import ControlPlane
from api.proxy_exchange import Exchange, Reply

if TYPE_CHECKING:
    from api.proxy import ProxyConfig


@dataclass
class PoolTable:
    """The routing table of one pool, and the requests waiting for its first worker."""

    name: str
    strategy: Strategy
    backends: list[Backend] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    last_request_at: float = 0.0
    refused: bool = False
    asking: asyncio.Task[None] | None = None
    reported_in_flight: int = 0
    # Requests answered 429 because every worker was busy, since the last load report.
    turned_away: int = 0

    def wake(self) -> None:
        """Lets every held request look for a worker again."""
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class Activator:
    """Holds requests for a pool with no worker to take them until one can, or gives up.

    That is a pool at zero (scale from zero) or one whose every slot is taken, as the
    proxy counts its own requests in flight: the held requests count as load, so the
    pool grows, and each takes the first slot that frees.

    ``choose`` is the proxy's backend choice (ejected workers and ``exclude`` skipped);
    ``stats`` and ``tasks`` are the proxy's own counters and set of background tasks, so
    that its snapshot counts activations and its ``close`` cancels the capacity asks.
    """

    def __init__(
        self,
        control: ControlPlane,
        *,
        config: ProxyConfig,
        choose: Callable[[PoolTable, set[str] | None], Backend | None],
        stats: dict[str, int],
        tasks: set[asyncio.Task[None]],
        clock: Callable[[], float],
    ) -> None:
        self._control = control
        self._config = config
        self._choose = choose
        self._stats = stats
        self._tasks = tasks
        self._now = clock
        # NB: capacity is asked again every interval while wanted, so a short hold suffices
        # and a pool whose traffic stopped may scale to zero soon after (its own policy).
        self._hold_s = 2 * config.demand_interval_s

    async def hold(self, pool: PoolTable, exchange: Exchange) -> Backend:
        """Holds the request until a worker of the pool has a free slot for it."""
        info = self._control.pools().get(pool.name)
        if info is not None and info.max_replicas == 0:
            raise Reply(
                503,
                f"pool {pool.name!r} has max 0 replicas",
                retry_after_s=self._config.retry_after_s,
            )
        self._stats["activations"] += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.activation_timeout_s
        pool.refused = False
        while True:
            backend = self._choose(pool, exchange.tried)
            if backend is None and exchange.tried:
                # Every worker failed once for this request; a fresh one may have joined since.
                backend = self._choose(pool, None)
            if backend is not None:
                return backend
            if pool.refused:
                raise Reply(
                    503,
                    f"pool {pool.name!r} cannot scale up",
                    retry_after_s=self._config.retry_after_s,
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Reply(
                    503,
                    f"no worker of pool {pool.name!r} had a free slot within "
                    f"{self._config.activation_timeout_s:g}s",
                    retry_after_s=self._config.retry_after_s,
                )
            self._ask_capacity(pool)
            waiter: asyncio.Future[None] = loop.create_future()
            pool.waiters.append(waiter)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter, timeout=min(remaining, 1.0))

    def _ask_capacity(self, pool: PoolTable) -> None:
        if pool.asking is not None:
            return

        async def ask() -> None:
            try:
                answer = await self._control.request_capacity(pool.name, hold_s=self._hold_s)
                if answer is False:
                    pool.refused = True
                    pool.wake()
                else:
                    # Asked (or unsure): ask again a little later while requests still wait.
                    await asyncio.sleep(self._config.demand_interval_s)
            finally:
                pool.asking = None

        pool.asking = asyncio.get_running_loop().create_task(ask(), name=f"activate-{pool.name}")
        self._tasks.add(pool.asking)
        pool.asking.add_done_callback(self._tasks.discard)

    async def demand_loop(self, pools: Mapping[str, PoolTable], load: Mapping[str, int]) -> None:
        """Tells the reconciler which pools have traffic and their requests in flight.

        Balancer traffic is invisible to the queue-based autoscaler: a pool with recent
        requests asks for capacity (so it does not go to zero), and a pool's count of
        requests in flight (``load`` by worker, plus those held here, plus those turned
        away with 429 since the last report) is reported while it is above zero and once
        more when it falls to zero. Without the turned-away ones, a pool whose every slot
        is busy would look exactly full, never short, and would not grow.
        """
        interval_s = self._config.demand_interval_s
        while True:
            await asyncio.sleep(interval_s)
            horizon = self._now() - interval_s
            for pool in list(pools.values()):
                in_flight = len(pool.waiters) + sum(load.get(b.worker_id, 0) for b in pool.backends)
                in_flight += pool.turned_away
                pool.turned_away = 0
                if in_flight or pool.reported_in_flight:
                    pool.reported_in_flight = in_flight
                    with contextlib.suppress(Exception):
                        await self._control.report_load(pool.name, in_flight)
                if pool.last_request_at >= horizon:
                    with contextlib.suppress(Exception):
                        await self._control.request_capacity(pool.name, hold_s=self._hold_s)
