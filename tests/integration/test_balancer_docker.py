"""The balancer on real worker containers while the pool scales and rolls (issue 5).

Each test runs a controller with the Docker runtime under its own
``shoal.instance`` label (removed afterwards by the ``instance_label`` fixture)
and a balancer, in process or following the API over HTTP, then sends bounded
load through the balancer on loopback.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from api.app import make_app
from api.balancer_cli import start_in_process
from api.endpoints import HttpControlPlane
from api.proxy import Proxy, ProxyConfig
from controller.manager import Controller, ControllerConfig
from controller.queues.memory import MemoryQueue
from controller.runtimes.docker import DockerRuntime

pytestmark = [pytest.mark.docker, pytest.mark.timeout(420)]


def manifest(*, image: str, min_replicas: int, max_replicas: int = 4, rev: str = "1") -> str:
    return f"""
apiVersion: shoal/v1
kind: WorkerPool
metadata: {{name: default}}
spec:
  replicas: {{min: {min_replicas}, max: {max_replicas}}}
  template:
    image: {image}
    concurrency: 16
    env: {{WORK_SECONDS: "0", REV: "{rev}"}}
    resources: {{memory: 64Mi, cpus: 0.5, pids: 64}}
  scaling:
    evaluationInterval: 200ms
    scaleDown: {{stabilizationWindow: 0s, period: 0s, drainTimeout: 20s, gracePeriod: 5s}}
    spawn: {{maxInFlight: 2, minInterval: 200ms}}
"""


def two_pools(image: str) -> str:
    return f"""
apiVersion: shoal/v1
kind: WorkerPool
metadata: {{name: cold}}
spec:
  replicas: {{min: 0, max: 1}}
  template: {{image: {image}, env: {{WORK_SECONDS: "0"}}}}
  scaling: {{evaluationInterval: 200ms, scaleToZero: {{after: 600s}}}}
---
apiVersion: shoal/v1
kind: WorkerPool
metadata: {{name: closed}}
spec:
  replicas: {{min: 0, max: 0}}
  template: {{image: {image}}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Running:
    controller: Controller
    url: str  # the balancer's


@contextlib.asynccontextmanager
async def shoal(manifest_path: Path, *, instance: str, mode: str) -> AsyncIterator[Running]:
    runtime = DockerRuntime(instance=instance)
    controller = Controller(
        config=ControllerConfig(manifests=manifest_path, relist_interval_s=2.0),
        runtime=runtime,
        queue=MemoryQueue(),
    )
    await controller.start()
    config = ProxyConfig(activation_timeout_s=60.0, probe_interval_s=0.2)
    api_runner: web.AppRunner | None = None
    try:
        if mode == "in-process":
            handle = await start_in_process(controller, host="127.0.0.1", port=0)
            close = handle.close
            url = handle.url
        else:
            api_port = free_port()
            api_runner = web.AppRunner(
                make_app(controller, manage_controller=False), shutdown_timeout=0.5
            )
            await api_runner.setup()
            await web.TCPSite(api_runner, "127.0.0.1", api_port).start()
            proxy = Proxy(HttpControlPlane(f"http://127.0.0.1:{api_port}"), config=config)
            port = await proxy.start(host="127.0.0.1", port=0)
            close = proxy.close
            url = f"http://127.0.0.1:{port}"
        try:
            yield Running(controller=controller, url=url)
        finally:
            await close()
    finally:
        if api_runner is not None:
            await api_runner.cleanup()
        await controller.stop()


async def until(
    predicate: Callable[[], bool], *, timeout_s: float, what: str, poll_s: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@dataclass
class LoadReport:
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    errors: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    workers: set[str] = field(default_factory=set)

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + len(self.errors)


async def load(
    url: str, stop: asyncio.Event, report: LoadReport, *, n_clients: int, max_requests: int
) -> None:
    """Bounded closed-loop load: POST /process-task and GET /healthz, alternating."""
    counter = itertools.count()

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        while not stop.is_set():
            n = next(counter)
            if n >= max_requests:
                return
            try:
                if n % 2:
                    async with session.get(f"{url}/healthz") as response:
                        await response.read()
                        status = response.status
                else:
                    body = {"id": f"c{index}-{n}", "work_seconds": 0.005}
                    async with session.post(f"{url}/process-task", json=body) as response:
                        doc = await response.json(content_type=None)
                        status = response.status
                        if status == 200:
                            report.workers.add(doc["worker"])
                report.statuses[status] += 1
                if status >= 500:
                    report.bad.append(f"{status} {doc if n % 2 == 0 else ''}")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                report.errors.append(f"{type(exc).__name__}: {exc}")

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session, i) for i in range(n_clients)))


