"""/metrics: valid Prometheus text whose figures are the JSON endpoints' figures.

The first test runs real worker processes (the process runtime) through a few tasks, some
failing, and compares every figure once the system is quiet. The others pin exact values
on a controller that is not running, so nothing moves while they read.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from api.app import make_app
from api.prometheus import ScalingEventTotals
from controller.manager import Controller, ControllerConfig
from controller.poolstate import ScalingEvent
from controller.queues.base import EnqueueRequest
from controller.queues.memory import MemoryQueue
from controller.runtimes.base import WorkerId
from controller.runtimes.fake import FakeRuntime
from controller.runtimes.process import ProcessRuntime

POOLS = """
apiVersion: shoal/v1
kind: WorkerPool
metadata: {name: default}
spec:
  replicas: {min: 2, max: 2}
  template:
    image: shoal/worker:latest
    concurrency: 2
    env: {WORK_SECONDS: "0"}
  scaling:
    evaluationInterval: 200ms
    spawn: {maxInFlight: 2, minInterval: 100ms}
  delivery: {maxAttempts: 1}
---
apiVersion: shoal/v1
kind: WorkerPool
metadata: {name: idle}
spec:
  replicas: {min: 0, max: 0}  # never runs a worker: its task stays queued
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of the exposition, keyed by (sample name, labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(key)[label]: v for (n, key), v in samples.items() if n == name}


async def get_json(client: TestClient[Any, Any], path: str) -> Any:
    response = await client.get(path)
    assert response.status == 200, path
    return await response.json()


