"""Fixtures for browser tests: the system Chromium driven by Playwright, and a Shoal to look at.

The browser is Debian's ``chromium`` package; Playwright never downloads one. Without the
browser or the Playwright package the browser tests skip, except under ``CI=true``, where that
is a failure: CI must run them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from api import dashboard
from api.app import make_app
from controller.manager import Controller, ControllerConfig
from controller.queues.memory import MemoryQueue
from controller.runtimes.docker import DockerRuntime

CHROMIUM = os.environ.get("SHOAL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Starts from zero and takes a few seconds per task, so enqueued tasks wait long enough to be
# seen queued, and the first enqueue makes a scaling event.
POOL_MANIFEST = """
apiVersion: shoal/v1
kind: WorkerPool
metadata: {name: web}
spec:
  replicas: {min: 0, max: 2}
  template:
    image: shoal/worker:latest
    concurrency: 1
    env: {WORK_SECONDS: "3"}
  scaling:
    evaluationInterval: 500ms
    targets: {backlogPerReplica: 2}
    scaleDown: {stabilizationWindow: 30s, drainTimeout: 30s, gracePeriod: 5s}
    spawn: {maxInFlight: 1, minInterval: 500ms}
    scaleToZero: {after: 60s}
"""


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


@dataclass
class RunningShoal:
    controller: Controller
    url: str
    instance: str
    session: aiohttp.ClientSession

    async def enqueue(self, pool: str, payload: Any) -> str:
        async with self.session.post(
            f"{self.url}/enqueue-task", json={"pool": pool, "payload": payload}
        ) as response:
            body = await response.json()
            assert response.status == 202, body
            return str(body["id"])


@pytest.fixture
def chromium_path() -> str:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[test]')")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        found = shutil.which("chromium")
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium); PATH has {found}")
    return CHROMIUM


@pytest.fixture
async def browser(chromium_path: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as driver:
        launched = await driver.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def shoal(
    tmp_path: Path, worker_image: str, instance_label: str
) -> AsyncIterator[RunningShoal]:
    """Shoal on real Docker under the test's own ``shoal.instance``, served on loopback."""
    manifest = tmp_path / "pool.yaml"
    manifest.write_text(POOL_MANIFEST.replace("shoal/worker:latest", worker_image))
    controller = Controller(
        config=ControllerConfig(manifests=manifest, shutdown_grace_s=2.0),
        runtime=DockerRuntime(instance=instance_label),
        queue=MemoryQueue(),
    )
    app = make_app(controller)
    dashboard.setup(app)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield RunningShoal(
                controller=controller,
                url=str(server.make_url("")).rstrip("/"),
                instance=instance_label,
                session=session,
            )
    finally:
        await server.close()
