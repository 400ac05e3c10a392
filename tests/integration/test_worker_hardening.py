"""A worker Shoal starts on real Docker is locked down, and a token-guarded API refuses strangers.

One Shoal runs in process with the Docker runtime under this test's own ``shoal.instance``
label and ``SHOAL_API_TOKEN``-style bearer authentication. The test reads the worker back with
``docker inspect``, looks from inside it, runs a task on it, and checks that a request
without the token gets 401 and changes nothing. The ``instance_label`` fixture removes the
containers afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest
from aiohttp.test_utils import TestServer

from api.app import make_app
from controller.manager import Controller, ControllerConfig
from controller.queues.memory import MemoryQueue
from controller.runtimes.base import LABEL_INSTANCE, LABEL_MANAGED
from controller.runtimes.docker import DEFAULT_WORKER_USER, DockerRuntime

pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]

TOKEN = "hardening-test-token-0123456789"
MEMORY_BYTES = 96 * 1024 * 1024
MANIFEST = """
apiVersion: shoal/v1
kind: WorkerPool
metadata: {name: default}
spec:
  replicas: {min: 1, max: 1}
  template:
    image: %s
    concurrency: 1
    env: {WORK_SECONDS: "0"}
    resources: {memory: 96Mi, cpus: 0.25, pids: 64}
  scaling:
    evaluationInterval: 300ms
"""


class Api:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session

    async def call(
        self, method: str, path: str, *, token: str | None = TOKEN, body: Any = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(
            method, self.url + path, json=body, headers=headers
        ) as response:
            return response.status, await response.json()


@pytest.fixture
async def guarded_shoal(
    tmp_path: Path, worker_image: str, instance_label: str
) -> AsyncIterator[tuple[Api, Controller]]:
    manifest = tmp_path / "pool.yaml"
    manifest.write_text(MANIFEST % worker_image)
    controller = Controller(
        config=ControllerConfig(manifests=manifest, relist_interval_s=1.0),
        runtime=DockerRuntime(instance=instance_label),
        queue=MemoryQueue(),
    )
    server = TestServer(make_app(controller, api_token=TOKEN), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Api(str(server.make_url("")).rstrip("/"), session), controller
    finally:
        await server.close()


async def _ready_worker(api: Api) -> dict[str, Any]:
    for _ in range(300):  # bounded: about 30 s
        status, body = await api.call("GET", "/containers-status")
        assert status == 200, body
        ready = [w for w in body["containers"] if w["state"] == "ready"]
        if ready:
            return ready[0]
        await asyncio.sleep(0.1)
    raise AssertionError("no worker became ready")


async def test_worker_hardening_shows_in_docker_inspect_and_from_inside(
    guarded_shoal: tuple[Api, Controller], docker_client: docker.DockerClient
) -> None:
    api, _controller = guarded_shoal
    worker = await _ready_worker(api)
    attrs = docker_client.api.inspect_container(worker["workerId"])
    host, config = attrs["HostConfig"], attrs["Config"]

    assert config["User"] == DEFAULT_WORKER_USER
    assert host["ReadonlyRootfs"] is True
    assert set(host["Tmpfs"]) == {"/tmp"}
    assert {"noexec", "nosuid", "nodev"} <= set(host["Tmpfs"]["/tmp"].split(","))
    assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["Privileged"] is False
    assert host["PidsLimit"] == 64
    assert host["Memory"] == MEMORY_BYTES and host["MemorySwap"] == MEMORY_BYTES
    assert host["NanoCpus"] == 250_000_000
    assert not host.get("Binds") and attrs["Mounts"] == []
    assert "docker.sock" not in str(attrs)
    assert host["PortBindings"] == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
    assert config["Labels"][LABEL_MANAGED] == "true"

    container = docker_client.containers.get(worker["workerId"])
    instance = config["Labels"][LABEL_INSTANCE]
    assert instance.startswith("test-")

    def run(command: str) -> tuple[int, str]:
        code, output = container.exec_run(["sh", "-c", command])
        return code, output.decode(errors="replace").strip()

    assert run("id -u") == (0, DEFAULT_WORKER_USER.split(":")[0])
    assert run("touch /app/x")[0] != 0  # read-only root filesystem
    assert run("echo ok > /tmp/x && cat /tmp/x") == (0, "ok")
    assert run("test -e /var/run/docker.sock || test -e /run/docker.sock")[0] != 0
    code, status = run("grep -E '^(CapEff|NoNewPrivs):' /proc/self/status")
    assert code == 0
    assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status


async def test_worker_hardening_token_guards_the_api_and_the_worker_still_works(
    guarded_shoal: tuple[Api, Controller],
) -> None:
    api, controller = guarded_shoal
    await _ready_worker(api)
    _, before = await api.call("GET", "/queue-length")
    _, workers_before = await api.call("GET", "/containers-status")

    for token in (None, "not-the-token"):
        status, body = await api.call(
            "POST", "/enqueue-task", token=token, body={"work_seconds": 0}
        )
        assert status == 401, body
        status, _ = await api.call("POST", "/v1/pools/default/activate", token=token)
        assert status == 401
    assert (await api.call("GET", "/healthz", token=None))[0] == 200

    _, after = await api.call("GET", "/queue-length")
    assert after == before
    _, workers_after = await api.call("GET", "/containers-status")
    assert workers_after["count"] == workers_before["count"] == 1
    assert controller.outcomes.total() == 0

    # With the token, a task runs to the end on the hardened worker.
    status, reply = await api.call("POST", "/enqueue-task", body={"work_seconds": 0.1})
    assert status == 202
    for _ in range(200):  # bounded: about 20 s
        _, task = await api.call("GET", f"/tasks/{reply['id']}")
        if task["state"] == "succeeded":
            break
        await asyncio.sleep(0.1)
    assert task["state"] == "succeeded", task