@pytest.fixture
async def busy_shoal(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    manifest = tmp_path / "pools.yaml"
    manifest.write_text(POOLS)
    controller = Controller(
        config=ControllerConfig(manifests=manifest, relist_interval_s=1.0),
        runtime=ProcessRuntime(instance="prometheus-test"),
        queue=MemoryQueue(),
    )
    async with TestClient(TestServer(make_app(controller))) as client:
        yield client


async def _until(predicate: Any, what: str) -> None:
    for _ in range(300):  # bounded: about 15 s
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_metrics_parse_and_agree_with_the_json_endpoints(
    busy_shoal: TestClient[Any, Any],
) -> None:
    client = busy_shoal

    async def two_ready() -> bool:
        workers = (await get_json(client, "/containers-status"))["containers"]
        return sum(w["state"] == "ready" for w in workers) == 2

    await _until(two_ready, "two ready workers")
    for n in range(6):
        await client.post("/enqueue-task", json={"payload": {"n": n}, "work_seconds": 0.02})
    for reason in ("bad input", "worse input"):
        await client.post("/enqueue-task", json={"payload": {"fail": reason}})
    await client.post("/enqueue-task", json={"pool": "idle"})

    async def quiet() -> bool:
        counts = (await get_json(client, "/queue-length"))["pools"]["default"]
        return counts["succeeded"] == 6 and counts["failed"] == 2

    await _until(quiet, "all tasks of the default pool to finish")

    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = parse(await response.text())
    summary = await get_json(client, "/metrics.json")
    queues = await get_json(client, "/queue-length")
    containers = (await get_json(client, "/containers-status"))["containers"]
    processed = await get_json(client, "/requests-processed")

    # Queue: length and every state, per pool.
    assert by_label(samples, "shoal_queue_length", "pool") == {
        pool: counts["queued"] for pool, counts in queues["pools"].items()
    }
    assert sum(by_label(samples, "shoal_queue_length", "pool").values()) == queues["queueLength"]
    assert summary["queueLength"] == queues["queueLength"] == 1
    for pool, counts in queues["pools"].items():
        for state in ("queued", "running", "succeeded", "failed", "dead", "cancelled"):
            assert value(samples, "shoal_tasks", pool=pool, state=state) == counts[state]

    # Outcomes and the histograms of succeeded tasks.
    assert by_label(samples, "shoal_task_outcomes_total", "outcome") == summary["outcomes"]
    assert summary["outcomes"] == {"succeeded": 6, "failed": 2}
    assert value(samples, "shoal_task_run_seconds_count", pool="default") == 6
    assert value(samples, "shoal_task_run_seconds_sum", pool="default") >= 6 * 0.02
    assert value(samples, "shoal_task_queue_wait_seconds_count", pool="default") == 6
    assert value(samples, "shoal_task_run_seconds_bucket", pool="default", le="+Inf") == 6
    for name, key in (
        ("shoal_task_run_seconds", "runS"),
        ("shoal_task_queue_wait_seconds", "queueWaitS"),
    ):
        histogram = summary["timings"][key]["default"]
        assert value(samples, f"{name}_count", pool="default") == histogram["count"]
        assert value(samples, f"{name}_sum", pool="default") == pytest.approx(histogram["sumS"])
        assert by_label(samples, f"{name}_bucket", "le") == {
            le: float(count) for le, count in histogram["buckets"].items()
        }

    # Workers: by state, in flight and processed, per worker.
    tally = collections.Counter((w["pool"], w["state"]) for w in containers)
    for pool, pool_json in summary["pools"].items():
        for state in ("ready", "draining"):
            assert value(samples, "shoal_workers", pool=pool, state=state) == pool_json[state]
            assert tally[(pool, state)] == pool_json[state]
        starting = value(samples, "shoal_workers", pool=pool, state="starting")
        spawns = value(samples, "shoal_spawns_in_flight", pool=pool)
        assert starting + spawns == pool_json["starting"]
        assert value(samples, "shoal_desired_replicas", pool=pool) == pool_json["desired"]
    assert by_label(samples, "shoal_worker_in_flight", "worker") == {
        w["name"]: w["inFlight"] for w in containers
    }
    assert by_label(samples, "shoal_worker_processed_total", "worker") == processed["byWorker"]
    assert sum(processed["byWorker"].values()) == summary["requestsProcessed"] == 6

    # Scaling events: the counter and the JSON list agree per pool.
    for pool in ("default", "idle"):
        events = (await get_json(client, f"/scaling-events?pool={pool}"))["events"]
        assert value(samples, "shoal_scaling_events_total", pool=pool) == len(events)
    assert value(samples, "shoal_reconcile_duration_seconds_count") > 0
    assert summary["timings"]["reconcileS"]["count"] > 0


async def test_metrics_show_exact_figures_of_a_still_controller(tmp_path: Path) -> None:
    manifest = tmp_path / "pools.yaml"
    manifest.write_text(POOLS)
    runtime = FakeRuntime()
    controller = Controller(
        config=ControllerConfig(manifests=manifest), runtime=runtime, queue=MemoryQueue()
    )
    controller.store.load()
    for _ in range(3):
        await controller.submit(EnqueueRequest(pool="default", payload=None))
    await controller.submit(EnqueueRequest(pool="idle", payload=None))
    leased = await controller.queue.lease("default", worker="w-a", lease_s=30.0)
    assert leased is not None
    registry = controller.registry
    for n, name in enumerate(("w-a", "w-b", "w-c")):
        registry.add(
            worker_id=WorkerId(f"{name}-id"),
            name=name,
            pool="default",
            template_hash="h",
            host="127.0.0.1",
            host_port=41000 + n,
            concurrency=2,
        )
    registry.mark_ready(WorkerId("w-a-id"))
    registry.acquire_slot(WorkerId("w-a-id"))
    registry.mark_ready(WorkerId("w-b-id"))
    registry.mark_draining(WorkerId("w-b-id"))

    async with TestClient(TestServer(make_app(controller, manage_controller=False))) as client:
        samples = parse(await (await client.get("/metrics")).text())

    assert value(samples, "shoal_queue_length", pool="default") == 2
    assert value(samples, "shoal_tasks", pool="default", state="running") == 1
    assert value(samples, "shoal_queue_length", pool="idle") == 1
    assert value(samples, "shoal_workers", pool="default", state="ready") == 1
    assert value(samples, "shoal_workers", pool="default", state="draining") == 1
    assert value(samples, "shoal_workers", pool="default", state="starting") == 1
    assert value(samples, "shoal_workers", pool="idle", state="ready") == 0
    labels = {"pool": "default", "worker": "w-a", "container_id": "w-a-id"}
    assert value(samples, "shoal_worker_in_flight", **labels) == 1
    assert value(samples, "shoal_worker_concurrency", **labels) == 2
    assert value(samples, "shoal_replicas_bound", pool="default", bound="max") == 2
    assert value(samples, "shoal_policy_error") == 0
    # Nothing ran: no outcome, and the run-time histogram has no series yet.
    assert by_label(samples, "shoal_task_outcomes_total", "outcome") == {}
    assert not any(name.startswith("shoal_task_run_seconds") for name, _ in samples)
    # The process collectors come along for free.
    assert any(name.startswith("process_") or name == "python_info" for name, _ in samples)
    await controller.queue.close()


def _event(pool: str, to: int) -> ScalingEvent:
    return ScalingEvent(time=0.0, pool=pool, from_replicas=0, to_replicas=to, reason="test")


def test_scaling_event_totals_keep_counting_past_the_kept_history() -> None:
    """The reconciler keeps its latest events only; the counter must not fall or stall."""
    kept: collections.deque[ScalingEvent] = collections.deque(maxlen=3)
    totals = ScalingEventTotals()
    assert totals.update(kept) == {}
    kept.extend([_event("a", 1), _event("b", 1)])
    assert totals.update(kept) == {"a": 1, "b": 1}
    assert totals.update(kept) == {"a": 1, "b": 1}
    kept.extend([_event("a", 2), _event("a", 3)])  # the first event falls out
    assert totals.update(kept) == {"a": 3, "b": 1}
    kept.append(_event("b", 0))
    assert totals.update(kept) == {"a": 3, "b": 2}