def _ready(controller: Controller, *, template_hash: str | None = None) -> list[str]:
    return [
        w.name
        for w in controller.registry.list("default")
        if w.routable and (template_hash is None or w.template_hash == template_hash)
    ]


@pytest.mark.parametrize("mode", ["in-process", "http"])
async def test_balancer_serves_without_errors_while_the_pool_scales_and_rolls(
    tmp_path: Path, worker_image: str, instance_label: str, mode: str
) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text(manifest(image=worker_image, min_replicas=2))
    async with shoal(path, instance=instance_label, mode=mode) as running:
        ctl = running.controller
        await until(lambda: len(_ready(ctl)) >= 2, timeout_s=90, what="2 ready workers")

        stop = asyncio.Event()
        report = LoadReport()
        traffic = asyncio.ensure_future(
            load(running.url, stop, report, n_clients=8, max_requests=200_000)
        )
        try:
            await asyncio.sleep(1.0)
            # Scale up.
            path.write_text(manifest(image=worker_image, min_replicas=4))
            await until(lambda: len(_ready(ctl)) >= 4, timeout_s=90, what="4 ready workers")
            await asyncio.sleep(1.0)

            # Roll the template: every worker is replaced, one surge worker at a time.
            path.write_text(manifest(image=worker_image, min_replicas=4, rev="2"))
            await asyncio.sleep(1.0)
            new_hash = ctl.store.pools["default"].spec.template.template_hash()
            await until(
                lambda: (
                    len(_ready(ctl, template_hash=new_hash)) >= 4
                    and all(w.template_hash == new_hash for w in ctl.registry.list("default"))
                ),
                timeout_s=180,
                what="the rollout to finish",
            )
            await asyncio.sleep(1.0)

            # Scale down: three workers drain and stop under load.
            path.write_text(manifest(image=worker_image, min_replicas=1, rev="2"))
            await until(
                lambda: len(ctl.registry.list("default")) == 1,
                timeout_s=120,
                what="the pool to shrink to one worker",
            )
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.wait_for(traffic, timeout=60)

    print(
        f"\n[{mode}] {report.total} requests, statuses {dict(report.statuses)}, "
        f"{len(report.errors)} connection errors, {len(report.workers)} workers served"
    )
    assert report.errors == [], report.errors[:5]
    assert report.bad == [], report.bad[:5]
    assert set(report.statuses) == {200}, report.statuses
    assert report.total > 200
    # Two initial, two scaled up and four rolled workers all served traffic.
    assert len(report.workers) >= 6, report.workers


async def test_balancer_scales_from_zero_and_refuses_a_pool_with_max_zero(
    tmp_path: Path, worker_image: str, instance_label: str
) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text(two_pools(worker_image))
    async with shoal(path, instance=instance_label, mode="in-process") as running:
        ctl = running.controller
        assert ctl.registry.list() == []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session:
            started = time.monotonic()
            async with session.get(f"{running.url}/pools/cold/healthz") as response:
                assert response.status == 200
                assert (await response.json())["status"] == "ok"
            waited_s = time.monotonic() - started
            assert len(_ready_in(ctl, "cold")) == 1
            # The first request waited for a container to start; the worker was not there before.
            assert waited_s > 0

            async with session.get(f"{running.url}/pools/closed/healthz") as response:
                assert response.status == 503
                assert response.headers["Retry-After"].isdigit()
                assert "max 0" in (await response.json())["error"]
        assert ctl.registry.list("closed") == []


