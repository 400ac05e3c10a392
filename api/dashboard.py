"""The live dashboard: the page at ``/`` and the server-sent event stream behind it.

It owns the ``StreamHub``: one background ticker that computes one compact snapshot per tick
(every ``interval_s`` while a page is open, and at once when the registry changes) and hands the
same encoded bytes to every connected page through a small bounded buffer per client. A page that
falls behind is disconnected rather than buffered without bound; its browser reconnects and gets a
fresh ``hello`` with the kept history. The hub keeps a short history of queue and replica samples
and of scaling events so that a page opened late still draws charts.

It decides nothing and writes nothing: it only reads the controller (registry, reconciler status
and events, queue counts). The static files live in ``api/dashboard/`` and are served as they are;
the page loads nothing from any other origin (the Content-Security-Policy says so to the browser).

Wiring: ``setup(app)`` adds the routes and ties the hub to the app's startup and shutdown, so open
streams end promptly when the server stops. With ``app.add_routes(routes)`` alone the page still
works, but the hub only runs while a page is open and open streams hold shutdown until aiohttp's
shutdown timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.resources
import itertools
import json
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from api.keys import CONTROLLER
from controller import logfields
from controller.manager import Controller
from controller.poolstate import ScalingEvent
from controller.registry import WatchEvent

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()

# At the busy interval, 1,800 samples hold 15 minutes; idle samples are 4x sparser.
HISTORY_SAMPLES = 1800
EVENT_HISTORY = 200
DEPARTED = 100
CLIENT_BUFFER = 8
WRITE_TIMEOUT_S = 5.0

_ASSETS = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
_SECURITY_HEADERS = {
    # The page must work offline: refuse anything that is not from this server.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@dataclass(eq=False)
class _Client:
    """One open stream: its buffer of encoded messages; ``None`` in the buffer means "end"."""

    buffer: asyncio.Queue[bytes | None] = field(
        default_factory=lambda: asyncio.Queue(maxsize=CLIENT_BUFFER)
    )
    dropped: bool = False

    def offer(self, message: bytes) -> bool:
        """Queues ``message``; on a full buffer, ends the stream instead and returns False."""
        if self.dropped:
            return False
        try:
            self.buffer.put_nowait(message)
        except asyncio.QueueFull:
            self.end()
            return False
        return True

    def end(self) -> None:
        self.dropped = True
        while not self.buffer.empty():
            self.buffer.get_nowait()
        self.buffer.put_nowait(None)


def sse_message(kind: str, data: dict[str, Any], *, event_id: int | None = None) -> bytes:
    """Encodes one server-sent event; JSON never holds a raw newline, so one data line does."""
    head = f"event: {kind}\n" if kind != "message" else ""
    if event_id is not None:
        head += f"id: {event_id}\n"
    body = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return f"{head}data: {body}\n\n".encode()


class StreamHub:
    """Computes snapshots for the dashboard and fans them out to the open streams."""

    def __init__(
        self,
        controller: Controller,
        *,
        interval_s: float = 0.5,
        idle_interval_s: float = 2.0,
        min_gap_s: float = 0.1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._controller = controller
        self.interval_s = interval_s
        self.idle_interval_s = idle_interval_s
        self.min_gap_s = min_gap_s
        self._clock = clock
        self._clients: set[_Client] = set()
        self._changed = asyncio.Event()
        self._attached = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # Runs with no page open too (when set up through ``setup``), so history exists.
        self.always_on = False
        self.samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY_SAMPLES)
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENT_HISTORY)
        self.latest: dict[str, Any] | None = None
        self.ticks = 0
        self._event_seq = itertools.count(1)
        self._last_event: ScalingEvent | None = None
        self._last_error: str | None = None
        # Workers that left, with their final counts: a page opened later still shows their work.
        self.departed: collections.deque[dict[str, Any]] = collections.deque(maxlen=DEPARTED)
        controller.registry.subscribe(self._on_registry_change)
        controller.store.subscribe(self._changed.set)

    def _on_registry_change(self, event: WatchEvent) -> None:
        if event.type == "DELETED":
            worker = event.worker
            self.departed.append(
                {
                    "id": worker.short_id,
                    "name": worker.name,
                    "pool": worker.pool,
                    "processed": worker.processed,
                    "failed": worker.failed,
                    "goneAt": round(self._clock(), 3),
                }
            )
        self._changed.set()

    @property
    def n_clients(self) -> int:
        return len(self._clients)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Starts the ticker if it is not running; idempotent."""
        if self._closed or (self._task is not None and not self._task.done()):
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dashboard-hub")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self) -> None:
        """Ends every open stream and stops the ticker; the hub stays closed."""
        self._closed = True
        for client in list(self._clients):
            client.end()
        await self.stop()

    # -- clients ------------------------------------------------------------------------

    async def attach(self) -> tuple[_Client, bytes]:
        """Registers a page; returns its client and the ``hello`` message it starts with."""
        if self.latest is None:
            await self.tick()
        client = _Client()
        self._clients.add(client)
        self.start()
        # An idle hub may be seconds from its next tick; the new page wants one soon.
        self._attached.set()
        return client, self._hello()

    async def detach(self, client: _Client) -> None:
        self._clients.discard(client)
        if not self._clients and not self.always_on:
            await self.stop()

    def _hello(self) -> bytes:
        return sse_message(
            "hello",
            {
                "intervalS": self.interval_s,
                "samples": list(self.samples),
                "events": list(self.events),
                "departed": list(self.departed),
                "snapshot": self.latest,
            },
        )

    # -- ticking ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the stream must outlive one bad read
                self._note_error(exc)
            # Registry changes push at once, but never more often than every min_gap_s:
            # a busy pool changes in-flight counts hundreds of times a second. With no page
            # open, only the idle interval or a new page ends the wait.
            await asyncio.sleep(self.min_gap_s)
            watched = bool(self._clients)
            interval_s = self.interval_s if watched else self.idle_interval_s
            wake = self._changed if watched else self._attached
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, interval_s - self.min_gap_s)):
                    await wake.wait()
            self._changed.clear()
            self._attached.clear()

    def _note_error(self, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if message != self._last_error:
            logger.warning("dashboard snapshot failed: %s", message)
        self._last_error = message

    async def tick(self) -> dict[str, Any]:
        """Takes one snapshot, records it in the history and sends it to every open stream."""
        snapshot = await self._snapshot()
        self.ticks += 1
        self._last_error = None
        self.latest = snapshot
        self.samples.append(_sample_of(snapshot))
        message = sse_message("message", snapshot, event_id=self.ticks)
        for client in list(self._clients):
            if not client.offer(message):
                self._clients.discard(client)
                logger.info("dashboard stream fell behind and was closed")
        return snapshot

    async def _snapshot(self) -> dict[str, Any]:
        controller = self._controller
        names = sorted(controller.store.pools)
        statuses = {name: controller.reconciler.status(name) for name in names}
        counts = await _queue_counts(controller, names, statuses)
        pools: dict[str, Any] = {}
        for name in names:
            status = statuses[name]
            decision = status["lastDecision"]
            replicas = status["replicas"] or {}
            pools[name] = {
                "queued": counts[name].get("queued", 0),
                "running": counts[name].get("running", 0),
                "dead": counts[name].get("dead", 0),
                "succeeded": counts[name].get("succeeded", 0),
                "failed": counts[name].get("failed", 0),
                "desired": status["desired"],
                "ready": status["ready"],
                "starting": status["starting"],
                "draining": status["draining"],
                "min": replicas.get("min"),
                "max": replicas.get("max"),
                "reason": decision["reason"] if decision else None,
                "panic": status["panic"],
                "backoffS": round(status["backoffS"], 1),
                "lastError": status["lastError"],
            }
        workers = [
            {
                "id": w.short_id,
                "name": w.name,
                "pool": w.pool,
                "hostPort": w.host_port,
                "state": w.state,
                "healthy": w.healthy,
                "inFlight": w.in_flight,
                "concurrency": w.concurrency,
                "processed": w.processed,
                "failed": w.failed,
                "createdAt": w.created_at,
            }
            for w in controller.registry.list()
        ]
        error = controller.store.error
        return {
            "t": round(self._clock(), 3),
            "pools": pools,
            "workers": workers,
            "events": self._new_events(),
            "policyError": error.to_json() if error is not None else None,
        }

    def _new_events(self) -> list[dict[str, Any]]:
        """Scaling events the reconciler recorded since the previous tick, numbered."""
        kept = self._controller.reconciler.events
        fresh: list[ScalingEvent] = []
        for event in reversed(kept):
            if event is self._last_event:
                break
            fresh.append(event)
        if not fresh:
            return []
        self._last_event = fresh[0]
        numbered = [{"seq": next(self._event_seq), **e.to_json()} for e in reversed(fresh)]
        self.events.extend(numbered)
        return numbered


async def _queue_counts(
    controller: Controller, names: list[str], statuses: dict[str, dict[str, Any]]
) -> dict[str, dict[str, int]]:
    """Fresh queue counts; the reconciler's from its last pass when the queue does not answer."""
    try:
        counts = await asyncio.gather(*(controller.queue.counts(n) for n in names))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.debug("queue counts unavailable for the dashboard: %s", exc)
        return {name: dict(statuses[name]["queue"]) for name in names}
    return {name: c.to_json() for name, c in zip(names, counts, strict=True)}


def _sample_of(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The part of a snapshot the charts draw: per pool [queued, running, desired, ready, up]."""
    return {
        "t": snapshot["t"],
        "p": {
            name: [
                p["queued"],
                p["running"],
                p["desired"],
                p["ready"],
                p["ready"] + p["starting"],
            ]
            for name, p in snapshot["pools"].items()
        },
    }


# -- wiring -------------------------------------------------------------------------------

# One hub per controller: made at startup by ``setup``, or on first use with routes alone.
_hubs: weakref.WeakKeyDictionary[Controller, StreamHub] = weakref.WeakKeyDictionary()


_WIRED = web.AppKey("dashboard_wired", bool)


def setup(app: web.Application, *, interval_s: float = 0.5) -> None:
    """Adds the dashboard routes and runs the hub from startup to shutdown of ``app``.

    Idempotent, and safe on an app that already has ``routes`` added: only the hooks are new.
    """
    if app.get(_WIRED):
        return
    app[_WIRED] = True
    paths = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    if "/v1/stream" not in paths:
        app.add_routes(routes)

    async def on_startup(app: web.Application) -> None:
        hub = StreamHub(app[CONTROLLER], interval_s=interval_s)
        hub.always_on = True
        _hubs[app[CONTROLLER]] = hub
        hub.start()

    async def on_shutdown(app: web.Application) -> None:
        hub = _hubs.pop(app[CONTROLLER], None)
        if hub is not None:
            await hub.close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)


def hub_of(app: web.Application) -> StreamHub:
    """The app's hub, made on first use if ``setup`` did not make one at startup."""
    controller = app[CONTROLLER]
    hub = _hubs.get(controller)
    if hub is None:
        hub = StreamHub(controller)
        _hubs[controller] = hub
    return hub


def _asset(name: str) -> bytes:
    return (importlib.resources.files("api") / "dashboard" / name).read_bytes()


@routes.get("/")
async def page(request: web.Request) -> web.Response:
    return _asset_response("index.html")


@routes.get("/dashboard/{name}")
async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _ASSETS:
        raise web.HTTPNotFound(text=f"no dashboard file {name!r}")
    return _asset_response(name)


def _asset_response(name: str) -> web.Response:
    return web.Response(
        body=_asset(name),
        content_type=_ASSETS[name],
        charset="utf-8",
        headers=_SECURITY_HEADERS,
    )


@routes.get("/v1/stream")
async def stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one ``hello`` with history, then one snapshot per tick."""
    hub = hub_of(request.app)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    client, hello = await hub.attach()
    logger.debug(
        "dashboard stream opened from %s (%d open)",
        request.remote,
        hub.n_clients,
        extra={logfields.ACTION: "stream-open"},
    )
    try:
        # A browser that lost the stream waits this long before it reconnects.
        await _write(response, b"retry: 2000\n\n" + hello)
        while (message := await client.buffer.get()) is not None:
            await _write(response, message)
    except (ConnectionResetError, TimeoutError):
        pass
    finally:
        await hub.detach(client)
        logger.debug("dashboard stream closed (%d open)", hub.n_clients)
    return response


async def _write(response: web.StreamResponse, data: bytes) -> None:
    # NB: a client that stops reading stalls write(); the bound turns that into a disconnect.
    async with asyncio.timeout(WRITE_TIMEOUT_S):
        await response.write(data)
