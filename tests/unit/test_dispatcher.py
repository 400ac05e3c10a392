"""The dispatcher against a small real worker app: each answer maps onto the queue contract."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from controller.dispatcher import Dispatcher, Outcome
from controller.policy import parse_pools
from controller.queues.base import EnqueueRequest
from controller.queues.memory import MemoryQueue
from controller.registry import Registry
from controller.runtimes.base import WorkerId

POOL = parse_pools(
    """
apiVersion: shoal/v1
kind: WorkerPool
metadata: {name: default}
spec:
  template: {concurrency: 1}
  delivery: {leaseTimeout: 30s, maxAttempts: 3, backoff: {initial: 0s, max: 0s, jitter: false}}
""",
    source="test",
)[0]


def worker_app(status: int, body: dict[str, Any]) -> web.Application:
    async def process(request: web.Request) -> web.Response:
        await request.json()
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_post("/process-task", process)
    return app


class Rig:
    def __init__(self, server: TestServer, session: aiohttp.ClientSession) -> None:
        self.queue = MemoryQueue()
        self.registry = Registry()
        self.outcomes: list[Outcome] = []
        self.dispatcher = Dispatcher(
            queue=self.queue,
            registry=self.registry,
            pools=lambda: {"default": POOL},
            session=session,
            on_outcome=self.outcomes.append,
        )
        self.server = server

    def add_worker(self, *, ready: bool = True) -> None:
        self.registry.add(
            worker_id=WorkerId("w1"),
            name="shoal-default-w1",
            pool="default",
            template_hash="h",
            host="127.0.0.1",
            host_port=self.server.port,
            concurrency=1,
        )
        if ready:
            self.registry.mark_ready(WorkerId("w1"))

    async def run_one(self, *, max_attempts: int = 3) -> tuple[str, Outcome | None]:
        task, _ = await self.queue.enqueue(
            EnqueueRequest(pool="default", payload={"n": 1}, max_attempts=max_attempts)
        )
        await self.dispatcher.dispatch_once()
        for _ in range(200):
            if self.outcomes:
                break
            await asyncio.sleep(0.01)
        return task.id, (self.outcomes[-1] if self.outcomes else None)


@pytest.fixture
async def make_rig() -> AsyncIterator[Any]:
    servers: list[TestServer] = []
    session = aiohttp.ClientSession()

    async def make(status: int, body: dict[str, Any]) -> Rig:
        server = TestServer(worker_app(status, body), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return Rig(server, session)

    yield make
    await session.close()
    for server in servers:
        await server.close()


@pytest.mark.parametrize(
    ("status", "max_attempts", "outcome", "state", "attempts"),
    [
        pytest.param(200, 3, "succeeded", "succeeded", 1, id="200-acks"),
        pytest.param(422, 3, "failed", "failed", 1, id="422-fails-for-good"),
        pytest.param(400, 3, "failed", "failed", 1, id="400-fails-for-good"),
        pytest.param(500, 3, "retry", "queued", 1, id="500-retries"),
        pytest.param(500, 1, "dead", "dead", 1, id="500-on-last-attempt-is-dead"),
        pytest.param(429, 3, "released", "queued", 0, id="429-gives-the-lease-back"),
        pytest.param(503, 3, "released", "queued", 0, id="503-draining-gives-it-back"),
    ],
)
async def test_dispatcher_maps_worker_answers_onto_the_queue(
    make_rig: Any, status: int, max_attempts: int, outcome: str, state: str, attempts: int
) -> None:
    rig = await make_rig(status, {"error": "nope"} if status != 200 else {"result": 1})
    rig.add_worker()

    task_id, seen = await rig.run_one(max_attempts=max_attempts)

    assert seen is not None and seen.kind == outcome
    task = await rig.queue.get(task_id)
    assert task is not None
    assert (task.state, task.attempts) == (state, attempts)
    worker = rig.registry.get("w1")
    assert worker is not None and worker.in_flight == 0


async def test_dispatcher_leaves_tasks_queued_while_no_worker_is_ready(make_rig: Any) -> None:
    rig = await make_rig(200, {})
    rig.add_worker(ready=False)
    await rig.queue.enqueue(EnqueueRequest(pool="default", payload=None))

    assert await rig.dispatcher.dispatch_once() == 0
    assert (await rig.queue.counts("default")).queued == 1


async def test_dispatcher_leases_no_more_than_the_free_slots(make_rig: Any) -> None:
    rig = await make_rig(200, {})
    rig.add_worker()
    for _ in range(3):
        await rig.queue.enqueue(EnqueueRequest(pool="default", payload=None))

    assert await rig.dispatcher.dispatch_once() == 1
    counts = await rig.queue.counts("default")
    assert (counts.queued, counts.running) == (2, 1)
    await rig.dispatcher.stop(drain_timeout_s=5.0)


async def test_a_worker_answering_garbage_gets_its_slot_back_and_the_task_retries(
    make_rig: Any,
) -> None:
    """A 200 whose body is not JSON must not leave the worker looking busy for ever."""

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(body=b"{not json", content_type="application/json")

    app = web.Application()
    app.router.add_post("/process-task", garbage)
    rig = await make_rig(200, {})
    await rig.server.close()
    rig.server = TestServer(app, host="127.0.0.1")
    await rig.server.start_server()
    rig.add_worker()

    task_id, seen = await rig.run_one()

    assert seen is not None and seen.kind == "retry"
    worker = rig.registry.get("w1")
    assert worker is not None and worker.in_flight == 0
    task = await rig.queue.get(task_id)
    assert task is not None and task.state == "queued"
    await rig.server.close()
