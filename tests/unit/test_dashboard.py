"""The dashboard's page, assets and event stream, on a controller that is not started.

The controller's parts are real (policy store, registry, reconciler, memory queue) but its loops
do not run: the tests write the registry and the reconciler's event list themselves, as the
reconciler and prober would, and read what the stream sends.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from api import dashboard
from api.app import make_app
from controller.errors import QueueUnavailable
from controller.manager import Controller, ControllerConfig
from controller.poolstate import ScalingEvent
from controller.queues.base import EnqueueRequest, QueueCounts
from controller.queues.memory import MemoryQueue
from controller.runtimes.base import WorkerId
from controller.runtimes.fake import FakeRuntime

TWO_POOLS = """
apiVersion: shoal/v1
kind: WorkerPool
metadata: {name: alpha}
spec:
  replicas: {min: 0, max: 3}
  template: {image: shoal/worker:latest, concurrency: 2}
---
apiVersion: shoal/v1
kind: WorkerPool
metadata: {name: beta}
spec:
  replicas: {min: 1, max: 5}
  template: {image: shoal/worker:latest}
"""

ASSET_DIR = Path(dashboard.__file__).parent / "dashboard"


class FlakyQueue(MemoryQueue):
    """A memory queue whose counts fail while ``down`` is set."""

    down = False

    async def counts(self, pool: str) -> QueueCounts:
        if self.down:
            raise QueueUnavailable("queue is down for this test", retry_after_s=1.0)
        return await super().counts(pool)


@pytest.fixture
def controller(tmp_path: Path) -> Controller:
    manifest = tmp_path / "pools.yaml"
    manifest.write_text(TWO_POOLS)
    built = Controller(
        config=ControllerConfig(manifests=manifest),
        runtime=FakeRuntime(instance="dashboard-test"),
        queue=FlakyQueue(),
    )
    built.store.load()
    return built


@pytest.fixture
async def client(controller: Controller) -> AsyncIterator[TestClient[Any, Any]]:
    app = make_app(controller, manage_controller=False)
    dashboard.setup(app, interval_s=0.05)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


class SseReader:
    """Reads server-sent events off an aiohttp response, one (event, data) pair at a time."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next(self) -> tuple[str, dict[str, Any]]:
        kind = "message"
        data: list[str] = []
        while True:
            raw = await self.response.content.readline()
            if not raw:
                raise EOFError("stream ended")
            line = raw.decode().rstrip("\n")
            if not line:
                if data:
                    return kind, json.loads("\n".join(data))
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                kind = value
            elif field == "data":
                data.append(value)

    async def until(self, predicate: Any, *, limit: int = 200) -> dict[str, Any]:
        """The first snapshot for which ``predicate`` holds, reading at most ``limit`` messages."""
        for _ in range(limit):
            kind, data = await self.next()
            if kind == "message" and predicate(data):
                return data
        raise AssertionError(f"no matching snapshot in {limit} messages")


def add_worker(controller: Controller, *, name: str, pool: str, port: int) -> None:
    controller.registry.add(
        worker_id=WorkerId(f"{name:0<64}"),
        name=name,
        pool=pool,
        template_hash="t1",
        host="127.0.0.1",
        host_port=port,
        concurrency=2,
    )


def scaling(at: float, pool: str, before: int, after: int, reason: str) -> ScalingEvent:
    return ScalingEvent(time=at, pool=pool, from_replicas=before, to_replicas=after, reason=reason)


def enqueue_request(pool: str) -> EnqueueRequest:
    return EnqueueRequest(pool=pool, payload={"n": 1}, work_seconds=None, max_attempts=3)


async def test_dashboard_page_served_with_its_assets(client: TestClient[Any, Any]) -> None:
    page = await client.get("/")
    assert page.status == 200
    assert page.content_type == "text/html"
    html = await page.text()
    assert '<script src="/dashboard/app.js"' in html
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]

    for name, content_type in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = await client.get(f"/dashboard/{name}")
        assert response.status == 200, name
        assert response.content_type == content_type
        assert await response.read() == (ASSET_DIR / name).read_bytes()


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/dashboard/secret.txt", id="unknown-name"),
        pytest.param("/dashboard/..%2Fdashboard.py", id="escaped-traversal"),
    ],
)
async def test_dashboard_asset_refuses_files_not_listed(
    client: TestClient[Any, Any], path: str
) -> None:
    response = await client.get(path)
    assert response.status == 404


