"""The HTTP API: happy paths and, above all, that bad input is refused and stores nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from api.app import make_app
from controller.errors import QueueUnavailable
from controller.manager import Controller, ControllerConfig
from controller.poolstate import ScalingEvent
from controller.queues.base import Task, TaskState
from controller.queues.memory import MemoryQueue
from controller.runtimes.base import WorkerId
from controller.runtimes.fake import FakeRuntime

MANIFEST = """
apiVersion: shoal/v1
kind: WorkerPool
metadata: {name: default}
spec:
  replicas: {min: 0, max: 2}
"""


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    manifest = tmp_path / "pool.yaml"
    manifest.write_text(MANIFEST)
    controller = Controller(
        config=ControllerConfig(manifests=manifest),
        runtime=FakeRuntime(),
        queue=MemoryQueue(),
    )
    async with TestClient(TestServer(make_app(controller, max_body_bytes=64 * 1024))) as c:
        yield c


TWO_POOLS = (
    MANIFEST
    + """---
apiVersion: shoal/v1
kind: WorkerPool
metadata: {name: batch}
spec:
  replicas: {min: 0, max: 2}
"""
)


@dataclass
class Idle:
    """An app whose controller is not started: only requests and the test change anything."""

    client: TestClient[Any, Any]
    controller: Controller
    manifest: Path

    def remove_batch_pool(self) -> None:
        self.manifest.write_text(MANIFEST)
        assert self.controller.store.reload()
        assert self.controller.store.get("batch") is None


@pytest.fixture
async def idle(tmp_path: Path) -> AsyncIterator[Idle]:
    manifest = tmp_path / "pools.yaml"
    manifest.write_text(TWO_POOLS)
    controller = Controller(
        config=ControllerConfig(manifests=manifest), runtime=FakeRuntime(), queue=MemoryQueue()
    )
    controller.store.load()
    app = make_app(controller, manage_controller=False, max_body_bytes=64 * 1024)
    async with TestClient(TestServer(app)) as c:
        yield Idle(client=c, controller=controller, manifest=manifest)
    await controller.queue.close()


async def queue_length(client: TestClient[Any, Any]) -> int:
    response = await client.get("/queue-length")
    body = await response.json()
    return int(body["queueLength"])


async def test_enqueue_returns_202_and_the_task_is_queued(client: TestClient[Any, Any]) -> None:
    response = await client.post("/enqueue-task", json={"payload": {"n": 1}, "work_seconds": 2})
    assert response.status == 202
    body = await response.json()
    task = await (await client.get(f"/tasks/{body['id']}")).json()
    assert task["state"] == "queued"
    assert task["payload"] == {"n": 1}
    assert task["workSeconds"] == 2
    assert await queue_length(client) == 1


async def test_enqueue_with_the_same_idempotency_key_creates_nothing_new(
    client: TestClient[Any, Any],
) -> None:
    first = await (await client.post("/enqueue-task", json={"idempotency_key": "k1"})).json()
    again = await client.post("/enqueue-task", json={"idempotency_key": "k1"})
    assert again.status == 200
    assert (await again.json())["id"] == first["id"]
    assert await queue_length(client) == 1


async def test_enqueue_reusing_a_key_for_another_request_is_refused_with_422(
    client: TestClient[Any, Any],
) -> None:
    first = await client.post(
        "/enqueue-task", json={"payload": {"n": 1}}, headers={"Idempotency-Key": "order-7"}
    )
    assert first.status == 202
    first_id = (await first.json())["id"]
    same = await client.post(
        "/enqueue-task", json={"payload": {"n": 1}}, headers={"Idempotency-Key": "order-7"}
    )
    assert same.status == 200 and (await same.json())["id"] == first_id
    for body in (
        {"payload": {"n": 2}, "idempotency_key": "order-7"},
        {"payload": {"n": 1}, "idempotency_key": "order-7", "max_attempts": 2},
    ):
        refused = await client.post("/enqueue-task", json=body)
        assert refused.status == 422
        error = await refused.json()
        assert "order-7" in error["error"]
        assert error["idempotencyKey"] == "order-7" and error["taskId"] == first_id
    dispatched = await client.post(
        "/dispatch-task", json={"payload": 3, "idempotency_key": "order-7", "timeout_s": 0.1}
    )
    assert dispatched.status == 422
    assert await queue_length(client) == 1


BAD_POSTS = [
    pytest.param("/enqueue-task", b"{not json", 400, id="enqueue-malformed-json"),
    pytest.param("/enqueue-task", b"", 400, id="enqueue-empty-body"),
    pytest.param("/enqueue-task", b"[1, 2]", 400, id="enqueue-array-body"),
    pytest.param("/enqueue-task", b'{"pool": "nope"}', 404, id="enqueue-unknown-pool"),
    pytest.param("/enqueue-task", b'{"pool": 7}', 400, id="enqueue-pool-wrong-type"),
    pytest.param("/enqueue-task", b'{"work_seconds": "soon"}', 400, id="enqueue-work-seconds-text"),
    pytest.param("/enqueue-task", b'{"work_seconds": -1}', 400, id="enqueue-negative-work"),
    pytest.param(
        "/enqueue-task", b'{"payload": 1, "colour": "red"}', 400, id="enqueue-unknown-field"
    ),
    pytest.param("/enqueue-task", b'{"max_attempts": 0}', 400, id="enqueue-zero-attempts"),
    pytest.param("/enqueue-task", b"\xff\xfe", 400, id="enqueue-not-utf8"),
    pytest.param("/enqueue-task", b'{"payload": 1e999}', 400, id="enqueue-infinite-number"),
    pytest.param("/enqueue-task", b'{"payload": NaN}', 400, id="enqueue-nan"),
    pytest.param(
        "/enqueue-task",
        b'{"payload": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        400,
        id="enqueue-nested-too-deeply",
    ),
    pytest.param("/enqueue-task", b'{"work_seconds": true}', 400, id="enqueue-bool-seconds"),
    pytest.param("/enqueue-task", b'{"max_attempts": "3"}', 400, id="enqueue-string-attempts"),
    pytest.param("/dispatch-task", b'{"timeout_s": -3}', 400, id="dispatch-negative-timeout"),
    pytest.param("/dispatch-task", b'{"pool": "nope"}', 404, id="dispatch-unknown-pool"),
    pytest.param("/dequeue-task", b"{}", 400, id="dequeue-missing-worker"),
    pytest.param("/dequeue-task", b'{"worker": "w", "pool": "x"}', 404, id="dequeue-unknown-pool"),
    pytest.param("/dequeue-task", b'{"worker": "w", "lease_s": 0}', 400, id="dequeue-zero-lease"),
    pytest.param("/tasks/nope/result", b'{"worker": "w"}', 404, id="result-unknown-task"),
    pytest.param("/tasks/nope/result", b"{}", 400, id="result-missing-worker"),
    pytest.param("/tasks/nope/heartbeat", b'{"worker": 5}', 400, id="heartbeat-wrong-type"),
    pytest.param("/tasks/nope/cancel", b"", 404, id="cancel-unknown-task"),
    pytest.param("/tasks/nope/redrive", b"", 404, id="redrive-unknown-task"),
    pytest.param("/v1/pools/nope/activate", b"", 404, id="activate-unknown-pool"),
]


@pytest.mark.parametrize(("path", "body", "status"), BAD_POSTS)
async def test_bad_post_is_refused_with_a_message_and_stores_nothing(
    client: TestClient[Any, Any], path: str, body: bytes, status: int
) -> None:
    await client.post("/enqueue-task", json={"payload": "existing"})
    before = await queue_length(client)

    response = await client.post(path, data=body)

    assert response.status == status
    problem = await response.json()
    assert isinstance(problem["error"], str) and problem["error"]
    assert await queue_length(client) == before


BAD_GETS = [
    pytest.param("/tasks/does-not-exist", 404, id="task-unknown"),
    pytest.param("/tasks?state=sleeping", 400, id="tasks-bad-state"),
    pytest.param("/tasks?limit=many", 400, id="tasks-limit-text"),
    pytest.param("/tasks?limit=0", 400, id="tasks-limit-zero"),
    pytest.param("/tasks?pool=nope", 404, id="tasks-unknown-pool"),
    pytest.param("/tasks?after=garbage", 400, id="tasks-unknown-cursor"),
    pytest.param("/v1/workers?watch=true&resourceVersion=x", 400, id="watch-bad-version"),
    pytest.param("/no-such-endpoint", 404, id="unknown-path"),
]


@pytest.mark.parametrize(("path", "status"), BAD_GETS)
async def test_bad_get_is_refused_with_a_message(
    client: TestClient[Any, Any], path: str, status: int
) -> None:
    response = await client.get(path)
    assert response.status == status
    assert (await response.json())["error"]


async def test_body_over_the_limit_gets_413_and_stores_nothing(
    client: TestClient[Any, Any],
) -> None:
    big = b'{"payload": "' + b"x" * (80 * 1024) + b'"}'
    response = await client.post("/enqueue-task", data=big)
    assert response.status == 413
    assert "too large" in (await response.json())["error"]
    assert await queue_length(client) == 0


async def test_wrong_method_gets_405_json(client: TestClient[Any, Any]) -> None:
    response = await client.get("/enqueue-task")
    assert response.status == 405
    assert (await response.json())["error"]


async def test_status_views_agree_on_an_idle_pool(client: TestClient[Any, Any]) -> None:
    await client.post("/enqueue-task", json={})
    metrics = await (await client.get("/metrics.json")).json()
    status = await (await client.get("/autoscaler-status")).json()
    containers = await (await client.get("/containers-status")).json()
    assert metrics["queueLength"] == 1
    assert metrics["pools"]["default"]["queueLength"] == 1
    assert status["pools"]["default"]["queue"]["queued"] == 1
    assert containers["count"] == len(metrics["workerIds"])


async def test_tasks_list_paginates_in_creation_order(client: TestClient[Any, Any]) -> None:
    ids = [
        (await (await client.post("/enqueue-task", json={"payload": i})).json())["id"]
        for i in range(5)
    ]
    first = await (await client.get("/tasks?limit=3")).json()
    second = await (await client.get(f"/tasks?limit=3&after={first['next']}")).json()
    listed = [t["id"] for t in first["items"] + second["items"]]
    assert listed == ids


async def test_pull_mode_lease_and_report_round_trip(client: TestClient[Any, Any]) -> None:
    created = await (await client.post("/enqueue-task", json={"payload": "p"})).json()
    leased = await client.post("/dequeue-task", json={"worker": "puller-1"})
    assert leased.status == 200
    task = await leased.json()
    assert task["id"] == created["id"]

    stranger = await client.post(f"/tasks/{task['id']}/result", json={"worker": "other"})
    assert stranger.status == 409

    done = await client.post(
        f"/tasks/{task['id']}/result", json={"worker": "puller-1", "result": {"ok": True}}
    )
    assert done.status == 200
    assert (await done.json())["state"] == "succeeded"
    empty = await client.post("/dequeue-task", json={"worker": "puller-1"})
    assert empty.status == 204


async def test_cancel_only_queued_tasks(client: TestClient[Any, Any]) -> None:
    queued = await (await client.post("/enqueue-task", json={"payload": "q"})).json()
    running = await (await client.post("/enqueue-task", json={"payload": "r"})).json()
    cancelled = await client.post(f"/tasks/{queued['id']}/cancel")
    assert cancelled.status == 200
    assert (await cancelled.json())["state"] == "cancelled"
    again = await client.post(f"/tasks/{queued['id']}/cancel")
    assert again.status == 200, "cancelling twice is idempotent"

    leased = await (await client.post("/dequeue-task", json={"worker": "w1"})).json()
    assert leased["id"] == running["id"]
    refused = await client.post(f"/tasks/{running['id']}/cancel")
    assert refused.status == 409
    assert (await (await client.get(f"/tasks/{running['id']}")).json())["state"] == "running"


async def test_activate_takes_a_load_report_without_holding_capacity(
    client: TestClient[Any, Any],
) -> None:
    report = await client.post("/v1/pools/default/activate", json={"inFlight": 3})
    assert report.status == 202
    assert (await report.json())["requested"] is False
    ask = await client.post("/v1/pools/default/activate", json={"holdS": 2.0})
    assert (await ask.json())["requested"] is True
    bad = await client.post("/v1/pools/default/activate", json={"inFlight": -1})
    assert bad.status == 400


BAD_KEYS = [
    pytest.param({"Idempotency-Key": ""}, {}, "empty", id="empty-header"),
    pytest.param({"Idempotency-Key": "k" * 201}, {}, "limit is 200", id="header-too-long"),
    pytest.param(
        {"Idempotency-Key": "a"}, {"idempotency_key": "b"}, "differ", id="header-and-field-differ"
    ),
]


@pytest.mark.parametrize(("headers", "body", "reason"), BAD_KEYS)
@pytest.mark.parametrize("path", ["/enqueue-task", "/dispatch-task"])
async def test_idempotency_key_header_is_held_to_the_fields_rules(
    client: TestClient[Any, Any],
    path: str,
    headers: dict[str, str],
    body: dict[str, Any],
    reason: str,
) -> None:
    if path == "/dispatch-task":
        body = {**body, "timeout_s": 0.1}
    response = await client.post(path, json=body, headers=headers)
    assert response.status == 400
    problem = await response.json()
    assert "Idempotency-Key" in problem["error"] and reason in problem["error"]
    assert problem["problems"][0]["field"] == "Idempotency-Key (header)"
    assert await queue_length(client) == 0


async def test_idempotency_key_field_has_the_same_limit_as_the_header(
    client: TestClient[Any, Any],
) -> None:
    for body in ({"idempotency_key": ""}, {"idempotency_key": "k" * 201}):
        assert (await client.post("/enqueue-task", json=body)).status == 400
    longest = "k" * 200
    by_header = await client.post("/enqueue-task", json={}, headers={"Idempotency-Key": longest})
    assert by_header.status == 202
    by_field = await client.post("/enqueue-task", json={"idempotency_key": longest})
    assert by_field.status == 200
    assert (await by_field.json())["id"] == (await by_header.json())["id"]
    assert await queue_length(client) == 1


async def test_idempotency_key_sent_twice_as_header_is_refused(
    client: TestClient[Any, Any],
) -> None:
    response = await client.post(
        "/enqueue-task", json={}, headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "a")]
    )
    assert response.status == 400
    assert "sent 2 times" in (await response.json())["error"]
    assert await queue_length(client) == 0


async def test_idempotency_key_in_header_and_field_alike_is_one_key(
    client: TestClient[Any, Any],
) -> None:
    first = await client.post(
        "/enqueue-task", json={"idempotency_key": "same"}, headers={"Idempotency-Key": "same"}
    )
    assert first.status == 202
    again = await client.post("/enqueue-task", json={}, headers={"Idempotency-Key": "same"})
    assert again.status == 200
    assert (await again.json())["id"] == (await first.json())["id"]
    assert await queue_length(client) == 1


REPEATED_QUERIES = [
    pytest.param("/tasks?limit=2&limit=3", "limit", id="tasks-limit"),
    pytest.param("/tasks?state=queued&state=running", "state", id="tasks-state"),
    pytest.param("/tasks?pool=default&pool=default", "pool", id="tasks-pool-same-value"),
    pytest.param("/tasks?after=a&after=b", "after", id="tasks-after"),
    pytest.param("/v1/workers?pool=default&pool=other", "pool", id="workers-pool"),
    pytest.param("/v1/workers?watch=true&watch=true", "watch", id="workers-watch"),
    pytest.param(
        "/v1/workers?watch=true&resourceVersion=0&resourceVersion=1",
        "resourceVersion",
        id="workers-version",
    ),
    pytest.param("/scaling-events?pool=a&pool=b", "pool", id="scaling-events-pool"),
]


@pytest.mark.parametrize(("path", "name"), REPEATED_QUERIES)
async def test_repeated_query_parameter_gets_400_naming_it(
    client: TestClient[Any, Any], path: str, name: str
) -> None:
    for i in range(3):
        await client.post("/enqueue-task", json={"payload": i})
    response = await client.get(path)
    assert response.status == 400
    problem = await response.json()
    assert f"query parameter {name!r} given 2 times" in problem["error"]
    assert problem["problems"] == [
        {"field": f"{name} (query)", "reason": "given 2 times; give it once"}
    ]


async def test_workers_of_an_unknown_pool_get_404(client: TestClient[Any, Any]) -> None:
    unknown = await client.get("/v1/workers?pool=nope")
    assert unknown.status == 404
    assert "nope" in (await unknown.json())["error"]
    watched = await client.get("/v1/workers?pool=nope&watch=true")
    assert watched.status == 404
    known = await client.get("/v1/workers?pool=default")
    assert known.status == 200
    assert (await known.json())["items"] == []


async def test_workers_of_a_removed_pool_are_listed_while_any_is_left(idle: Idle) -> None:
    idle.controller.registry.add(
        worker_id=WorkerId("b" * 64),
        name="shoal-batch-1",
        pool="batch",
        template_hash="t1",
        host="127.0.0.1",
        host_port=None,
        concurrency=1,
    )
    idle.remove_batch_pool()
    listed = await idle.client.get("/v1/workers?pool=batch")
    assert listed.status == 200
    assert [w["name"] for w in (await listed.json())["items"]] == ["shoal-batch-1"]
    assert (await idle.client.get("/v1/workers?pool=other")).status == 404


async def test_tasks_of_a_removed_pool_stay_listable(idle: Idle) -> None:
    ids = []
    for i in range(3):
        created = await idle.client.post("/enqueue-task", json={"pool": "batch", "payload": i})
        ids.append((await created.json())["id"])
    await idle.client.post("/enqueue-task", json={"payload": "default"})
    idle.remove_batch_pool()

    listed = await idle.client.get("/tasks?pool=batch")
    assert listed.status == 200
    assert [t["id"] for t in (await listed.json())["items"]] == ids
    queued = await (await idle.client.get("/tasks?pool=batch&state=queued&limit=2")).json()
    assert [t["id"] for t in queued["items"]] == ids[:2]
    never = await idle.client.get("/tasks?pool=never-declared")
    assert never.status == 404
    assert "never-declared" in (await never.json())["error"]


async def test_autoscaler_status_warns_of_queued_tasks_no_pool_will_run(idle: Idle) -> None:
    before = await (await idle.client.get("/autoscaler-status")).json()
    assert before["warnings"] == []
    for i in range(3):
        await idle.client.post("/enqueue-task", json={"pool": "batch", "payload": i})
    await idle.client.post("/enqueue-task", json={"payload": "default"})
    cancelled = await (await idle.client.post("/enqueue-task", json={"pool": "batch"})).json()
    await idle.client.post(f"/tasks/{cancelled['id']}/cancel")
    declared = await (await idle.client.get("/autoscaler-status")).json()
    assert declared["warnings"] == [], "a declared pool's backlog is no warning"

    idle.remove_batch_pool()
    status = await (await idle.client.get("/autoscaler-status")).json()
    assert set(status["pools"]) == {"default"}
    [warning] = status["warnings"]
    assert warning["pool"] == "batch" and warning["queued"] == 3
    assert "'batch'" in warning["message"] and "3 queued" in warning["message"]


async def test_autoscaler_status_finds_an_undeclared_pool_behind_a_long_backlog(
    idle: Idle,
) -> None:
    # The oldest queued tasks belong to a declared pool: the scan finds nothing there, but
    # the removed pool's scaling events name it.
    for i in range(60):
        await idle.client.post("/enqueue-task", json={"payload": i})
    await idle.client.post("/enqueue-task", json={"pool": "batch"})
    idle.controller.reconciler.events.append(
        ScalingEvent(time=0.0, pool="batch", from_replicas=0, to_replicas=1, reason="test")
    )
    idle.remove_batch_pool()
    status = await (await idle.client.get("/autoscaler-status")).json()
    assert [(w["pool"], w["queued"]) for w in status["warnings"]] == [("batch", 1)]


class ListlessQueue(MemoryQueue):
    """A queue whose listing is unavailable (counts still answer)."""

    async def list(
        self,
        *,
        pool: str | None = None,
        state: TaskState | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[Task]:
        raise QueueUnavailable("listing is down for the test")


async def test_autoscaler_status_answers_when_the_queue_does_not(tmp_path: Path) -> None:
    manifest = tmp_path / "pool.yaml"
    manifest.write_text(MANIFEST)
    controller = Controller(
        config=ControllerConfig(manifests=manifest), runtime=FakeRuntime(), queue=ListlessQueue()
    )
    controller.store.load()
    app = make_app(controller, manage_controller=False)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/autoscaler-status")
        assert response.status == 200
        status = await response.json()
    assert "default" in status["pools"]
    assert ["queue did not answer" in w["message"] for w in status["warnings"]] == [True]
