#!/usr/bin/env python3
"""Measures Shoal's queue throughput, side by side, in one run; prints figures, asserts nothing.

- enqueues per second through the HTTP API (``POST /enqueue-task`` served by
  ``api.app.make_app`` in a child process) with the sqlite and redis backends,
  beside a bare aiohttp JSON endpoint on the same harness for scale;
- raw redis-py XADD per second on the same Redis;
- lease+ack per second straight on each backend (what the dispatcher does);
- enqueues per second straight on each backend (no HTTP).

The load comes from a small keep-alive HTTP/1.1 client in this process (one
CPU), the server runs in another (the other CPU). Everything is bounded by
``--count`` and ``--max-seconds`` per phase and talks to 127.0.0.1 only; a
redis-server is started on a free loopback port unless ``--redis-url`` is given.

    hack/bench_queue.py [--count 20000] [--clients 200] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POOL = "default"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- the server side (child process) ------------------------------------------


async def _serve(queue_url: str, port: int, state_dir: Path, ready: Any, stop: Any) -> None:
    from aiohttp import web

    if queue_url == "bare":
        app = web.Application()

        async def bare(request: web.Request) -> web.Response:
            body = await request.json()
            return web.json_response({"id": "x", "pool": body["pool"]}, status=202)

        app.router.add_post("/enqueue-task", bare)
        queue = None
    else:
        from api.app import make_app
        from controller.manager import Controller, ControllerConfig
        from controller.queues import open_queue
        from controller.runtimes.fake import FakeRuntime

        queue = await open_queue(queue_url, state_dir=state_dir)
        controller = Controller(
            config=ControllerConfig(manifests=REPO / "manifests" / "pool.yaml"),
            runtime=FakeRuntime(),
            queue=queue,
        )
        controller.store.load()
        # manage_controller=False: no dispatcher or reconciler, only the enqueue path.
        app = make_app(controller, manage_controller=False)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    ready.set()
    await asyncio.to_thread(stop.wait)
    await runner.cleanup()
    if queue is not None:
        await queue.close()


def _server_main(queue_url: str, port: int, state_dir: str, ready: Any, stop: Any) -> None:
    asyncio.run(_serve(queue_url, port, Path(state_dir), ready, stop))


# --- the client side ------------------------------------------------------------


async def _http_client(
    port: int, bodies: list[bytes], next_index: list[int], deadline: float, stats: dict[str, int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while next_index[0] < len(bodies) and time.monotonic() < deadline:
            body = bodies[next_index[0]]
            next_index[0] += 1
            writer.write(
                b"POST /enqueue-task HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            stats["ok" if 200 <= status < 300 else "errors"] += 1
    finally:
        writer.close()


async def bench_http(
    queue_url: str, *, count: int, clients: int, max_seconds: float, state_dir: Path
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    port = _free_port()
    server = ctx.Process(
        target=_server_main, args=(queue_url, port, str(state_dir), ready, stop), daemon=True
    )
    server.start()
    try:
        if not await asyncio.to_thread(ready.wait, 60):
            raise RuntimeError(f"API server for {queue_url} did not start")
        bodies = [json.dumps({"pool": POOL, "payload": {"n": n}}).encode() for n in range(count)]
        stats = {"ok": 0, "errors": 0}
        index = [0]
        started = time.perf_counter()
        deadline = time.monotonic() + max_seconds
        await asyncio.gather(
            *(_http_client(port, bodies, index, deadline, stats) for _ in range(clients))
        )
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        await asyncio.to_thread(server.join, 30)
        if server.is_alive():
            server.kill()
    return {"per_s": stats["ok"] / elapsed, "ok": stats["ok"], "errors": stats["errors"]}


async def _run_concurrently(
    job: Callable[[int], Awaitable[bool]], *, count: int, clients: int, max_seconds: float
) -> tuple[float, int]:
    """Runs ``job(i)`` for i < count on ``clients`` coroutines; returns (per second, done)."""
    index = [0]
    done = [0]
    deadline = time.monotonic() + max_seconds

    async def client() -> None:
        while index[0] < count and time.monotonic() < deadline:
            i = index[0]
            index[0] += 1
            if await job(i):
                done[0] += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done[0] / (time.perf_counter() - started), done[0]


async def bench_direct(
    queue_url: str, *, count: int, clients: int, max_seconds: float, state_dir: Path
) -> dict[str, Any]:
    """Enqueue, then lease+ack, straight on the backend."""
    from controller.queues import EnqueueRequest, open_queue

    queue = await open_queue(queue_url, state_dir=state_dir)
    try:

        async def enqueue(i: int) -> bool:
            _, created = await queue.enqueue(EnqueueRequest(pool=POOL, payload={"n": i}))
            return created

        enqueue_per_s, enqueued = await _run_concurrently(
            enqueue, count=count, clients=clients, max_seconds=max_seconds
        )

        async def lease_ack(i: int) -> bool:
            worker = f"w{i % clients}"
            task = await queue.lease(POOL, worker=worker, lease_s=60)
            return task is not None and await queue.ack(task.id, worker=worker, result=None)

        # Fewer leasers than enqueuers: a dispatcher runs one lease per free worker slot.
        leasers = min(clients, 32)
        lease_ack_per_s, acked = await _run_concurrently(
            lease_ack, count=enqueued, clients=leasers, max_seconds=max_seconds
        )
        stats = getattr(queue, "stats", None)
    finally:
        await queue.close()
    return {
        "enqueue_per_s": enqueue_per_s,
        "lease_ack_per_s": lease_ack_per_s,
        "acked": acked,
        "writer": stats,
    }


async def bench_raw_xadd(redis_url: str, *, count: int, clients: int, max_seconds: float) -> float:
    import redis.asyncio as aioredis

    pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=64)
    client = aioredis.Redis.from_pool(pool)
    stream = f"bench:raw:{os.getpid()}:{time.time_ns()}"
    try:

        async def xadd(i: int) -> bool:
            await client.xadd(stream, {"id": str(i)})
            return True

        per_s, _ = await _run_concurrently(
            xadd, count=count, clients=clients, max_seconds=max_seconds
        )
        await client.delete(stream)
    finally:
        await client.aclose()
    return per_s


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from tests.redis_server import RedisServer, redis_server_available

    results: dict[str, Any] = {
        "http_enqueue_per_s": {},
        "lease_ack_per_s": {},
        "raw_xadd_per_s": None,
        "direct_enqueue_per_s": {},
        "http_errors": {},
        "bare_http_per_s": None,
        "clients": args.clients,
        "count": args.count,
        "cpus": os.cpu_count(),
    }
    limits = {"count": args.count, "clients": args.clients, "max_seconds": args.max_seconds}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        tmp_path = Path(tmp)
        redis_url = args.redis_url
        server: RedisServer | None = None
        if redis_url is None and redis_server_available():
            server = RedisServer(tmp_path / "redis")
            (tmp_path / "redis").mkdir()
            server.start()
            redis_url = server.url
        try:
            bare = await bench_http("bare", state_dir=tmp_path, **limits)
            results["bare_http_per_s"] = bare["per_s"]
            backends = {"sqlite": f"sqlite://{tmp_path}/http.db"}
            if redis_url is not None:
                backends["redis"] = redis_url
            for name, url in backends.items():
                if name == "redis":
                    await _flush(url)
                http = await bench_http(url, state_dir=tmp_path, **limits)
                results["http_enqueue_per_s"][name] = http["per_s"]
                results["http_errors"][name] = http["errors"]
            if redis_url is not None:
                results["raw_xadd_per_s"] = await bench_raw_xadd(redis_url, **limits)
            direct_urls = {"sqlite": f"sqlite://{tmp_path}/direct.db"}
            if redis_url is not None:
                await _flush(redis_url)
                direct_urls["redis"] = redis_url
            for name, url in direct_urls.items():
                direct = await bench_direct(url, state_dir=tmp_path, **limits)
                results["direct_enqueue_per_s"][name] = direct["enqueue_per_s"]
                results["lease_ack_per_s"][name] = direct["lease_ack_per_s"]
                if direct["writer"]:
                    results["sqlite_writer"] = direct["writer"]
        finally:
            if server is not None:
                server.stop()
    return results


async def _flush(redis_url: str) -> None:
    """Empties the bench's own Redis (only one this script started, or one named to it)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


