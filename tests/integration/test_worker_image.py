"""The worker image: how it is built, what it declares, and how its container behaves."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest

from controller.runtimes.base import ObservedWorker, WorkerSpec
from controller.runtimes.docker import DockerRuntime
from tests.conftest import REPO

pytestmark = pytest.mark.docker


def _call(port: int, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def _until(port: int, predicate: Any, *, path: str = "/metrics") -> Any:
    """Polls a worker route until ``predicate(body)`` holds (bounded: about 15 s)."""
    for _ in range(300):
        try:
            status, body = await asyncio.to_thread(_call, port, path)
            if status == 200 and predicate(body):
                return body
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} on port {port} never matched")


@pytest.fixture
async def runtime(instance_label: str, worker_image: str) -> AsyncIterator[DockerRuntime]:
    rt = DockerRuntime(instance=instance_label)
    try:
        yield rt
    finally:
        await rt.close()


async def _start(runtime: DockerRuntime, image: str, name: str, **env: str) -> ObservedWorker:
    worker = await runtime.start(
        WorkerSpec(
            pool="img",
            name=name,
            image=image,
            port=8080,
            concurrency=2,
            template_hash="img-1",
            env=env,
            memory_bytes=64 * 1024 * 1024,
            pids=64,
        )
    )
    assert worker.host_port is not None
    await _until(worker.host_port, lambda body: body == {"status": "ok"}, path="/healthz")
    return worker


def test_build_images_script_builds_the_worker_image(docker_client, worker_image):
    """Runs the real script; with a base at hand it only rebuilds cached layers."""
    result = subprocess.run(
        [str(REPO / "hack" / "build-images.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root"},
    )

    assert result.returncode == 0, result.stderr
    assert "build-images: base: " in result.stderr
    assert f"build-images: built {worker_image}" in result.stderr
    image = docker_client.images.get(worker_image)
    assert image.labels["org.opencontainers.image.title"] == "shoal-worker"


def test_worker_image_declares_a_non_root_user_and_the_defaults(docker_client, worker_image):
    config = docker_client.images.get(worker_image).attrs["Config"]

    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["python3", "/app/worker.py"]
    assert "8080/tcp" in config["ExposedPorts"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert (env["WORK_SECONDS"], env["CONCURRENCY"], env["PORT"]) == ("120", "1", "8080")
    assert env["PYTHONUNBUFFERED"] == "1"


async def test_worker_container_serves_tasks_up_to_its_concurrency(
    runtime, worker_image, instance_label
):
    worker = await _start(runtime, worker_image, f"{instance_label}-c")
    port = worker.host_port
    long_calls = [
        asyncio.create_task(
            asyncio.to_thread(_call, port, "/process-task", {"id": f"t{i}", "work_seconds": 2})
        )
        for i in range(2)
    ]
    await _until(port, lambda body: body["active"] == 2)

    refused = await asyncio.to_thread(_call, port, "/process-task", {"id": "t3"})
    answers = await asyncio.gather(*long_calls)

    assert refused[0] == 429
    assert sorted(body["id"] for _, body in answers) == ["t0", "t1"]
    assert all(status == 200 and body["worker"] == worker.name for status, body in answers)
    metrics = await asyncio.to_thread(_call, port, "/metrics")
    assert (metrics[1]["processed"], metrics[1]["rejected"]) == (2, 1)


async def test_worker_container_finishes_its_task_on_sigterm_and_exits_0(
    runtime, docker_client, worker_image, instance_label
):
    worker = await _start(runtime, worker_image, f"{instance_label}-d")
    port = worker.host_port
    answer: list[tuple[int, Any]] = []
    caller = threading.Thread(
        target=lambda: answer.append(
            _call(port, "/process-task", {"id": "drain-me", "work_seconds": 1.5})
        ),
        daemon=True,
    )
    caller.start()
    await _until(port, lambda body: body["active"] == 1)
    container = docker_client.containers.get(worker.worker_id)

    await asyncio.to_thread(container.stop, timeout=30)
    await asyncio.to_thread(caller.join, 30)

    container.reload()
    assert answer and answer[0][0] == 200 and answer[0][1]["id"] == "drain-me"
    assert container.attrs["State"]["ExitCode"] == 0
    logs = container.logs().decode()
    assert "draining, 1 task(s) in flight" in logs
    assert "drained: 1 processed" in logs


async def test_worker_container_runs_on_a_read_only_root(runtime, docker_client, worker_image):
    worker = await _start(runtime, worker_image, f"{runtime.instance}-ro")
    container = docker_client.containers.get(worker.worker_id)

    probe = container.exec_run(["python3", "-c", "open('/app/x', 'w')"])
    tmp = container.exec_run(["python3", "-c", "open('/tmp/x', 'w').write('ok')"])
    whoami = container.exec_run(["id", "-u"])

    assert probe.exit_code != 0 and b"Read-only file system" in probe.output
    assert tmp.exit_code == 0
    assert whoami.output.strip() == b"10001"


def test_worker_image_holds_only_the_worker_in_app(docker_client, worker_image, instance_label):
    """The build context is worker.py alone (.dockerignore): nothing else from the repo leaks in."""
    out = docker_client.containers.run(
        worker_image,
        entrypoint=["ls", "-A", "/app"],
        labels={"shoal.instance": instance_label},
        remove=True,
        network_disabled=True,
    )
    assert out.decode().split() == ["worker.py"]
