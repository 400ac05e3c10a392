"""Pull mode: ``workerimg/worker.py`` with ``MODE=pull`` against a real Shoal API (issue 4).

The worker runs as a local subprocess (stdlib only, as in its image) and takes tasks through
``POST /dequeue-task``; Shoal runs in process on a loopback port with the durable SQLite
queue and a pool capped at zero replicas, so no task is pushed: every lease here is a pull.
The guarantees are the push path's: a result is recorded once, a long task keeps its lease
through heartbeats, a killed worker's task runs again elsewhere, SIGTERM finishes the task
in hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from api.app import make_app
from controller.manager import Controller, ControllerConfig
from controller.queues import open_queue
from controller.runtimes.fake import FakeRuntime
from tests.integration.shoal_harness import Shoal, free_port

pytestmark = pytest.mark.timeout(90)

WORKER = Path(__file__).resolve().parents[2] / "workerimg" / "worker.py"


def _load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("shoal_pull_worker_under_test", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is being built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


worker_mod = _load_worker()


def pull_manifest(*, lease_timeout: str = "10s") -> str:
    # max 0: the reconciler starts nothing and the dispatcher has no one to push to.
    return f"""
apiVersion: shoal/v1
kind: WorkerPool
metadata: {{name: default}}
spec:
  replicas: {{min: 0, max: 0}}
  delivery: {{leaseTimeout: {lease_timeout}, maxAttempts: 5, backoff: {{initial: 100ms, max: 1s}}}}
