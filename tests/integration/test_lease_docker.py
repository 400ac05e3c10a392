"""A task longer than its lease, on a live Docker worker, runs exactly once (issue 4).

The dispatcher extends the lease while the worker holds the task, so the lease reaper never
hands it to the idle second worker standing by. Shoal runs in process over the durable
SQLite queue; ``shoal_on_docker`` is shared with the chaos test.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import docker
import pytest
from aiohttp.test_utils import TestServer

from api.app import make_app
from controller.manager import Controller, ControllerConfig
from controller.queues import open_queue
from controller.runtimes.base import Runtime
from controller.runtimes.docker import DockerRuntime
from tests.integration.shoal_harness import Shoal

pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]


def delivery_manifest(
    *,
    min_replicas: int,
    max_replicas: int,
    concurrency: int = 1,
    lease_timeout: str = "2s",
    max_attempts: int = 5,
    min_interval: str = "1s",
    backlog_per_replica: float = 1.0,
    image: str = "shoal/worker:latest",
) -> str:
    return f"""
apiVersion: shoal/v1
kind: WorkerPool
metadata: {{name: default}}
spec:
  replicas: {{min: {min_replicas}, max: {max_replicas}}}
  template:
    image: {image}
    concurrency: {concurrency}
    env: {{WORK_SECONDS: "1"}}
  scaling:
    evaluationInterval: 250ms
    targets: {{backlogPerReplica: {backlog_per_replica}}}
    scaleUp: {{period: 1s, maxStep: 6}}
    scaleDown: {{stabilizationWindow: 60s, drainTimeout: 30s, gracePeriod: 2s}}
    spawn: {{maxInFlight: 2, minInterval: {min_interval}}}
    scaleToZero: {{after: 120s}}
  delivery:
    leaseTimeout: {lease_timeout}
    maxAttempts: {max_attempts}
    backoff: {{initial: 200ms, max: 1s}}
"""


@contextlib.asynccontextmanager
async def shoal_on_docker(
    tmp_path: Path,
    manifest: str,
    *,
    instance: str,
    queue_url: str = "sqlite://",
    runtime: Runtime | None = None,
) -> AsyncIterator[Shoal]:
    """Shoal in process on the Docker engine under ``instance``, over the queue named."""
    manifest_file = tmp_path / "pool.yaml"
    manifest_file.write_text(manifest)
    controller = Controller(
        config=ControllerConfig(manifests=manifest_file, relist_interval_s=1.0),
        runtime=runtime or DockerRuntime(instance=instance),
        queue=await open_queue(queue_url, state_dir=tmp_path),
    )
    server = TestServer(make_app(controller), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Shoal(
                controller=controller, url=str(server.make_url("")).rstrip("/"), session=session
            )
    finally:
        await server.close()


async def test_task_three_times_its_lease_runs_once_on_a_live_docker_worker(
    tmp_path: Path, docker_client: docker.DockerClient, worker_image: str, instance_label: str
) -> None:
    lease_s, work_s = 2.0, 6.0
    manifest = delivery_manifest(min_replicas=2, max_replicas=2, lease_timeout=f"{lease_s:g}s")
    async with shoal_on_docker(tmp_path, manifest, instance=instance_label) as shoal:

        async def two_ready() -> bool:
            workers = (await shoal.get("/metrics.json"))["workers"]
            return sum(1 for w in workers if w["state"] == "ready") == 2

        await shoal.wait_for(two_ready, timeout_s=60, what="two ready workers")
        task_id = await shoal.enqueue(payload={"long": True}, work_seconds=work_s)
        expiries: list[float] = []

        async def finished() -> bool:
            task = await shoal.get(f"/tasks/{task_id}")
            if task["state"] == "running" and task["leaseExpiresAt"] is not None:
                expiries.append(task["leaseExpiresAt"])
            return task["state"] in ("succeeded", "failed", "dead")

        await shoal.wait_for(finished, timeout_s=60, what="the long task", interval_s=0.1)
        task = await shoal.get(f"/tasks/{task_id}")
        assert task["state"] == "succeeded", task
        assert task["attempts"] == 1, task
        assert len(task["workers"]) == 1, task["workers"]
        ran_s = task["finishedAt"] - task["startedAt"]
        assert ran_s >= work_s

        # The lease moved forward while the worker held the task, beyond its first expiry.
        assert expiries and max(expiries) - task["startedAt"] > 2 * lease_s, expiries

        # Each worker's own counters: exactly one run in all, and no run in progress.
        runs = 0
        for worker in (await shoal.get("/metrics.json"))["workers"]:
            async with shoal.session.get(
                f"http://127.0.0.1:{worker['hostPort']}/metrics"
            ) as response:
                counters = await response.json()
            runs += counters["processed"] + counters["active"]
        assert runs == 1
        assert shoal.controller.outcomes["succeeded"] == 1
        print(
            f"lease: a {work_s:g}s task on a {lease_s:g}s lease ran once in {ran_s:.2f}s; "
            f"{len(set(expiries))} lease expiries seen, last "
            f"{max(expiries) - task['startedAt']:.2f}s after start"
        )