def _ready_in(controller: Controller, pool: str) -> list[str]:
    return [w.name for w in controller.registry.list(pool) if w.routable]


async def get_load(url: str, stop: asyncio.Event, report: LoadReport, *, n_clients: int) -> None:
    """Bounded GET load (idempotent, so the balancer may retry it on another worker)."""
    deadline = time.monotonic() + 120

    async def client(session: aiohttp.ClientSession) -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                async with session.get(f"{url}/healthz") as response:
                    await response.read()
                    report.statuses[response.status] += 1
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                report.errors.append(f"{type(exc).__name__}: {exc}")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(client(session) for _ in range(n_clients)))


async def test_a_killed_worker_is_ejected_and_gets_requests_are_retried_elsewhere(
    tmp_path: Path, docker_client: object, worker_image: str, instance_label: str
) -> None:
    import docker

    assert isinstance(docker_client, docker.DockerClient)
    path = tmp_path / "pool.yaml"
    path.write_text(manifest(image=worker_image, min_replicas=2))
    async with shoal(path, instance=instance_label, mode="in-process") as running:
        ctl = running.controller
        await until(lambda: len(_ready(ctl)) >= 2, timeout_s=90, what="2 ready workers")
        victim = ctl.registry.list("default")[0]
        stop = asyncio.Event()
        report = LoadReport()
        traffic = asyncio.ensure_future(get_load(running.url, stop, report, n_clients=8))
        try:
            await asyncio.sleep(1.0)
            # SIGKILL: no drain, no goodbye; the registry learns of it only later.
            await asyncio.to_thread(docker_client.containers.get(victim.worker_id).kill)
            await until(
                lambda: (
                    victim.worker_id not in {w.worker_id for w in ctl.registry.list()}
                    and len(_ready(ctl)) >= 2
                ),
                timeout_s=90,
                what="the dead worker to be replaced",
            )
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.wait_for(traffic, timeout=60)

    print(f"\n[kill] {report.total} requests, statuses {dict(report.statuses)}")
    assert report.errors == [], report.errors[:5]
    assert set(report.statuses) == {200}, report.statuses
    assert report.total > 50


async def test_a_worker_stopped_from_outside_drains_without_503s_reaching_clients(
    tmp_path: Path, docker_client: object, worker_image: str, instance_label: str
) -> None:
    """``docker stop``: the worker drains itself (503s) before the registry hears of it."""
    import docker

    assert isinstance(docker_client, docker.DockerClient)
    path = tmp_path / "pool.yaml"
    path.write_text(manifest(image=worker_image, min_replicas=2))
    async with shoal(path, instance=instance_label, mode="in-process") as running:
        ctl = running.controller
        await until(lambda: len(_ready(ctl)) >= 2, timeout_s=90, what="2 ready workers")
        victim = ctl.registry.list("default")[0]
        stop = asyncio.Event()
        report = LoadReport()
        traffic = asyncio.ensure_future(
            load(running.url, stop, report, n_clients=8, max_requests=200_000)
        )
        try:
            await asyncio.sleep(1.0)
            container = docker_client.containers.get(victim.worker_id)
            await asyncio.to_thread(container.stop, timeout=10)
            await until(
                lambda: (
                    victim.worker_id not in {w.worker_id for w in ctl.registry.list()}
                    and len(_ready(ctl)) >= 2
                ),
                timeout_s=90,
                what="the stopped worker to be replaced",
            )
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.wait_for(traffic, timeout=60)

    print(f"\n[docker stop] {report.total} requests, statuses {dict(report.statuses)}")
    assert report.errors == [], report.errors[:5]
    assert report.bad == [], report.bad[:5]
    assert set(report.statuses) == {200}, report.statuses
    assert report.total > 50
