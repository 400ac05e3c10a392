"""An in-process Shoal on real Docker for integration tests.

``running_shoal`` starts a Controller with the Docker runtime under a unique
``shoal.instance`` label, serves the API on a free loopback port, and on exit
stops it the way ``shoal up`` does on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from api.app import make_app
from controller.manager import Controller, ControllerConfig
from controller.queues.memory import MemoryQueue
from controller.runtimes.base import Runtime
from controller.runtimes.docker import DockerRuntime


def pool_manifest(
    *,
    name: str = "default",
    min_replicas: int = 0,
    max_replicas: int = 4,
    concurrency: int = 1,
    work_seconds: float = 2.0,
    backlog_per_replica: float = 1.0,
    scale_down_window: str = "2s",
    scale_to_zero_after: str = "2s",
    min_interval: str = "1s",
    image: str = "shoal/worker:latest",
) -> str:
    return f"""
apiVersion: shoal/v1
kind: WorkerPool
metadata: {{name: {name}}}
spec:
  replicas: {{min: {min_replicas}, max: {max_replicas}}}
  template:
    image: {image}
    concurrency: {concurrency}
    env: {{WORK_SECONDS: "{work_seconds}"}}
  scaling:
    evaluationInterval: 500ms
    targets: {{backlogPerReplica: {backlog_per_replica}}}
    scaleDown: {{stabilizationWindow: {scale_down_window}, drainTimeout: 60s, gracePeriod: 5s}}
    spawn: {{maxInFlight: 1, minInterval: {min_interval}}}
    scaleToZero: {{after: {scale_to_zero_after}}}
  delivery: {{leaseTimeout: 20s, maxAttempts: 5, backoff: {{initial: 200ms, max: 2s}}}}
"""


@dataclass
class Shoal:
    controller: Controller
    url: str
    session: aiohttp.ClientSession

    async def get(self, path: str) -> Any:
        async with self.session.get(self.url + path) as response:
            return await response.json()

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        async with self.session.post(self.url + path, json=body) as response:
            return response.status, await response.json()

    async def enqueue(self, **body: Any) -> str:
        status, reply = await self.post("/enqueue-task", body)
        assert status == 202, reply
        return str(reply["id"])

    async def wait_for(
        self,
        predicate: Callable[[], Any],
        *,
        timeout_s: float,
        what: str,
        interval_s: float = 0.2,
    ) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            result = await predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
            await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def running_shoal(
    tmp_path: Path,
    manifest: str,
    *,
    instance: str,
    runtime: Runtime | None = None,
) -> AsyncIterator[Shoal]:
    manifest_file = tmp_path / "pool.yaml"
    manifest_file.write_text(manifest)
    controller = Controller(
        config=ControllerConfig(manifests=manifest_file, relist_interval_s=1.0),
        runtime=runtime or DockerRuntime(instance=instance),
        queue=MemoryQueue(),
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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ShoalProcess:
    """``shoal up`` as a child process, for tests that kill or restart the controller.

    It always runs under the test's own ``--instance`` label, on a free loopback
    port, with its state in a folder of the test's.
    """

    def __init__(
        self,
        *,
        manifests: Path,
        state_dir: Path,
        instance: str,
        queue: str = "sqlite://",
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.manifests = manifests
        self.state_dir = state_dir
        self.instance = instance
        self.queue = queue
        self.port = port or free_port()
        self.extra_args = extra_args
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = state_dir / f"shoal-{self.port}.log"
        self.process: Any = None

    def start(self, *, timeout_s: float = 30.0) -> ShoalProcess:
        import urllib.request

        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = self._spawn(log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"shoal exited at start: {self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"shoal did not answer within {timeout_s}s: {self.log()}")

    def _spawn(self, log: Any) -> Any:
        import subprocess
        import sys

        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "api.cli",
                "up",
                "--runtime",
                "docker",
                "--manifests",
                str(self.manifests),
                "--state-dir",
                str(self.state_dir),
                "--queue",
                self.queue,
                "--port",
                str(self.port),
                "--instance",
                self.instance,
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a crash."""
        self.process.kill()
        self.process.wait(timeout=10)

    def terminate(self, *, timeout_s: float = 60.0) -> int:
        self.process.terminate()
        return int(self.process.wait(timeout=timeout_s))

    def __enter__(self) -> ShoalProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.terminate()


def http_json(
    method: str, url: str, body: Any = None, *, timeout_s: float = 10.0
) -> tuple[int, Any]:
    """A blocking JSON request for subprocess tests (stdlib only)."""
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else None
