"""The balancer's proxy against small real aiohttp workers on loopback.

The registry is real; the control plane is the in-process one with a pool table
and a capacity hook the tests record. The proxy's clock is injected where a
timeout is under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from api.app import make_app
from api.balancer_cli import start_in_process
from api.endpoints import HttpControlPlane, PoolInfo, RegistryControlPlane
from api.proxy import Proxy, ProxyConfig
from controller.manager import Controller, ControllerConfig
from controller.queues.memory import MemoryQueue
from controller.registry import Registry
from controller.runtimes.base import WorkerId
from controller.runtimes.fake import FakeRuntime


@dataclass
class Worker:
    """A tiny worker: echoes, streams, stalls, refuses or hangs up on request."""

    name: str
    port: int = 0
    hits: list[str] = field(default_factory=list)
    peers: set[tuple[str, int]] = field(default_factory=set)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None
    hold_all: bool = False  # every request waits for ``release`` (a worker that hangs)
    refuse_with: int | None = None  # 503 (draining) or 429 (busy) to every request

    async def start(self, port: int = 0) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.peers.add(peer)
        body = await request.read()
        if self.hold_all:
            self.entered.set()
            await self.release.wait()
        if self.refuse_with == 503:
            return web.json_response({"error": "worker is draining"}, status=503)
        if self.refuse_with == 429:
            return web.json_response({"error": "all 4 slots are busy"}, status=429)
        if request.path == "/hangup":
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(0.05)
            raise ConnectionResetError
        if request.path == "/refuse":
            return web.json_response({"error": "draining"}, status=503)
        if request.path == "/hold":
            self.entered.set()
            await self.release.wait()
            return web.json_response({"error": "worker is draining"}, status=503)
        if request.path == "/bighead":
            return web.Response(text="x", headers={"X-Big": "b" * 70_000})
        if request.path == "/stall":
            await asyncio.sleep(30)
        if request.path == "/stream":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for i in range(64):
                await response.write(bytes([65 + i % 26]) * 32 * 1024)
            await response.write_eof()
            return response
        return web.json_response(
            {
                "worker": self.name,
                "method": request.method,
                "path": request.path_qs,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "size": len(body),
                "sha": hashlib.sha256(body).hexdigest(),
            }
        )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    registry: Registry
    proxy: Proxy
    url: str
    pools: dict[str, PoolInfo]
    asked: list[str]
    clock: Clock
    session: aiohttp.ClientSession
    capacity: Callable[..., bool]
    holds: list[float] = field(default_factory=list)
    reports: list[tuple[str, int]] = field(default_factory=list)

    def add(
        self, worker: Worker, *, pool: str = "default", ready: bool = True, concurrency: int = 4
    ) -> WorkerId:
        worker_id = WorkerId(f"id-{worker.name}")
        self.registry.add(
            worker_id=worker_id,
            name=worker.name,
            pool=pool,
            template_hash="t1",
            host="127.0.0.1",
            host_port=worker.port,
            concurrency=concurrency,
        )
        if ready:
            self.registry.mark_ready(worker_id)
        return worker_id


HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_harness() -> AsyncIterator[HarnessFactory]:
    made: list[Harness] = []

    async def make(**config: Any) -> Harness:
        registry = Registry()
        pools = {"default": PoolInfo("default", 4), "batch": PoolInfo("batch", 2)}
        asked: list[str] = []
        holds: list[float] = []
        reports: list[tuple[str, int]] = []
        answer = {"value": True}

        def capacity(pool: str, *, hold_s: float) -> bool:
            asked.append(pool)
            holds.append(hold_s)
            return answer["value"]

        def report(pool: str, *, in_flight: int) -> None:
            reports.append((pool, in_flight))

        control = RegistryControlPlane(
            registry=registry, pools=lambda: pools, request_capacity=capacity, report_load=report
        )
        clock = Clock()
        settings: dict[str, Any] = {
            "probe_interval_s": 0.02,
            "sweep_interval_s": 0.01,
            "activation_timeout_s": 5.0,
        }
        settings.update(config)
        proxy = Proxy(control, config=ProxyConfig(**settings), clock=clock)
        port = await proxy.start(host="127.0.0.1", port=0)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        harness = Harness(
            registry=registry,
            proxy=proxy,
            url=f"http://127.0.0.1:{port}",
            pools=pools,
            asked=asked,
            clock=clock,
            session=session,
            capacity=capacity,
            holds=holds,
            reports=reports,
        )
        harness.answer = answer  # type: ignore[attr-defined]
        made.append(harness)
        return harness

    yield make
    for harness in made:
        await harness.session.close()
        await harness.proxy.close()


@pytest.fixture
async def workers() -> AsyncIterator[Callable[[str], Awaitable[Worker]]]:
    started: list[Worker] = []

    async def start(name: str) -> Worker:
        worker = Worker(name)
        await worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.release.set()
        await worker.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_proxy_forwards_and_sets_forwarded_headers_and_request_id(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    h.add(await workers("a"))
    async with h.session.get(f"{h.url}/pools/default/echo?q=1") as response:
        assert response.status == 200
        doc = await response.json()
        request_id = response.headers["x-request-id"]
    assert doc["path"] == "/echo?q=1"
    headers = doc["headers"]
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == h.url.removeprefix("http://")
    assert headers["x-forwarded-prefix"] == "/pools/default"
    assert headers["x-request-id"] == request_id and request_id


async def test_proxy_keeps_the_clients_request_id_and_appends_to_forwarded_for(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    h.add(await workers("a"))
    sent = {"X-Request-Id": "abc-123", "X-Forwarded-For": "10.1.2.3", "Connection": "keep-alive"}
    async with h.session.get(f"{h.url}/echo", headers=sent) as response:
        doc = await response.json()
        assert response.headers["x-request-id"] == "abc-123"
    assert doc["headers"]["x-request-id"] == "abc-123"
    assert doc["headers"]["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"


async def test_proxy_streams_large_bodies_both_ways(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    h.add(await workers("a"))
    payload = bytes(range(256)) * (5 * 4096)  # 5 MiB
    async with h.session.post(f"{h.url}/upload", data=io.BytesIO(payload)) as response:
        doc = await response.json()
    assert doc["size"] == len(payload)
    assert doc["sha"] == hashlib.sha256(payload).hexdigest()
    async with h.session.get(f"{h.url}/stream") as response:
        assert response.status == 200
        body = await response.read()
    assert len(body) == 64 * 32 * 1024
    assert body[:3] == b"AAA" and body[-3:] == b"LLL"


async def test_proxy_reuses_pooled_upstream_connections(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    worker = await workers("a")
    h.add(worker)
    for _ in range(25):
        async with h.session.get(f"{h.url}/echo") as response:
            assert response.status == 200
    assert len(worker.hits) == 25
    assert len(worker.peers) == 1


async def test_proxy_routes_by_header_and_refuses_unknown_pools(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    h.add(await workers("a"))
    h.add(await workers("b"), pool="batch")
    async with h.session.get(f"{h.url}/echo", headers={"X-Shoal-Pool": "batch"}) as response:
        assert (await response.json())["worker"] == "b"
    async with h.session.get(f"{h.url}/echo") as response:
        assert (await response.json())["worker"] == "a"
    async with h.session.get(f"{h.url}/pools/nope/echo") as response:
        assert response.status == 404
        doc = await response.json()
    assert doc["error"] == "unknown pool 'nope'"
    assert h.asked == []


async def test_proxy_never_routes_to_starting_or_draining_workers(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    starting, draining, ready = await workers("s"), await workers("d"), await workers("r")
    h.add(starting, ready=False)
    h.registry.mark_draining(h.add(draining))
    h.add(ready)
    for _ in range(30):
        async with h.session.get(f"{h.url}/echo") as response:
            assert (await response.json())["worker"] == "r"
    assert starting.hits == [] and draining.hits == []


async def test_proxy_drops_a_worker_and_its_idle_connections_when_it_drains(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    a, b = await workers("a"), await workers("b")
    a_id = h.add(a)
    h.add(b)
    for _ in range(10):
        async with h.session.get(f"{h.url}/echo") as response:
            assert response.status == 200
    assert a.hits and a_id in h.proxy.idle
    before = len(a.hits)
    h.registry.mark_draining(a_id)
    assert a_id not in h.proxy.idle
    for _ in range(10):
        async with h.session.get(f"{h.url}/echo") as response:
            assert (await response.json())["worker"] == "b"
    assert len(a.hits) == before


async def test_proxy_spreads_concurrent_requests_by_least_connections(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    a, b = await workers("a"), await workers("b")
    h.add(a)
    h.add(b)
    # Four requests that stall until released: two must land on each worker.
    calls = [
        asyncio.ensure_future(h.session.get(f"{h.url}/hold", headers={"X-N": str(i)}))
        for i in range(4)
    ]
    for _ in range(200):
        if len(a.hits) + len(b.hits) == 4:
            break
        await asyncio.sleep(0.01)
    assert (len(a.hits), len(b.hits)) == (2, 2)
    a.release.set()
    b.release.set()
    for call in calls:
        (await call).release()


async def test_connect_failure_is_retried_on_another_worker_and_ejects_until_a_good_probe(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    dead_port = free_port()
    dead = Worker("dead", port=dead_port)
    dead_id = h.add(dead)
    alive = await workers("alive")
    h.add(alive)
    for _ in range(6):
        async with h.session.post(f"{h.url}/echo", data=b"x" * 100) as response:
            assert response.status == 200
            assert (await response.json())["worker"] == "alive"
    assert h.proxy.snapshot()["ejected"] == ["dead"]
    assert h.proxy.stats["ejections"] == 1

    # The worker comes up on its port: the next good probe puts it back.
    await dead.start(port=dead_port)
    try:
        for _ in range(300):
            if dead_id not in h.proxy.ejected:
                break
            await asyncio.sleep(0.01)
        assert dead_id not in h.proxy.ejected
        seen = set()
        for _ in range(6):
            async with h.session.get(f"{h.url}/echo") as response:
                seen.add((await response.json())["worker"])
        assert seen == {"dead", "alive"}
    finally:
        await dead.stop()


async def test_a_post_the_worker_may_have_started_is_not_retried(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    a, b = await workers("a"), await workers("b")
    h.add(a)
    h.add(b)
    async with h.session.post(f"{h.url}/hangup", data=b"task") as response:
        assert response.status == 502
        doc = await response.json()
    assert "Traceback" not in str(doc) and doc["status"] == 502
    assert len(a.hits) + len(b.hits) == 1


async def test_an_idempotent_request_is_retried_after_a_hang_up(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    a, b = await workers("a"), await workers("b")
    h.add(a)
    h.add(b)
    async with h.session.get(f"{h.url}/hangup") as response:
        assert response.status == 502
    assert len(a.hits) >= 1 and len(b.hits) >= 1
    assert h.proxy.stats["retries"] >= 1


async def test_a_503_from_a_worker_that_left_routing_is_replayed_elsewhere(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    """The race of a drain: the request reached the worker just as it began draining."""
    h = await make_harness()
    a = await workers("a")
    a.hold_all, a.refuse_with = True, 503
    a_id = h.add(a)
    call = asyncio.ensure_future(h.session.post(f"{h.url}/echo", data=b"task"))
    await asyncio.wait_for(a.entered.wait(), timeout=5)
    b = await workers("b")
    h.add(b)
    h.registry.mark_draining(a_id)
    a.release.set()
    response = await asyncio.wait_for(call, timeout=5)
    assert response.status == 200
    assert (await response.json())["worker"] == "b"
    assert h.proxy.stats["retries"] == 1
    response.release()


async def test_a_503_from_a_routable_worker_is_replayed_and_ejects_it(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    """``docker stop``: the worker drains itself before the registry hears of it."""
    h = await make_harness()
    a, b = await workers("a"), await workers("b")
    a.refuse_with = 503
    h.add(a)
    h.add(b)
    for _ in range(6):
        async with h.session.post(f"{h.url}/echo", data=b"task") as response:
            assert response.status == 200
            assert (await response.json())["worker"] == "b"
    assert len(a.hits) == 1, "a draining worker is asked once, then left out"
    assert h.proxy.snapshot()["ejected"] == ["a"]
    assert h.proxy.stats["retries"] == 1


async def test_a_503_from_the_only_worker_falls_back_to_the_activator(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness(activation_timeout_s=0.3)
    a = await workers("a")
    a.refuse_with = 503
    h.add(a)
    async with h.session.post(f"{h.url}/echo", data=b"task") as response:
        assert response.status == 503
        assert "had a free slot within 0.3s" in (await response.json())["error"]
    assert [path for path in a.hits if path != "/healthz"] == ["/echo"]
    assert "/healthz" in a.hits, "an ejected worker is probed"
    assert h.asked == ["default"]


async def test_a_503_with_a_body_too_large_to_replay_reaches_the_client(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    a, b = await workers("a"), await workers("b")
    a.refuse_with, b.refuse_with = 503, 503
    h.add(a)
    h.add(b)
    async with h.session.post(f"{h.url}/echo", data=b"x" * (65 * 1024)) as response:
        assert response.status == 503
        assert (await response.json())["error"] == "worker is draining"
    assert len(a.hits) + len(b.hits) == 1


async def test_a_429_is_replayed_on_a_worker_with_room(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    a, b = await workers("a"), await workers("b")
    a.refuse_with = 429
    h.add(a)
    h.add(b)
    for _ in range(4):
        async with h.session.post(f"{h.url}/echo", data=b"task") as response:
            assert response.status == 200
            assert (await response.json())["worker"] == "b"
    assert h.proxy.snapshot()["ejected"] == [], "a busy worker is not ejected"
    assert h.proxy.stats["retries"] >= 1


async def test_a_429_from_every_worker_reaches_the_client_with_retry_after(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    busy = [await workers(name) for name in ("a", "b")]
    for worker in busy:
        worker.refuse_with = 429
        h.add(worker)
    async with h.session.post(f"{h.url}/echo", data=b"task") as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"
        assert (await response.json())["error"] == "all 4 slots are busy"
    assert sorted(len(w.hits) for w in busy) == [1, 1]


async def test_a_request_for_a_pool_with_every_slot_taken_waits_for_one_and_counts_as_load(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness(demand_interval_s=0.05)
    worker = await workers("a")
    worker.hold_all = True
    h.add(worker, concurrency=1)

    first = asyncio.create_task(h.session.get(f"{h.url}/first"))
    await asyncio.wait_for(worker.entered.wait(), timeout=5)
    second = asyncio.create_task(h.session.get(f"{h.url}/second"))
    await _until(lambda: any(p.waiters for p in h.proxy.pools.values()))
    await _until(lambda: ("default", 2) in h.reports)
    assert worker.hits == ["/first"], "the full worker was not sent a request it would refuse"

    worker.release.set()
    for task, path in ((first, "/first"), (second, "/second")):
        async with await task as response:
            assert response.status == 200 and (await response.json())["path"] == path
    assert worker.hits == ["/first", "/second"]


async def test_requests_turned_away_with_429_count_as_load_for_the_autoscaler(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    """Every slot busy: in flight equals capacity, so only the refused show the shortfall."""
    h = await make_harness(demand_interval_s=0.05)
    worker = await workers("a")
    worker.refuse_with = 429
    h.add(worker)
    for _ in range(3):
        async with h.session.post(f"{h.url}/echo", data=b"task") as response:
            assert response.status == 429
    # Reports are per interval; the three may fall into one or more of them.
    await _until(lambda: sum(n for _, n in h.reports) >= 3)
    await _until(lambda: h.reports[-1] == ("default", 0))


async def test_a_worker_that_does_not_answer_in_time_gets_504(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness(upstream_timeout_s=10.0)
    h.add(await workers("a"))
    call = asyncio.ensure_future(h.session.get(f"{h.url}/stall"))
    for _ in range(200):
        if h.proxy.busy:
            break
        await asyncio.sleep(0.01)
    h.clock.now += 11.0
    response = await asyncio.wait_for(call, timeout=5)
    assert response.status == 504
    assert (await response.json())["error"] == "the worker did not answer in time"


async def test_activator_holds_a_request_until_the_first_worker_is_ready(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    call = asyncio.ensure_future(h.session.get(f"{h.url}/echo"))
    for _ in range(200):
        if h.asked:
            break
        await asyncio.sleep(0.01)
    assert h.asked == ["default"]
    assert h.holds == [2 * h.proxy.config.demand_interval_s]
    assert not call.done()
    worker = await workers("a")
    worker_id = h.add(worker, ready=False)
    await asyncio.sleep(0.05)
    assert not call.done(), "a starting worker must not get the request"
    h.registry.mark_ready(worker_id)
    response = await asyncio.wait_for(call, timeout=5)
    assert response.status == 200
    assert (await response.json())["worker"] == "a"


async def test_requests_woken_by_a_new_worker_take_only_its_slots(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    """A worker that joins a pool with waiting requests gets as many as it has slots."""
    h = await make_harness()
    calls = [asyncio.ensure_future(h.session.get(f"{h.url}/w{i}")) for i in range(3)]
    await _until(lambda: sum(len(p.waiters) for p in h.proxy.pools.values()) == 3)
    worker = await workers("a")
    worker.hold_all = True
    h.add(worker, concurrency=1)
    await asyncio.wait_for(worker.entered.wait(), timeout=5)
    await asyncio.sleep(0.1)
    assert len(worker.hits) == 1, f"a 1-slot worker was sent {worker.hits}"
    worker.release.set()
    for call in calls:
        response = await asyncio.wait_for(call, timeout=5)
        assert response.status == 200
    assert sorted(worker.hits) == ["/w0", "/w1", "/w2"]


async def test_activator_answers_503_with_retry_after_when_max_is_zero(
    make_harness: HarnessFactory,
) -> None:
    h = await make_harness()
    h.pools["default"] = PoolInfo("default", 0)
    async with h.session.get(f"{h.url}/echo") as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
        assert "max 0" in (await response.json())["error"]
    assert h.asked == []


async def test_activator_answers_503_when_the_controller_refuses(
    make_harness: HarnessFactory,
) -> None:
    h = await make_harness()
    h.answer["value"] = False  # type: ignore[attr-defined]
    async with h.session.get(f"{h.url}/echo") as response:
        assert response.status == 503
        assert "Retry-After" in response.headers
    assert h.asked == ["default"]


async def test_activator_gives_up_after_its_timeout(make_harness: HarnessFactory) -> None:
    h = await make_harness(activation_timeout_s=0.2)
    async with h.session.get(f"{h.url}/echo") as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
        assert "within 0.2s" in (await response.json())["error"]


async def test_malformed_requests_get_json_400_and_no_traceback(
    make_harness: HarnessFactory,
) -> None:
    h = await make_harness()
    host, port = h.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"Traceback" not in data and b'"status": 400' in data


async def test_pipelined_requests_are_answered_in_order(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    h.add(await workers("a"))
    host, port = h.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /third HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    data = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    assert data.count(b"HTTP/1.1 200 ") == 3
    assert data.index(b"/first") < data.index(b"/second") < data.index(b"/third")


async def test_a_bad_request_after_good_pipelined_ones_is_refused_after_their_answers(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    worker = await workers("a")
    h.add(worker)
    host, port = h.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"NOT HTTP AT ALL\r\n\r\n"
        b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    data = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    answers = data.split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"200", b"200", b"400"], data
    assert b"/first" in answers[0] and b"/second" in answers[1]
    assert worker.hits == ["/first", "/second"], "nothing after the bad request is forwarded"


# -- following the registry over HTTP ------------------------------------------------------

MANIFEST = """
apiVersion: shoal/v1
kind: WorkerPool
metadata: {name: default}
spec:
  replicas: {min: 0, max: 3}