def test_dashboard_assets_load_nothing_from_another_origin() -> None:
    html = (ASSET_DIR / "index.html").read_text()
    for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert ref.startswith(("/", "#")) or ref == "data:,", ref
    script = (ASSET_DIR / "app.js").read_text()
    urls = set(re.findall(r"https?://[^\s\"'`)]+", script))
    # The SVG namespace is a name, not a download.
    assert urls == {"http://www.w3.org/2000/svg"}
    assert "@import" not in (ASSET_DIR / "style.css").read_text()
    assert "url(" not in (ASSET_DIR / "style.css").read_text()


def test_sse_message_is_one_event_with_one_data_line() -> None:
    message = dashboard.sse_message("hello", {"reason": "two\nlines"}, event_id=7)
    text = message.decode()
    assert text.endswith("\n\n")
    lines = text[:-2].split("\n")
    assert lines[0] == "event: hello"
    assert lines[1] == "id: 7"
    assert len(lines) == 3 and lines[2].startswith("data: ")
    assert json.loads(lines[2].removeprefix("data: ")) == {"reason": "two\nlines"}


async def test_stream_starts_with_hello_holding_pools_and_history(
    client: TestClient[Any, Any], controller: Controller
) -> None:
    add_worker(controller, name="shoal-alpha-1", pool="alpha", port=41001)
    response = await client.get("/v1/stream")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    kind, hello = await SseReader(response).next()

    assert kind == "hello"
    snapshot = hello["snapshot"]
    assert sorted(snapshot["pools"]) == ["alpha", "beta"]
    assert snapshot["pools"]["beta"]["min"] == 1
    assert snapshot["pools"]["beta"]["max"] == 5
    (worker,) = snapshot["workers"]
    assert worker["name"] == "shoal-alpha-1"
    assert worker["hostPort"] == 41001
    assert worker["state"] == "starting"
    assert worker["concurrency"] == 2
    assert hello["samples"], "the hub samples from startup, before any page opens"
    assert set(hello["samples"][-1]["p"]) == {"alpha", "beta"}
    response.close()


async def test_stream_shows_a_changed_queue_length(
    client: TestClient[Any, Any], controller: Controller
) -> None:
    response = await client.get("/v1/stream")
    reader = SseReader(response)
    await reader.next()

    for _ in range(3):
        await controller.submit(enqueue_request("alpha"))
    snapshot = await reader.until(lambda s: s["pools"]["alpha"]["queued"] == 3)

    assert snapshot["pools"]["beta"]["queued"] == 0
    response.close()


async def test_stream_follows_workers_through_their_lifecycle(
    client: TestClient[Any, Any], controller: Controller
) -> None:
    response = await client.get("/v1/stream")
    reader = SseReader(response)
    await reader.next()
    add_worker(controller, name="shoal-beta-1", pool="beta", port=41002)
    worker_id = WorkerId(f"{'shoal-beta-1':0<64}")

    controller.registry.mark_ready(worker_id)
    controller.registry.acquire_slot(worker_id)
    busy = await reader.until(lambda s: [w["inFlight"] for w in s["workers"]] == [1])
    assert busy["workers"][0]["state"] == "ready"

    controller.registry.release_slot(worker_id, processed=True)
    done = await reader.until(lambda s: [w["processed"] for w in s["workers"]] == [1])
    assert done["workers"][0]["inFlight"] == 0

    controller.registry.remove(worker_id)
    await reader.until(lambda s: s["workers"] == [])
    response.close()


async def test_stream_pushes_a_registry_change_before_the_next_tick(
    controller: Controller,
) -> None:
    app = make_app(controller, manage_controller=False)
    # An hour between ticks: only the registry's change can bring the next message.
    dashboard.setup(app, interval_s=3600.0)
    async with TestClient(TestServer(app)) as test_client:
        response = await test_client.get("/v1/stream")
        reader = SseReader(response)
        await reader.next()
        add_worker(controller, name="shoal-alpha-9", pool="alpha", port=41009)
        kind, snapshot = await asyncio.wait_for(reader.next(), timeout=30)
        assert kind == "message"
        assert [w["name"] for w in snapshot["workers"]] == ["shoal-alpha-9"]
        response.close()


