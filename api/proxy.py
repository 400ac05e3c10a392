"""The balancer's reverse proxy: HTTP/1.1 in, HTTP/1.1 to the live workers of a pool.

``Proxy`` owns the listening socket, the routing table of each pool, the per-worker
keep-alive pools of upstream connections, dispatch and retries, timeouts and health
(passive ejection on a connect failure, active probes that bring a worker back).
Requests held while a pool scales from zero wait in ``api.proxy_activator``. It does
not decide which workers exist: ``api.endpoints`` hands it the routable set, and it
never writes to the registry. Backend choice is ``api.balancer``'s. ``api.balancer_cli``
runs it; tests and ``hack/bench_balancer.py`` drive it directly.

The hot path is a pair of ``asyncio.Protocol`` objects with httptools parsers, not an
aiohttp app: ``api.proxy_client`` parses a request once and rewrites its head, and
``Proxy.dispatch`` writes it to a pooled upstream connection within the same callback
when one is idle; ``api.proxy_upstream`` relays the answer. ``api.proxy_exchange``
holds the per-request record both sides share. Bodies stream both ways with flow
control. Errors become 502/503/504 JSON; a client never sees a traceback.

Retries (issue 5): after a connect failure nothing was sent, so another worker
is tried for any method; a request that a worker may have started is only
retried when its method is idempotent. A worker refuses work unread with 503
while it drains and with 429 when all its slots are busy: a 503 takes it out of
routing until its next good probe, a 429 marks it full for a moment, and either
way the request is replayed on another worker when its whole body is still held.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from api.balancer import Backend, make_strategy
from api.endpoints import ControlPlane, PoolInfo
from api.proxy_activator import Activator, PoolTable
from api.proxy_client import ClientConnection
from api.proxy_exchange import REASONS, Exchange, Outbox, Reply, error_body
from api.proxy_upstream import UpstreamConnection
from controller import logfields

logger = logging.getLogger(__name__)

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_REQUEST_ID_OK = frozenset(range(0x21, 0x7F))


@dataclass(frozen=True)
class ProxyConfig:
    connect_timeout_s: float = 2.0
    # Time allowed for the response head, and then between two reads of its body.
    upstream_timeout_s: float = 300.0
    activation_timeout_s: float = 30.0
    # Pooled upstream connections are closed after this long idle (the worker's own is 75 s).
    upstream_idle_s: float = 30.0
    client_idle_s: float = 75.0
    max_idle_per_backend: int = 256
    max_tries: int = 3
    # Request bodies up to this size are kept so that a refused request can be replayed.
    replay_limit_bytes: int = 64 * 1024
    # A request head (431) or a worker's response head (502) larger than this is refused.
    max_head_bytes: int = 64 * 1024
    probe_interval_s: float = 1.0
    probe_path: str = "/healthz"
    retry_after_s: int = 5
    # A worker that answered 429 is not offered a replayed request for this long.
    busy_backoff_s: float = 1.0
    default_strategy: str = "least-connections"
    # While a pool gets traffic, capacity is asked for this often (each ask holds the pool
    # above zero for twice as long), and its requests in flight are reported as load.
    demand_interval_s: float = 1.0
    sweep_interval_s: float = 0.25


class Proxy:
    """The balancer's proxy server: routing table, connection pools, activator and probes."""

    def __init__(
        self,
        control: ControlPlane,
        *,
        config: ProxyConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.control = control
        self.config = config or ProxyConfig()
        self.now = clock
        self.pools: dict[str, PoolTable] = {}
        self.routable: dict[str, Backend] = {}
        self.load: dict[str, int] = {}
        self.idle: dict[str, list[UpstreamConnection]] = {}
        self.busy: set[UpstreamConnection] = set()
        self.clients: set[ClientConnection] = set()
        self.ejected: dict[str, Backend] = {}
        # Workers that answered 429, until when they count as full.
        self.full: dict[str, float] = {}
        self.stats: dict[str, int] = {
            "requests": 0,
            "retries": 0,
            "ejections": 0,
            "activations": 0,
            "errors": 0,
        }
        self._rid_prefix = secrets.token_hex(4).encode()
        self._rid_counter = itertools.count(1)
        self.outbox = Outbox()
        self._servers: list[asyncio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._slow: set[asyncio.Task[None]] = set()
        self.activator = Activator(
            control,
            config=self.config,
            choose=self._choose,
            stats=self.stats,
            tasks=self._slow,
            clock=clock,
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, *, host: str, port: int, reuse_port: bool = False) -> int:
        """Follows the control plane, listens, and returns the bound port."""
        await self.control.start(self.on_change, self.on_gone)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: ClientConnection(self),
            host=host,
            port=port,
            reuse_port=reuse_port or None,
            backlog=1024,
        )
        self._servers.append(server)
        self._tasks = [
            loop.create_task(self._sweep(), name="balancer-sweep"),
            loop.create_task(self._probe_loop(), name="balancer-probes"),
            loop.create_task(
                self.activator.demand_loop(self.pools, self.load), name="balancer-demand"
            ),
        ]
        bound: int = server.sockets[0].getsockname()[1]
        return bound

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in [*self._tasks, *self._slow]:
            task.cancel()
        for task in [*self._tasks, *self._slow]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for client in list(self.clients):
            client.close()
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
        for conn in list(self.busy):
            conn.close()
        self.idle.clear()
        for server in self._servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout=1.0)
        self._servers = []
        await self.control.close()

    # -- routing table ------------------------------------------------------------------

    def on_change(self, backends: Mapping[str, Backend]) -> None:
        """The routable set changed: rebuild pool tables, drop connections to leavers."""
        left = [worker_id for worker_id in self.routable if worker_id not in backends]
        self.routable = dict(backends)
        by_pool: dict[str, list[Backend]] = {}
        for backend in backends.values():
            by_pool.setdefault(backend.pool, []).append(backend)
        for name in set(by_pool) | set(self.pools):
            pool = self._pool(name)
            pool.backends = sorted(by_pool.get(name, []), key=lambda b: b.worker_id)
            if self._choose(pool) is not None:
                pool.wake()
        for worker_id in left:
            self.ejected.pop(worker_id, None)
            self.full.pop(worker_id, None)
            self.load.pop(worker_id, None)
            # NB: idle connections to a worker that left are closed now, so none is reused
            # after its container is stopped; requests in flight on it finish normally.
            for conn in self.idle.pop(worker_id, []):
                conn.close()

    def on_gone(self, worker_id: str) -> None:
        """A worker left the registry, so its container is stopped: end what is still on it."""
        for conn in [c for c in self.busy if c.backend.worker_id == worker_id]:
            self.upstream_broken(conn, "the worker is gone")

    def _pool(self, name: str, info: PoolInfo | None = None) -> PoolTable:
        pool = self.pools.get(name)
        if pool is None:
            strategy_name = info.strategy if info is not None else self.config.default_strategy
            pool = PoolTable(name=name, strategy=make_strategy(strategy_name))
            self.pools[name] = pool
        elif info is not None and info.strategy != pool.strategy.name:
            pool.strategy = make_strategy(info.strategy)
        return pool

    def _choose(self, pool: PoolTable, exclude: set[str] | None = None) -> Backend | None:
        """The strategy's pick among workers with a free slot; None when none has one.

        A request for a pool whose every slot is taken (as this proxy counts them) then
        waits in the activator for one to free, and counts as load meanwhile, instead of
        being sent to a worker that would only answer 429.
        """
        ejected = self.ejected
        if ejected:
            skip: Collection[str] = set(ejected) if exclude is None else exclude | set(ejected)
        else:
            skip = exclude or ()
        load = self.load
        backend = pool.strategy.pick(pool.backends, load, exclude=skip)
        if backend is None or load.get(backend.worker_id, 0) < backend.concurrency:
            return backend
        # NB: round-robin and power-of-two may pick a full worker beside one with room.
        room = [
            b
            for b in pool.backends
            if b.worker_id not in skip and load.get(b.worker_id, 0) < b.concurrency
        ]
        return min(room, key=lambda b: load.get(b.worker_id, 0)) if room else None

    # -- request flow -------------------------------------------------------------------

    def request_id(self, given: bytes) -> bytes:
        """The client's X-Request-Id when it is short and printable, else a new one."""
        if given and len(given) <= 128 and all(c in _REQUEST_ID_OK for c in given):
            return given
        return b"%b-%x" % (self._rid_prefix, next(self._rid_counter))

    def dispatch(self, exchange: Exchange) -> None:
        """Starts ``exchange``: at once when a pooled connection is idle, else in a task."""
        self.stats["requests"] += 1
        now = self.now()
        exchange.deadline = now + self.config.upstream_timeout_s
        info = self.control.pools().get(exchange.pool)
        backend = None
        if info is not None:
            pool = self.pools.get(exchange.pool)
            if pool is None or info.strategy != pool.strategy.name:
                pool = self._pool(exchange.pool, info)
            pool.last_request_at = now
            backend = self._choose(pool)
            if backend is not None:
                conn = self._idle_conn(backend.worker_id)
                if conn is not None:
                    self._send(exchange, backend, conn)
                    return
                # Its slot is held while the slow path connects (see ``_dispatch_slow``).
                self._reserve(backend)
        task = asyncio.get_running_loop().create_task(self._dispatch_slow(exchange, backend))
        exchange.task = task
        self._slow.add(task)
        task.add_done_callback(self._slow.discard)

    async def _dispatch_slow(self, exchange: Exchange, chosen: Backend | None = None) -> None:
        """Routes ``exchange`` when that needs waiting: a new connection, a pool at zero or
        full, or a retry. ``chosen`` is the fast path's choice, its slot already held.

        A slot is held in ``load`` from the choice on, across the connect: requests that
        a new worker's arrival wakes together would otherwise all see it free, all go to
        it, and all but its first get 429.
        """
        reserved = chosen
        try:
            pool = await self._pool_for(exchange.pool)
            pool.last_request_at = self.now()
            for _ in range(self.config.max_tries):
                backend = reserved
                if backend is None:
                    backend = self._choose(pool, exchange.tried)
                    if backend is None:
                        backend = await self.activator.hold(pool, exchange)
                    self._reserve(backend)
                    reserved = backend
                conn = self._idle_conn(backend.worker_id)
                if conn is None:
                    conn = await self._connect(backend, exchange)
                reserved = None
                if conn is not None:
                    self._send(exchange, backend, conn, reserved=True)
                    return
                self._unload(backend)
                self.stats["retries"] += 1
            raise Reply(502, f"no worker of pool {pool.name!r} could be reached")
        except Reply as reply:
            self.reply_error(exchange, reply)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("balancer failed to route a request")
            self.reply_error(exchange, Reply(502, "balancer error; see its log"))
        finally:
            if reserved is not None:
                self._unload(reserved)
            exchange.task = None

    def _idle_conn(self, worker_id: str) -> UpstreamConnection | None:
        """A pooled connection to the worker that is still open, or None.

        NB: one whose worker closed it (its end of the keep-alive) may wait in the pool
        until the loop runs its connection_lost; a request written there would be lost.
        """
        conns = self.idle.get(worker_id)
        while conns:
            conn = conns.pop()
            transport = conn.transport
            if not conn.closed and transport is not None and not transport.is_closing():
                return conn
        return None

    async def _pool_for(self, name: str) -> PoolTable:
        info = self.control.pools().get(name)
        if info is None:
            await self.control.refresh_pools()
            info = self.control.pools().get(name)
        if info is None and self.control.refused_by_controller():
            raise Reply(
                503,
                "balancer cannot read the controller's workers",
                retry_after_s=self.config.retry_after_s,
            )
        if info is None:
            raise Reply(404, f"unknown pool {name!r}")
        return self._pool(name, info)

    async def _connect(self, backend: Backend, exchange: Exchange) -> UpstreamConnection | None:
        """Opens a connection; a failure ejects the worker and returns None (nothing was sent)."""
        loop = asyncio.get_running_loop()
        exchange.tried.add(backend.worker_id)
        try:
            _transport, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: UpstreamConnection(self, backend), backend.host, backend.port
                ),
                timeout=self.config.connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            self.eject(backend, f"connect failed: {exc or 'timeout'}")
            return None
        if backend.worker_id not in self.routable:
            # It left routing while we connected: do not start anything on it.
            conn.close()
            return None
        return conn

    def _send(
        self,
        exchange: Exchange,
        backend: Backend,
        conn: UpstreamConnection,
        *,
        reserved: bool = False,
    ) -> None:
        """Writes the request on ``conn``; its slot is counted now, unless ``reserved``."""
        exchange.backend = backend
        exchange.upstream = conn
        worker_id = backend.worker_id
        exchange.tried.add(worker_id)
        exchange.attempts += 1
        conn.exchange = exchange
        self.busy.add(conn)
        if not reserved:
            self._reserve(backend)
        exchange.sent = True
        body = exchange.body
        if body:
            conn.write_soon(exchange.head + b"".join(body))
            if exchange.body_size > self.config.replay_limit_bytes:
                exchange.replayable = False
            if not exchange.replayable:
                body.clear()
        else:
            conn.write_soon(exchange.head)
        client = exchange.client
        if client.paused:
            client.resume_reading()

    def finish(self, conn: UpstreamConnection, *, reuse: bool) -> None:
        """The response came whole: free the worker's slot, pool the connection, go on."""
        exchange = conn.exchange
        conn.exchange = None
        self.busy.discard(conn)
        if exchange is None:
            return
        exchange.upstream = None
        self._release(exchange)
        worker_id = conn.backend.worker_id
        client = exchange.client
        if client.paused_upstream is conn:
            client.paused_upstream = None
        if conn.reading_paused:
            # Paused for a slow client (its write buffer filled): the next exchange on
            # this connection must be read.
            conn.resume_reading()
        now = self.now()
        # NB: a worker may answer before it has read the whole request body; a connection
        # with part of a body unsent would take the next request for the rest of it.
        if (
            reuse
            and exchange.body_done
            and not conn.closed
            and worker_id in self.routable
            and not (self.ejected and worker_id in self.ejected)
        ):
            conns = self.idle.get(worker_id)
            if conns is None:
                conns = self.idle[worker_id] = []
            if len(conns) < self.config.max_idle_per_backend:
                conn.idle_since = now
                conns.append(conn)
            else:
                conn.close()
        else:
            conn.close()
        client.done(exchange, now)

    def _release(self, exchange: Exchange) -> None:
        backend = exchange.backend
        if backend is not None:
            self._unload(backend)
        exchange.backend = None

    def _detach(self, conn: UpstreamConnection, exchange: Exchange) -> None:
        """Ends ``exchange`` on ``conn`` short of a whole answer: the connection is dropped."""
        conn.exchange = None
        self.busy.discard(conn)
        conn.close()
        self._release(exchange)
        exchange.upstream = None

    def _reserve(self, backend: Backend) -> None:
        """Counts a request on one of the worker's slots (see ``_choose``)."""
        self.load[backend.worker_id] = self.load.get(backend.worker_id, 0) + 1

    def _unload(self, backend: Backend) -> None:
        """Frees a slot; requests waiting for one (``Activator.hold``) look again."""
        worker_id = backend.worker_id
        count = self.load.get(worker_id, 0)
        if count > 1:
            self.load[worker_id] = count - 1
        else:
            self.load.pop(worker_id, None)
        pool = self.pools.get(backend.pool)
        if pool is not None and pool.waiters:
            pool.wake()

    def forget_idle(self, conn: UpstreamConnection) -> None:
        conns = self.idle.get(conn.backend.worker_id)
        if conns and conn in conns:
            conns.remove(conn)

    def refused(self, exchange: Exchange, status: int) -> bool:
        """A worker refused ``exchange`` unread (503 draining, 429 busy): True to replay it.

        A 503 ejects the worker until a good probe (its ``/healthz`` answers 503 while it
        drains) or until the registry drops it; a 429 marks it full for ``busy_backoff_s``.
        The replay needs the whole body still held and a try left; after a 429 it also
        needs a worker of the pool that is neither tried nor known to be full.
        """
        backend = exchange.backend
        if backend is None:
            return False
        now = self.now()
        if status == 503:
            self.eject(backend, "it answered 503 (draining)")
        else:
            self.full = {w: t for w, t in self.full.items() if t > now}
            self.full[backend.worker_id] = now + self.config.busy_backoff_s
        pool = self.pools.get(exchange.pool)
        if not (
            exchange.replayable and exchange.body_done and exchange.attempts < self.config.max_tries
        ):
            replay = False
        elif status == 503:
            return True
        else:
            # NB: full workers join ``tried``, so the replay's choice skips them too.
            exchange.tried.update(self.full)
            replay = pool is not None and self._choose(pool, exchange.tried) is not None
        if not replay and status == 429 and pool is not None:
            pool.turned_away += 1  # demand the autoscaler must see (``demand_loop``)
        return replay

    def replay_refused(self, conn: UpstreamConnection, exchange: Exchange) -> None:
        """The worker refused the request unread (see ``refused``); another worker gets it."""
        self._detach(conn, exchange)
        exchange.sent = False
        self.stats["retries"] += 1
        logger.debug("request %s refused by a worker; retrying", exchange.request_id)
        self._redispatch(exchange)

    def _redispatch(self, exchange: Exchange) -> None:
        if exchange.client.closed:
            return
        task = asyncio.get_running_loop().create_task(self._dispatch_slow(exchange))
        exchange.task = task
        self._slow.add(task)
        task.add_done_callback(self._slow.discard)

    def upstream_broken(self, conn: UpstreamConnection, why: str, *, retry: bool = True) -> None:
        """The worker's connection failed mid-exchange: retry if safe, else 502 or cut.

        ``retry=False`` is for an answer the worker did give but that cannot be relayed.
        """
        exchange = conn.exchange
        conn.exchange = None
        self.busy.discard(conn)
        conn.close()
        if exchange is None:
            self.forget_idle(conn)
            return
        backend = exchange.backend
        self._release(exchange)
        exchange.upstream = None
        if exchange.responded:
            # Part of the answer is out: the client must see the cut.
            logger.warning(
                "worker %s broke off a response (request %s): %s",
                conn.backend.name,
                exchange.request_id,
                why,
                extra={logfields.WORKER_ID: conn.backend.worker_id[:12]},
            )
            exchange.closing = True
            exchange.client.close()
            return
        # Nothing sent (the request never left the outbox): any method may go elsewhere.
        unsent = not exchange.sent and exchange.attempts > 0
        safe = (
            (exchange.method in _IDEMPOTENT or unsent)
            and exchange.replayable
            and exchange.body_done
        )
        if retry and safe and exchange.attempts < self.config.max_tries:
            self.stats["retries"] += 1
            self._redispatch(exchange)
            return
        self.stats["errors"] += 1
        logger.warning(
            "request %s to worker %s failed after it was sent; not retried (%s): %s",
            exchange.request_id,
            backend.name if backend else "?",
            exchange.method,
            why,
        )
        self.reply_error(exchange, Reply(502, f"the worker failed before answering: {why}"))

    def abandon(self, exchange: Exchange) -> None:
        """The client went away: cancel the wait, or drop the half-used upstream connection."""
        if exchange.task is not None:
            exchange.task.cancel()
        conn = exchange.upstream
        if conn is not None:
            self._detach(conn, exchange)

    def reply_error(self, exchange: Exchange, reply: Reply) -> None:
        client = exchange.client
        if client.closed:
            return
        if reply.status >= 500:
            self.stats["errors"] += 1
        body = error_body(reply.status, str(reply), exchange.request_id)
        extra = b""
        if reply.retry_after_s is not None:
            extra = b"Retry-After: %d\r\n" % reply.retry_after_s
        keep = exchange.keep_alive and exchange.body_done
        exchange.closing = not keep
        client.write(
            b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"X-Request-Id: %b\r\n%b%b\r\n%b"
            % (
                reply.status,
                REASONS.get(reply.status, "Error").encode(),
                len(body),
                exchange.rid,
                extra,
                b"" if keep else b"Connection: close\r\n",
                body,
            )
        )
        client.done(exchange, self.now())

    # -- health ------------------------------------------------------------------------

    def eject(self, backend: Backend, why: str) -> None:
        if backend.worker_id in self.ejected or backend.worker_id not in self.routable:
            return
        self.ejected[backend.worker_id] = backend
        self.stats["ejections"] += 1
        for conn in self.idle.pop(backend.worker_id, []):
            conn.close()
        logger.warning(
            "ejected worker %s (%s) until its next good probe: %s",
            backend.name,
            backend.address,
            why,
            extra={logfields.WORKER_ID: backend.worker_id[:12], logfields.POOL: backend.pool},
        )

    async def probe(self, backend: Backend) -> bool:
        """One ``GET /healthz`` on a fresh connection; True on a 200."""
        request = (
            f"GET {self.config.probe_path} HTTP/1.1\r\nHost: {backend.address}\r\n"
            "Connection: close\r\nUser-Agent: shoal-balancer\r\n\r\n"
        ).encode()
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(backend.host, backend.port),
                timeout=self.config.connect_timeout_s,
            )
            writer.write(request)
            line = await asyncio.wait_for(reader.readline(), timeout=self.config.connect_timeout_s)
            parts = line.split()
            return len(parts) >= 2 and parts[1] == b"200"
        except (OSError, TimeoutError, ValueError):
            return False
        finally:
            if writer is not None:
                writer.close()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.probe_interval_s)
            ejected = list(self.ejected.values())
            if not ejected:
                continue
            results = await asyncio.gather(*(self.probe(b) for b in ejected))
            for backend, ok in zip(ejected, results, strict=True):
                if ok and self.ejected.pop(backend.worker_id, None) is not None:
                    logger.info(
                        "worker %s passed a probe; routing to it again",
                        backend.name,
                        extra={logfields.WORKER_ID: backend.worker_id[:12]},
                    )
                    pool = self.pools.get(backend.pool)
                    if pool is not None:
                        pool.wake()

    async def _sweep(self) -> None:
        """Applies the timeouts every ``sweep_interval_s`` (see ``_sweep_once``)."""
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                self._sweep_once(self.now())
            except Exception:  # one odd connection must not end the timeouts of all others
                logger.exception("balancer sweep failed; it goes on")

    def _sweep_once(self, now: float) -> None:
        """Times out slow workers (504), request bodies that stall (408), idle pooled
        connections, idle clients, and closed clients that never read their last bytes."""
        for conn in list(self.busy):
            exchange = conn.exchange
            if exchange is None:
                continue
            if not exchange.body_done:
                # The client is still sending: the pace is the client's, not the worker's.
                if now > exchange.body_deadline:
                    self._body_stalled(conn, exchange)
            elif now > exchange.deadline:
                self._time_out(conn, exchange)
        idle_limit = now - self.config.upstream_idle_s
        for worker_id, conns in list(self.idle.items()):
            keep = [c for c in conns if c.idle_since >= idle_limit and not c.closed]
            for conn in conns:
                if conn not in keep:
                    conn.close()
            self.idle[worker_id] = keep
        client_limit = now - self.config.client_idle_s
        for client in list(self.clients):
            queue = client.queue
            if client.closed:
                # A graceful close waits for the client to read what is left; one that
                # never reads would keep the socket and its buffers for ever.
                if client.closed_at < client_limit and client.transport is not None:
                    client.transport.abort()
            elif not queue:
                if client.idle_since < client_limit:
                    client.close()
            elif queue[-1].chunked and now > queue[-1].body_deadline:
                client.time_out_body()

    def _body_stalled(self, conn: UpstreamConnection, exchange: Exchange) -> None:
        """Nothing of the request body came for ``client_idle_s``: 408, and the worker
        connection (which has part of a request on it) is dropped."""
        self._detach(conn, exchange)
        if exchange.responded:
            exchange.closing = True
            exchange.client.close()
            return
        exchange.client.time_out_body()

    def _time_out(self, conn: UpstreamConnection, exchange: Exchange) -> None:
        self._detach(conn, exchange)
        if exchange.responded:
            logger.warning(
                "the answer to request %s from worker %s did not move for %gs (the client "
                "does not read it, or the worker stalled); cut",
                exchange.request_id,
                conn.backend.name,
                self.config.upstream_timeout_s,
                extra={logfields.WORKER_ID: conn.backend.worker_id[:12]},
            )
            exchange.closing = True
            exchange.client.close()
            return
        logger.warning(
            "worker %s did not answer request %s within %gs",
            conn.backend.name,
            exchange.request_id,
            self.config.upstream_timeout_s,
            extra={logfields.WORKER_ID: conn.backend.worker_id[:12]},
        )
        self.reply_error(exchange, Reply(504, "the worker did not answer in time"))

    def snapshot(self) -> dict[str, Any]:
        """Counters and the routing table, for status pages and tests."""
        return {
            **self.stats,
            "pools": {
                name: {
                    "strategy": pool.strategy.name,
                    "backends": [b.name for b in pool.backends],
                    "waiting": len(pool.waiters),
                }
                for name, pool in self.pools.items()
            },
            "ejected": sorted(b.name for b in self.ejected.values()),
            "inFlight": dict(self.load),
        }
