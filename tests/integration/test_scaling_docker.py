"""Shoal on a real Docker engine: workers come and go with the work (issue: end to end)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import docker
import pytest

from controller.runtimes.base import ObservedWorker, WorkerId, WorkerSpec
from controller.runtimes.docker import DockerRuntime
from tests.integration.shoal_harness import pool_manifest, running_shoal

pytestmark = [pytest.mark.docker, pytest.mark.timeout(240)]


def shoal_containers(client: docker.DockerClient, instance: str) -> list[Any]:
    return client.containers.list(
        all=True, filters={"label": ["shoal.managed=true", f"shoal.instance={instance}"]}
    )


async def test_twenty_tasks_spread_over_workers_on_docker_assigned_ports(
    tmp_path: Path, docker_client: docker.DockerClient, worker_image: str, instance_label: str
) -> None:
    async with running_shoal(
        tmp_path,
        pool_manifest(min_replicas=0, max_replicas=4, concurrency=1, work_seconds=2),
        instance=instance_label,
    ) as shoal:
        ids = [await shoal.enqueue(payload={"n": i}, work_seconds=2) for i in range(20)]

        most_ports: list[int] = []
        checked_against_engine = False

        async def all_done() -> bool:
            nonlocal most_ports, checked_against_engine
            metrics = await shoal.get("/metrics.json")
            ports = metrics["workerPorts"]
            if len(ports) > len(most_ports):
                most_ports = list(ports)
            if len(ports) >= 3 and not checked_against_engine:
                # The ports Shoal lists are the ones Docker assigned, read back from the engine.
                for worker in metrics["workers"]:
                    container = docker_client.containers.get(worker["workerId"])
                    binding = container.attrs["NetworkSettings"]["Ports"]["8080/tcp"][0]
                    assert binding["HostIp"] == "127.0.0.1"
                    assert int(binding["HostPort"]) == worker["hostPort"]
                checked_against_engine = True
            states = [(await shoal.get(f"/tasks/{i}"))["state"] for i in ids]
            assert "dead" not in states and "failed" not in states, states
            return all(s == "succeeded" for s in states)

        await shoal.wait_for(all_done, timeout_s=120, what="20 tasks to succeed", interval_s=0.25)
        assert len(most_ports) >= 3, f"at most {len(most_ports)} workers ran at once"
        assert len(set(most_ports)) == len(most_ports), "host ports must be distinct"
        assert checked_against_engine

        async def back_to_min() -> bool:
            metrics = await shoal.get("/metrics.json")
            return metrics["replicas"] == 0 and not metrics["workerIds"]

        await shoal.wait_for(back_to_min, timeout_s=60, what="the pool to return to min 0")
        events = (await shoal.get("/scaling-events"))["events"]
        assert any(e["to"] > e["from"] for e in events)
        assert any(e["to"] < e["from"] for e in events)
        assert all(e["reason"] for e in events)

    assert shoal_containers(docker_client, instance_label) == []


class RecordingRuntime:
    """Wraps the Docker runtime to record how many starts overlap and when each began."""

    def __init__(self, inner: DockerRuntime) -> None:
        self.inner = inner
        self.name = inner.name
        self.in_flight = 0
        self.most_in_flight = 0
        self.start_times: list[float] = []

    async def start(self, spec: WorkerSpec) -> ObservedWorker:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.start_times.append(time.monotonic())
        try:
            return await self.inner.start(spec)
        finally:
            self.in_flight -= 1

    async def stop(self, worker_id: WorkerId, *, grace_s: float) -> None:
        await self.inner.stop(worker_id, grace_s=grace_s)

    async def list(self) -> list[ObservedWorker]:
        return await self.inner.list()

    def events(self) -> Any:
        return self.inner.events()

    async def close(self) -> None:
        await self.inner.close()


async def test_burst_of_enqueues_spawns_one_at_a_time_at_least_one_second_apart(
    tmp_path: Path, docker_client: docker.DockerClient, worker_image: str, instance_label: str
) -> None:
    runtime = RecordingRuntime(DockerRuntime(instance=instance_label))
    async with running_shoal(
        tmp_path,
        pool_manifest(max_replicas=4, work_seconds=1, scale_down_window="30s"),
        instance=instance_label,
        runtime=runtime,  # type: ignore[arg-type]
    ) as shoal:
        burst_started = time.monotonic()
        await asyncio.gather(*(shoal.enqueue(work_seconds=1) for _ in range(50)))
        assert time.monotonic() - burst_started < 1.0, "the burst itself must fit in one second"

        async def first_ready() -> bool:
            return any(w["state"] == "ready" for w in (await shoal.get("/metrics.json"))["workers"])

        await shoal.wait_for(first_ready, timeout_s=20, what="the first worker", interval_s=0.02)
        first_ready_s = time.monotonic() - burst_started

        async def four_started() -> bool:
            return len(runtime.start_times) >= 4

        await shoal.wait_for(four_started, timeout_s=30, what="four spawns")

    gaps = [b - a for a, b in zip(runtime.start_times, runtime.start_times[1:], strict=False)]
    print(f"burst: first worker ready {first_ready_s:.3f}s after the first enqueue; gaps {gaps}")
    assert runtime.most_in_flight == 1
    assert all(gap >= 0.99 for gap in gaps), gaps
    assert shoal_containers(docker_client, instance_label) == []


async def test_unrelated_container_is_never_stopped(
    tmp_path: Path, docker_client: docker.DockerClient, worker_image: str, instance_label: str
) -> None:
    bystander = docker_client.containers.run(
        worker_image,
        detach=True,
        name=f"bystander-{instance_label}",
        labels={"test.bystander": instance_label},
        ports={"8080/tcp": ("127.0.0.1", None)},
    )
    try:
        async with running_shoal(
            tmp_path, pool_manifest(max_replicas=2, work_seconds=1), instance=instance_label
        ) as shoal:
            for _ in range(3):
                await shoal.enqueue(work_seconds=1)

            async def scaled_up_then_down() -> bool:
                events = (await shoal.get("/scaling-events"))["events"]
                metrics = await shoal.get("/metrics.json")
                went_down = any(e["to"] < e["from"] for e in events)
                return went_down and not metrics["workerIds"]

            await shoal.wait_for(scaled_up_then_down, timeout_s=60, what="a scale up and down")
        bystander.reload()
        assert bystander.status == "running"
    finally:
        bystander.remove(force=True)