def _print_table(results: dict[str, Any]) -> None:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}/s"

    print(f"Shoal queue benchmark: {results['count']} ops per phase, {results['clients']} clients")
    print(f"  bare aiohttp JSON endpoint (same harness)   {fmt(results['bare_http_per_s'])}")
    for name in ("sqlite", "redis"):
        print(f"  [{name}]")
        print(
            f"    enqueue via HTTP POST /enqueue-task       "
            f"{fmt(results['http_enqueue_per_s'].get(name))}"
            f"  (errors {results['http_errors'].get(name, '-')})"
        )
        print(
            f"    enqueue straight on the queue             "
            f"{fmt(results['direct_enqueue_per_s'].get(name))}"
        )
        print(
            f"    lease+ack straight on the queue           "
            f"{fmt(results['lease_ack_per_s'].get(name))}"
        )
    print(f"  raw redis-py XADD                           {fmt(results['raw_xadd_per_s'])}")
    if "sqlite_writer" in results:
        w = results["sqlite_writer"]
        print(f"  sqlite writer: {w['operations']} operations in {w['batches']} transactions")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000, help="operations per phase")
    parser.add_argument("--clients", type=int, default=200, help="concurrent clients")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="bound per phase")
    parser.add_argument(
        "--redis-url", help="use this Redis (its db is flushed) instead of a new one"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    results = asyncio.run(main(args))
    if args.json:
        print(json.dumps(results))
    else:
        _print_table(results)