async def test_hub_numbers_each_scaling_event_once(controller: Controller) -> None:
    hub = dashboard.StreamHub(controller, clock=lambda: 1000.0)
    events = controller.reconciler.events
    events.append(scaling(990.0, "alpha", 0, 2, "a"))

    first = await hub.tick()
    second = await hub.tick()
    events.append(scaling(995.0, "alpha", 2, 1, "b"))
    events.append(scaling(996.0, "beta", 1, 3, "c"))
    third = await hub.tick()

    assert [(e["seq"], e["reason"], e["from"], e["to"]) for e in first["events"]] == [
        (1, "a", 0, 2)
    ]
    assert second["events"] == []
    assert [(e["seq"], e["reason"]) for e in third["events"]] == [(2, "b"), (3, "c")]
    assert [e["seq"] for e in hub.events] == [1, 2, 3]
    assert [s["t"] for s in hub.samples] == [1000.0, 1000.0, 1000.0]


async def test_hub_samples_hold_queue_and_replica_series(controller: Controller) -> None:
    hub = dashboard.StreamHub(controller, clock=lambda: 5.0)
    add_worker(controller, name="shoal-alpha-1", pool="alpha", port=41001)
    add_worker(controller, name="shoal-alpha-2", pool="alpha", port=41002)
    controller.registry.mark_ready(WorkerId(f"{'shoal-alpha-1':0<64}"))
    await controller.submit(enqueue_request("alpha"))

    await hub.tick()

    # [queued, running, desired, ready, ready + starting]
    assert hub.samples[-1] == {
        "t": 5.0,
        "p": {"alpha": [1, 0, None, 1, 2], "beta": [0, 0, None, 0, 0]},
    }


async def test_hub_drops_a_client_that_falls_behind(controller: Controller) -> None:
    hub = dashboard.StreamHub(controller)
    client, hello = await hub.attach()
    assert hello.startswith(b"event: hello\n")

    for _ in range(dashboard.CLIENT_BUFFER + 1):
        await hub.tick()

    assert hub.n_clients == 0
    assert client.dropped
    assert client.buffer.get_nowait() is None
    assert client.buffer.empty()
    await hub.stop()


async def test_hub_keeps_streaming_when_the_queue_does_not_answer(controller: Controller) -> None:
    queue = controller.queue
    assert isinstance(queue, FlakyQueue)
    await controller.submit(enqueue_request("beta"))
    hub = dashboard.StreamHub(controller)

    queue.down = True
    snapshot = await hub.tick()

    # The reconciler has made no pass, so its cached counts say zero; the point is no error.
    assert snapshot["pools"]["beta"]["queued"] == 0
    queue.down = False
    assert (await hub.tick())["pools"]["beta"]["queued"] == 1


async def test_stream_shows_a_refused_policy(
    client: TestClient[Any, Any], controller: Controller, tmp_path: Path
) -> None:
    (tmp_path / "pools.yaml").write_text("apiVersion: shoal/v1\nkind: WorkerPool\nspec: 3\n")
    assert not controller.store.reload()
    assert controller.store.error is not None, "the store keeps the last good policy"
    response = await client.get("/v1/stream")
    reader = SseReader(response)
    await reader.next()

    snapshot = await reader.until(lambda s: s["policyError"] is not None)

    assert snapshot["policyError"]["problems"]
    assert sorted(snapshot["pools"]) == ["alpha", "beta"]
    response.close()


async def test_stream_detaches_a_page_that_went_away(
    client: TestClient[Any, Any], controller: Controller
) -> None:
    hub = dashboard.hub_of(client.app)
    response = await client.get("/v1/stream")
    await SseReader(response).next()
    assert hub.n_clients == 1

    response.close()
    # The server notices at its next write; ticks come every 50 ms here.
    for _ in range(400):
        if hub.n_clients == 0:
            break
        await asyncio.sleep(0.025)
    assert hub.n_clients == 0