"""


@contextlib.asynccontextmanager
async def shoal_for_pull(
    tmp_path: Path,
    *,
    lease_timeout: str = "10s",
    port: int | None = None,
    api_token: str | None = None,
) -> AsyncIterator[Shoal]:
    manifest = tmp_path / "pool.yaml"
    manifest.write_text(pull_manifest(lease_timeout=lease_timeout))
    queue = await open_queue("sqlite://", state_dir=tmp_path)
    controller = Controller(
        config=ControllerConfig(manifests=manifest, relist_interval_s=1.0),
        runtime=FakeRuntime(),
        queue=queue,
    )
    server = TestServer(make_app(controller, api_token=api_token), host="127.0.0.1", port=port)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Shoal(
                controller=controller, url=str(server.make_url("")).rstrip("/"), session=session
            )
    finally:
        await server.close()


class PullWorkerProcess:
    """One ``MODE=pull`` worker; stopped by its own pid only."""

    def __init__(self, *, url: str, worker_id: str, log_dir: Path, **env: str) -> None:
        self.worker_id = worker_id
        self.log_path = log_dir / f"{worker_id}.log"
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "MODE": "pull",
            "SHOAL_URL": url,
            "SHOAL_POOL": "default",
            "SHOAL_WORKER_ID": worker_id,
            "CONCURRENCY": "1",
            "WORK_SECONDS": "0.1",
            "PULL_IDLE_SECONDS": "0.05",
            "PULL_IDLE_MAX_SECONDS": "0.3",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PullWorkerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER)], env=self.env, stdout=log, stderr=log
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, *, timeout_s: float) -> int:
        """Waits off the event loop, which serves the API the worker may be calling."""
        assert self.proc is not None
        return await asyncio.to_thread(self.proc.wait, timeout_s)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def pull_workers(tmp_path: Path) -> Iterator[list[PullWorkerProcess]]:
    started: list[PullWorkerProcess] = []
    yield started
    for worker in started:
        worker.close()


async def task_states(shoal: Shoal, ids: list[str]) -> list[dict[str, Any]]:
    return [await shoal.get(f"/tasks/{task_id}") for task_id in ids]


async def test_pull_workers_run_every_task_once_and_report_results(
    tmp_path: Path, pull_workers: list[PullWorkerProcess]
) -> None:
    async with shoal_for_pull(tmp_path) as shoal:
        ids = [await shoal.enqueue(payload={"n": n}, work_seconds=0.1) for n in range(12)]
        for name in ("pull-a", "pull-b"):
            pull_workers.append(
                PullWorkerProcess(url=shoal.url, worker_id=name, log_dir=tmp_path).start()
            )

        async def all_succeeded() -> bool:
            return all(t["state"] == "succeeded" for t in await task_states(shoal, ids))

        await shoal.wait_for(all_succeeded, timeout_s=30, what="12 pulled tasks to succeed")
        tasks = await task_states(shoal, ids)
        for n, task in enumerate(tasks):
            assert task["attempts"] == 1, task
            assert len(task["workers"]) == 1 and task["workers"][0] in ("pull-a", "pull-b"), task
            assert task["result"]["result"] == {"echo": {"n": n}}
            assert task["result"]["worker"] == task["workers"][0]
        assert shoal.controller.outcomes["succeeded"] == 0, "nothing may have been pushed"

        for worker in pull_workers:
            worker.signal(signal.SIGTERM)
            assert await worker.wait(timeout_s=10) == 0, worker.log()
        processed = sum(
            int(w.log().rsplit("stopped: ", 1)[1].split(" processed")[0]) for w in pull_workers
        )
        assert processed == 12


async def test_pull_task_three_times_its_lease_runs_once_through_heartbeats(
    tmp_path: Path, pull_workers: list[PullWorkerProcess]
) -> None:
    async with shoal_for_pull(tmp_path, lease_timeout="1s") as shoal:
        task_id = await shoal.enqueue(payload={"long": True}, work_seconds=3.0)
        # Two pullers: were the lease to lapse, the idle one would take the task at once.
        for name in ("pull-one", "pull-two"):
            pull_workers.append(
                PullWorkerProcess(url=shoal.url, worker_id=name, log_dir=tmp_path).start()
            )
        expiries: list[float] = []

        async def finished() -> bool:
            task = await shoal.get(f"/tasks/{task_id}")
            if task["state"] == "running":
                expiries.append(task["leaseExpiresAt"])
            return bool(task["state"] == "succeeded")

        await shoal.wait_for(finished, timeout_s=30, what="the long task", interval_s=0.1)
        task = await shoal.get(f"/tasks/{task_id}")
        assert task["attempts"] == 1
        assert len(task["workers"]) == 1, task["workers"]
        assert task["finishedAt"] - task["startedAt"] >= 3.0
        # The lease was pushed out well past its first expiry, one heartbeat at a time.
        assert expiries and max(expiries) > task["startedAt"] + 2.0, expiries
        print(
            f"pull lease: task ran {task['finishedAt'] - task['startedAt']:.2f}s on a 1s lease, "
            f"{len(set(expiries))} distinct lease expiries seen, attempts {task['attempts']}"
        )


async def test_pull_worker_finishes_its_task_on_sigterm_and_takes_no_more(
    tmp_path: Path, pull_workers: list[PullWorkerProcess]
) -> None:
    async with shoal_for_pull(tmp_path) as shoal:
        first = await shoal.enqueue(payload={"n": 1}, work_seconds=1.5)
        second = await shoal.enqueue(payload={"n": 2}, work_seconds=0.1)
        worker = PullWorkerProcess(url=shoal.url, worker_id="pull-term", log_dir=tmp_path)
        pull_workers.append(worker.start())

        async def first_running() -> bool:
            return bool((await shoal.get(f"/tasks/{first}"))["state"] == "running")

        await shoal.wait_for(
            first_running, timeout_s=15, what="the first task to run", interval_s=0.05
        )
        worker.signal(signal.SIGTERM)
        assert await worker.wait(timeout_s=15) == 0, worker.log()

        assert (await shoal.get(f"/tasks/{first}"))["state"] == "succeeded"
        assert (await shoal.get(f"/tasks/{second}"))["state"] == "queued"


async def test_pull_worker_killed_mid_task_its_task_runs_again_on_another(
    tmp_path: Path, pull_workers: list[PullWorkerProcess]
) -> None:
    async with shoal_for_pull(tmp_path, lease_timeout="1s") as shoal:
        task_id = await shoal.enqueue(payload={"victim": True}, work_seconds=2.0)
        doomed = PullWorkerProcess(url=shoal.url, worker_id="pull-doomed", log_dir=tmp_path)
        pull_workers.append(doomed.start())

        async def running() -> bool:
            return bool((await shoal.get(f"/tasks/{task_id}"))["state"] == "running")

        await shoal.wait_for(running, timeout_s=15, what="the task to run", interval_s=0.05)
        doomed.signal(signal.SIGKILL)
        await doomed.wait(timeout_s=10)
        pull_workers.append(
            PullWorkerProcess(url=shoal.url, worker_id="pull-heir", log_dir=tmp_path).start()
        )

        async def succeeded() -> bool:
            return bool((await shoal.get(f"/tasks/{task_id}"))["state"] == "succeeded")

        await shoal.wait_for(succeeded, timeout_s=30, what="the task to run again")
        task = await shoal.get(f"/tasks/{task_id}")
        assert task["workers"] == ["pull-doomed", "pull-heir"]
        assert task["attempts"] == 2
        assert task["result"]["worker"] == "pull-heir"


async def test_pull_worker_waits_for_an_unreachable_shoal_then_works(
    tmp_path: Path, pull_workers: list[PullWorkerProcess]
) -> None:
    port = free_port()
    worker = PullWorkerProcess(
        url=f"http://127.0.0.1:{port}", worker_id="pull-early", log_dir=tmp_path
    )
    pull_workers.append(worker.start())
    deadline = time.monotonic() + 10
    while "cannot reach Shoal" not in worker.log():
        assert time.monotonic() < deadline, worker.log()
        await asyncio.sleep(0.05)
    assert worker.proc is not None and worker.proc.poll() is None, "it must not give up"

    async with shoal_for_pull(tmp_path, port=port) as shoal:
        task_id = await shoal.enqueue(payload={"late": True}, work_seconds=0.1)

        async def succeeded() -> bool:
            return bool((await shoal.get(f"/tasks/{task_id}"))["state"] == "succeeded")

        await shoal.wait_for(succeeded, timeout_s=20, what="the worker to find Shoal")
        assert (await shoal.get(f"/tasks/{task_id}"))["workers"] == ["pull-early"]


async def test_pull_worker_reports_a_failing_task_as_permanent(
    tmp_path: Path, pull_workers: list[PullWorkerProcess]
) -> None:
    async with shoal_for_pull(tmp_path) as shoal:
        task_id = await shoal.enqueue(payload={"fail": "bad input"})
        pull_workers.append(
            PullWorkerProcess(url=shoal.url, worker_id="pull-fail", log_dir=tmp_path).start()
        )

        async def failed() -> bool:
            return bool((await shoal.get(f"/tasks/{task_id}"))["state"] == "failed")

        await shoal.wait_for(failed, timeout_s=20, what="the task to fail")
        task = await shoal.get(f"/tasks/{task_id}")
        assert task["error"] == "bad input"
        assert task["attempts"] == 1


async def test_pull_worker_sends_the_api_token_and_is_refused_without_it(
    tmp_path: Path, pull_workers: list[PullWorkerProcess]
) -> None:
    token = "pull-test-token-0123456789"
    async with shoal_for_pull(tmp_path, api_token=token) as shoal:
        status, _ = await shoal.post("/enqueue-task", {"payload": {"guarded": True}})
        assert status == 401
        async with shoal.session.post(
            f"{shoal.url}/enqueue-task",
            json={"payload": {"guarded": True}, "work_seconds": 0.1},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            assert response.status == 202
            task_id = (await response.json())["id"]
        stranger = PullWorkerProcess(url=shoal.url, worker_id="pull-stranger", log_dir=tmp_path)
        pull_workers.append(stranger.start())
        deadline = time.monotonic() + 10
        while "dequeue answered 401" not in stranger.log():
            assert time.monotonic() < deadline, stranger.log()
            await asyncio.sleep(0.05)
        stranger.signal(signal.SIGTERM)
        assert await stranger.wait(timeout_s=10) == 0

        pull_workers.append(
            PullWorkerProcess(
                url=shoal.url, worker_id="pull-member", log_dir=tmp_path, SHOAL_API_TOKEN=token
            ).start()
        )

        async def succeeded() -> bool:
            async with shoal.session.get(
                f"{shoal.url}/tasks/{task_id}", headers={"Authorization": f"Bearer {token}"}
            ) as response:
                task = await response.json()
            return bool(task["state"] == "succeeded" and task["workers"] == ["pull-member"])

        await shoal.wait_for(succeeded, timeout_s=20, what="the token-holding worker")


def test_pull_idle_wait_doubles_up_to_its_cap() -> None:
    waits = [0.0]
    for _ in range(6):
        waits.append(worker_mod.next_idle_s(waits[-1], initial_s=0.2, max_s=2.0))
    assert waits[1:] == pytest.approx([0.2, 0.4, 0.8, 1.6, 2.0, 2.0])


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        pytest.param({}, "SHOAL_URL", id="no-url"),
        pytest.param({"SHOAL_URL": "ftp://127.0.0.1/"}, "http(s) URL", id="bad-scheme"),
        pytest.param(
            {"SHOAL_URL": "http://127.0.0.1:1", "PULL_IDLE_SECONDS": "0"},
            "PULL_IDLE_SECONDS",
            id="zero-idle",
        ),
    ],
)
def test_pull_worker_exits_2_on_bad_pull_config(env: dict[str, str], fragment: str) -> None:
    result = subprocess.run(
        [sys.executable, str(WORKER)],
        env={"PATH": os.environ.get("PATH", ""), "MODE": "pull", **env},
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == worker_mod.EXIT_BAD_CONFIG
    assert fragment in result.stderr.decode()