"""


@pytest.fixture
def controller(tmp_path: Path) -> Controller:
    manifest = tmp_path / "pool.yaml"
    manifest.write_text(MANIFEST)
    ctl = Controller(
        config=ControllerConfig(manifests=manifest), runtime=FakeRuntime(), queue=MemoryQueue()
    )
    ctl.store.load()
    return ctl


async def _serve_api(controller: Controller, port: int) -> web.AppRunner:
    runner = web.AppRunner(
        make_app(controller, manage_controller=False), access_log=None, shutdown_timeout=0.2
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def _until(predicate: Callable[[], bool], *, polls: int = 500) -> None:
    for _ in range(polls):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_http_control_plane_lists_watches_and_relists_after_410(
    controller: Controller,
) -> None:
    port = free_port()
    registry = controller.registry
    runner = await _serve_api(controller, port)
    seen: list[set[str]] = []
    control = HttpControlPlane(f"http://127.0.0.1:{port}", max_backoff_s=0.05)
    try:
        registry.add(
            worker_id=WorkerId("w1"),
            name="w1",
            pool="default",
            template_hash="t",
            host="127.0.0.1",
            host_port=9001,
            concurrency=1,
        )
        registry.mark_ready(WorkerId("w1"))
        await control.start(lambda backends: seen.append(set(backends)))
        assert seen[-1] == {"w1"}
        assert control.pools()["default"].max_replicas == 3

        registry.add(
            worker_id=WorkerId("w2"),
            name="w2",
            pool="default",
            template_hash="t",
            host="127.0.0.1",
            host_port=9002,
            concurrency=1,
        )
        await asyncio.sleep(0.05)
        assert seen[-1] == {"w1"}, "a starting worker is not routable"
        registry.mark_ready(WorkerId("w2"))
        await _until(lambda: seen[-1] == {"w1", "w2"})
        registry.mark_draining(WorkerId("w1"))
        await _until(lambda: seen[-1] == {"w2"})
        assert control.lists == 1

        # The controller goes away while far more changes happen than its history keeps.
        await runner.cleanup()
        for _ in range(2100):
            registry.acquire_slot(WorkerId("w2"))
            registry.release_slot(WorkerId("w2"))
        registry.remove(WorkerId("w2"))
        registry.add(
            worker_id=WorkerId("w3"),
            name="w3",
            pool="default",
            template_hash="t",
            host="127.0.0.1",
            host_port=9003,
            concurrency=1,
        )
        registry.mark_ready(WorkerId("w3"))
        runner = await _serve_api(controller, port)
        await _until(lambda: seen[-1] == {"w3"})
        assert control.lists == 2
        assert control.resource_version >= registry.resource_version - 1
    finally:
        await control.close()
        await runner.cleanup()


async def test_standalone_proxy_activates_a_pool_over_http(controller: Controller) -> None:
    """``--controller`` mode: activation goes to POST /v1/pools/{pool}/activate."""
    port = free_port()
    runner = await _serve_api(controller, port)
    worker = Worker("a")
    await worker.start()
    proxy = Proxy(HttpControlPlane(f"http://127.0.0.1:{port}"))
    proxy_port = await proxy.start(host="127.0.0.1", port=0)
    try:
        async with aiohttp.ClientSession() as session:
            call = asyncio.ensure_future(session.get(f"http://127.0.0.1:{proxy_port}/echo"))
            await _until(lambda: controller.reconciler.pools.get("default") is not None)
            controller.registry.add(
                worker_id=WorkerId("w1"),
                name="w1",
                pool="default",
                template_hash="t",
                host="127.0.0.1",
                host_port=worker.port,
                concurrency=1,
            )
            controller.registry.mark_ready(WorkerId("w1"))
            response = await asyncio.wait_for(call, timeout=5)
            assert response.status == 200
            response.release()
            async with session.get(f"http://127.0.0.1:{proxy_port}/pools/nope/x") as response:
                assert response.status == 404
    finally:
        await proxy.close()
        await runner.cleanup()
        await worker.stop()


async def test_start_in_process_follows_the_controllers_registry(controller: Controller) -> None:
    worker = Worker("a")
    await worker.start()
    handle = await start_in_process(controller, host="127.0.0.1", port=0)
    try:
        controller.registry.add(
            worker_id=WorkerId("w1"),
            name="w1",
            pool="default",
            template_hash="t",
            host="127.0.0.1",
            host_port=worker.port,
            concurrency=1,
        )
        controller.registry.mark_ready(WorkerId("w1"))
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{handle.url}/pools/default/echo") as response:
                assert response.status == 200
                assert (await response.json())["worker"] == "a"
    finally:
        await handle.close()
        with contextlib.suppress(Exception):
            await worker.stop()


async def _raw(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    return data


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: x\r\n folded: value\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost : x\r\n\r\n",
    ],
    ids=["two-lengths", "length-and-chunked", "folded-header", "space-before-colon"],
)
async def test_ambiguous_requests_are_refused_not_forwarded(
    make_harness: HarnessFactory,
    workers: Callable[[str], Awaitable[Worker]],
    request_bytes: bytes,
) -> None:
    """Shapes used for request smuggling never reach a worker."""
    h = await make_harness()
    worker = await workers("a")
    h.add(worker)
    data = await _raw(h.url, request_bytes)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert worker.hits == []


async def test_a_client_asking_to_close_gets_its_answer_and_a_close(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    h.add(await workers("a"))
    data = await _raw(h.url, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = data.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Connection: close" in head


async def test_a_pool_with_traffic_keeps_asking_for_capacity(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    """Balancer traffic is invisible to the queue-based autoscaler; demand keeps it above zero."""
    h = await make_harness(demand_interval_s=0.02)
    h.add(await workers("a"))
    async with h.session.get(f"{h.url}/echo") as response:
        assert response.status == 200
    await _until(lambda: "default" in h.asked)
    assert "batch" not in h.asked
    assert set(h.holds) == {0.04}, "a hold of twice the interval, not a fixed 30 s"


async def test_requests_in_flight_are_reported_while_above_zero_and_once_at_zero(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness(demand_interval_s=0.02)
    a, b = await workers("a"), await workers("b")
    a.hold_all = b.hold_all = True
    h.add(a)
    h.add(b)
    calls = [asyncio.ensure_future(h.session.get(f"{h.url}/echo?n={i}")) for i in range(3)]
    await _until(lambda: ("default", 3) in h.reports)
    a.release.set()
    b.release.set()
    for call in calls:
        (await call).release()
    await _until(lambda: ("default", 0) in h.reports)
    settled = len(h.reports)
    for _ in range(10):
        await asyncio.sleep(0.02)
    assert len(h.reports) == settled, "no report while the pool stays at zero"
    assert h.reports[-1] == ("default", 0) and h.reports.count(("default", 0)) == 1
    assert {pool for pool, _ in h.reports} == {"default"}


async def test_control_planes_pass_the_load_on_to_the_reconciler(controller: Controller) -> None:
    local = RegistryControlPlane.from_controller(controller)
    await local.report_load("default", 3)
    assert controller.reconciler.pools["default"].sync_in_flight == 3

    port = free_port()
    runner = await _serve_api(controller, port)
    remote = HttpControlPlane(f"http://127.0.0.1:{port}")
    try:
        await remote.start(lambda backends: None)
        await remote.report_load("default", 5)
        assert controller.reconciler.pools["default"].sync_in_flight == 5
    finally:
        await remote.close()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("method", "status", "retried"),
    [("GET", 200, True), ("POST", 502, False)],
    ids=["get-retried", "post-not-retried"],
)
async def test_requests_in_flight_on_a_deleted_worker_end_at_once(
    make_harness: HarnessFactory,
    workers: Callable[[str], Awaitable[Worker]],
    method: str,
    status: int,
    retried: bool,
) -> None:
    """A worker deleted from the registry is stopped: waiting on it would hang forever."""
    h = await make_harness()
    hung = await workers("hung")
    hung.hold_all = True
    hung_id = h.add(hung)
    call = asyncio.ensure_future(h.session.request(method, f"{h.url}/echo", data=b"t"))
    await asyncio.wait_for(hung.entered.wait(), timeout=5)
    h.add(await workers("b"))
    h.registry.remove(hung_id)
    response = await asyncio.wait_for(call, timeout=5)
    assert response.status == status
    if retried:
        assert (await response.json())["worker"] == "b"
    else:
        assert "the worker is gone" in (await response.json())["error"]
    response.release()


async def _head_refused(url: str, parts: list[bytes]) -> bytes:
    """Sends ``parts`` one by one (stopping once the proxy hangs up) and reads the answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    answer = asyncio.ensure_future(reader.read())
    try:
        for part in parts:
            if answer.done():
                break
            writer.write(part)
            await writer.drain()
        return await asyncio.wait_for(answer, timeout=5)
    finally:
        writer.close()