async def test_stream_ends_when_the_server_shuts_down(controller: Controller) -> None:
    app = make_app(controller, manage_controller=False)
    dashboard.setup(app, interval_s=0.05)
    server = TestServer(app)
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        response = await session.get(server.make_url("/v1/stream"))
        reader = SseReader(response)
        await reader.next()

        # Without the shutdown hook this would wait out aiohttp's 60 s shutdown timeout.
        await asyncio.wait_for(server.close(), timeout=30)

        with pytest.raises((EOFError, aiohttp.ClientPayloadError)):
            for _ in range(1000):
                await reader.next()
        response.close()


async def test_stream_works_with_routes_alone(controller: Controller) -> None:
    app = make_app(controller, manage_controller=False)
    app.add_routes(dashboard.routes)
    async with TestClient(TestServer(app)) as test_client:
        response = await test_client.get("/v1/stream")
        kind, hello = await SseReader(response).next()
        assert kind == "hello"
        assert sorted(hello["snapshot"]["pools"]) == ["alpha", "beta"]
        hub = dashboard.hub_of(test_client.app)
        assert hub.n_clients == 1
        response.close()


async def test_hello_remembers_the_work_of_workers_that_left(controller: Controller) -> None:
    hub = dashboard.StreamHub(controller, clock=lambda: 50.0)
    add_worker(controller, name="shoal-alpha-1", pool="alpha", port=41001)
    worker_id = WorkerId(f"{'shoal-alpha-1':0<64}")
    controller.registry.mark_ready(worker_id)
    for _ in range(3):
        controller.registry.acquire_slot(worker_id)
        controller.registry.release_slot(worker_id, processed=True)
    controller.registry.remove(worker_id)

    client, hello = await hub.attach()

    data = json.loads(hello.decode().split("data: ", 1)[1])
    assert data["departed"] == [
        {
            "id": "shoal-alpha-",
            "name": "shoal-alpha-1",
            "pool": "alpha",
            "processed": 3,
            "failed": 0,
            "goneAt": 50.0,
        }
    ]
    assert data["snapshot"]["workers"] == []
    await hub.detach(client)


def test_setup_is_idempotent_and_accepts_routes_added_before(controller: Controller) -> None:
    app = make_app(controller, manage_controller=False)
    app.add_routes(dashboard.routes)
    n_routes = len(app.router.routes())

    dashboard.setup(app)
    dashboard.setup(app)

    assert len(app.router.routes()) == n_routes
    assert len(app.on_shutdown) == 1


async def test_hub_counts_finished_tasks_per_pool(controller: Controller) -> None:
    hub = dashboard.StreamHub(controller)
    for _ in range(2):
        await controller.submit(enqueue_request("beta"))
    leased = await controller.queue.lease("beta", worker="w1", lease_s=30.0)
    assert leased is not None
    assert await controller.queue.ack(leased.id, worker="w1", result={"ok": True})

    beta = (await hub.tick())["pools"]["beta"]

    assert (beta["queued"], beta["running"], beta["succeeded"], beta["failed"]) == (1, 0, 1, 0)


async def _until(condition: Any, *, rounds: int = 400) -> bool:
    """Lets the event loop run until ``condition()`` holds, within a bounded number of rounds."""
    for _ in range(rounds):
        if condition():
            return True
        await asyncio.sleep(0.005)
    return bool(condition())


async def test_idle_hub_ignores_registry_changes_until_a_page_opens(
    controller: Controller,
) -> None:
    hub = dashboard.StreamHub(controller, interval_s=3600.0, idle_interval_s=3600.0, min_gap_s=0.0)
    hub.always_on = True
    hub.start()
    assert await _until(lambda: hub.ticks == 1)

    add_worker(controller, name="shoal-alpha-1", pool="alpha", port=41001)
    for _ in range(20):
        await asyncio.sleep(0)
    assert hub.ticks == 1, "no page is open: a registry change alone costs no snapshot"

    client, _hello = await hub.attach()
    assert await _until(lambda: hub.ticks == 2), "a new page gets a fresh snapshot at once"
    assert [w["name"] for w in (hub.latest or {})["workers"]] == ["shoal-alpha-1"]

    add_worker(controller, name="shoal-alpha-2", pool="alpha", port=41002)
    assert await _until(lambda: hub.ticks == 3), "with a page open, changes push at once"
    await hub.detach(client)
    await hub.close()