@pytest.mark.parametrize("whole", [True, False], ids=["in-one-write", "endless-header"])
async def test_a_request_head_over_64_kib_gets_431_and_a_close(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]], whole: bool
) -> None:
    h = await make_harness()
    worker = await workers("a")
    h.add(worker)
    start = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: "
    if whole:
        parts = [start + b"a" * 70_000 + b"\r\n\r\n"]
    else:
        # 16 MiB of one header value, bounded: the proxy must hang up long before the end.
        parts = [start] + [b"a" * 16_384] * 1024
    data = await _head_refused(h.url, parts)
    assert data.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"Connection: close" in data and b'"status": 431' in data
    assert worker.hits == []


async def test_a_request_head_just_under_the_cap_is_forwarded(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    h.add(await workers("a"))
    sent = {f"X-Big-{i}": "a" * 4000 for i in range(15)}  # 60 kB in all
    async with h.session.get(f"{h.url}/echo", headers=sent) as response:
        assert response.status == 200
        assert (await response.json())["headers"]["x-big-14"] == "a" * 4000


async def test_a_worker_response_head_over_64_kib_gets_502(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    worker = await workers("a")
    h.add(worker)
    async with h.session.get(f"{h.url}/bighead") as response:
        assert response.status == 502
        assert "over 64 KiB" in (await response.json())["error"]
    assert worker.hits == ["/bighead"]


async def test_a_standalone_balancer_whose_token_is_refused_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong token is one ERROR in the log and a 503 to clients, not 404 unknown pool."""
    seen: list[str] = []

    async def refuse(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"error": "unauthorized"}, status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    control = HttpControlPlane(
        f"http://127.0.0.1:{port}", token="wrong", max_backoff_s=0.02, first_list_timeout_s=0.1
    )
    proxy = Proxy(control)
    proxy_port = await proxy.start(host="127.0.0.1", port=0)
    try:
        await _until(lambda: seen.count("/v1/workers") >= 4)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{proxy_port}/pools/default/x") as response:
                assert response.status == 503
                doc = await response.json()
        assert doc["error"] == "balancer cannot read the controller's workers"
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "refused the balancer's API token" in errors[0].getMessage()
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
    finally:
        await proxy.close()
        await runner.cleanup()


async def test_a_chunked_request_body_is_forwarded_with_a_content_length(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    """Workers refuse chunked bodies (411); the balancer de-chunks those it can hold."""
    h = await make_harness()
    h.add(await workers("a"))
    payload = bytes(range(256)) * 200  # 50 kB

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 7000):
            yield payload[start : start + 7000]

    async with h.session.post(f"{h.url}/upload", data=chunks()) as response:
        assert response.status == 200
        doc = await response.json()
    assert doc["size"] == len(payload)
    assert doc["sha"] == hashlib.sha256(payload).hexdigest()
    assert doc["headers"]["content-length"] == str(len(payload))
    assert "transfer-encoding" not in doc["headers"]


async def test_a_chunked_request_body_over_the_replay_limit_gets_411(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    worker = await workers("a")
    h.add(worker)
    chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"  # 16 KiB per chunk
    head = b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    data = await _head_refused(h.url, [head] + [chunk] * 64 + [b"0\r\n\r\n"])
    assert data.startswith(b"HTTP/1.1 411 Length Required\r\n")
    assert b"send it with a Content-Length" in data
    assert worker.hits == []


async def test_pipelined_requests_after_a_chunked_one_keep_their_order(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    h.add(await workers("a"))
    data = await _raw(
        h.url,
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /second HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        b"GET /third HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert data.count(b"HTTP/1.1 200 ") == 3
    assert data.index(b"/first") < data.index(b"/second") < data.index(b"/third")
    assert b'"size": 5' in data


async def test_a_pools_path_without_a_name_is_an_unknown_pool(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    worker = await workers("a")
    h.add(worker)
    data = await _raw(h.url, b"GET /pools//x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 404 ")
    assert b"unknown pool" in data
    assert worker.hits == []


async def test_an_absolute_form_target_is_routed_like_origin_form(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness()
    h.add(await workers("a"))
    h.add(await workers("b"), pool="batch")
    data = await _raw(
        h.url,
        b"GET http://shoal.example/pools/batch/echo?q=1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET HTTP://shoal.example?z=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    first, second = data.split(b"HTTP/1.1 200 ")[1:]
    assert b'"worker": "b"' in first and b'"path": "/echo?q=1"' in first
    assert b'"x-forwarded-host": "shoal.example"' in first
    assert b'"x-forwarded-prefix": "/pools/batch"' in first
    assert b'"worker": "a"' in second and b'"path": "/?z=2"' in second


async def test_a_chunked_body_that_stalls_gets_408_and_the_requests_before_it_their_answers(
    make_harness: HarnessFactory, workers: Callable[[str], Awaitable[Worker]]
) -> None:
    h = await make_harness(client_idle_s=30.0)
    worker = await workers("a")
    h.add(worker)
    host, port = h.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /slow HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    )
    await _until(lambda: worker.hits == ["/first"])
    h.clock.now += 29.0
    await asyncio.sleep(0.05)  # a few sweeps: not yet
    assert h.proxy.clients and not writer.is_closing()
    h.clock.now += 2.0
    data = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    answers = data.split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"200", b"408"], data
    assert b"nothing of it arrived for 30s" in answers[1]
    assert worker.hits == ["/first"]
