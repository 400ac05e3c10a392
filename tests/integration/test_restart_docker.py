"""The controller SIGKILLed mid-load and restarted: every task ends succeeded (issue 4).

``shoal up`` runs as a child process over the SQLite queue in its state folder, with real
Docker workers. A producer keeps enqueuing with idempotency keys and retries the same key
while the API is down, so a request cut by the kill is neither lost nor doubled. The
controller is killed with SIGKILL while tasks are queued and running, then started again
on the same state folder, port and instance: it adopts the workers still running, reclaims
the leases the dead process held, and finishes everything. ``Producer`` and ``ContainerPeak``
are shared with the Redis test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest

from tests.integration.shoal_harness import ShoalProcess
from tests.integration.test_lease_docker import delivery_manifest

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]


@dataclass
class Producer:
    """Sends ``n_tasks`` at ``rate_per_s`` spread over ``urls``, each under its own key.

    A refused connection or a cut request is retried with the same idempotency key (on
    the next URL) until ``give_up_s`` after the start, so the queue holds each task once.
    """

    urls: list[str]
    n_tasks: int
    rate_per_s: float
    work_s: float
    key_prefix: str
    give_up_s: float = 60.0
    ids: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    answers: dict[int, int] = field(default_factory=dict)

    async def run(self) -> None:
        started = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            sends = []
            for n in range(self.n_tasks):
                await asyncio.sleep(max(0.0, started + n / self.rate_per_s - time.monotonic()))
                sends.append(asyncio.create_task(self._send(session, n, started)))
            await asyncio.gather(*sends)

    async def _send(self, session: aiohttp.ClientSession, n: int, started: float) -> None:
        key = f"{self.key_prefix}-{n}"
        body = {"payload": {"n": n}, "work_seconds": self.work_s, "idempotency_key": key}
        for attempt in range(10_000):
            url = self.urls[(n + attempt) % len(self.urls)]
            try:
                async with session.post(f"{url}/enqueue-task", json=body) as response:
                    self.answers[response.status] = self.answers.get(response.status, 0) + 1
                    if response.status in (200, 202):
                        self.ids[key] = (await response.json())["id"]
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() - started > self.give_up_s:
                raise AssertionError(f"task {key} was never accepted")
            self.retries += 1
            await asyncio.sleep(0.2)


class ContainerPeak:
    """Samples how many containers of the given instances run at once, in a thread."""

    def __init__(self, client: docker.DockerClient, instances: list[str]) -> None:
        self._client = client
        self._filters = [{"label": f"shoal.instance={i}"} for i in instances]
        self.peak = 0
        self._stop = False

    def _sample(self) -> None:
        for _ in range(3000):  # bounded: 3000 samples at most
            if self._stop:
                return
            running = sum(len(self._client.containers.list(filters=f)) for f in self._filters)
            self.peak = max(self.peak, running)
            time.sleep(0.1)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        import threading

        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop = True
            thread.join(timeout=10)


async def get_json(url: str) -> Any:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url) as response,
    ):
        return await response.json()


async def task_counts(url: str) -> dict[str, int]:
    metrics = await get_json(f"{url}/metrics.json")
    counts: dict[str, int] = metrics["pools"]["default"]["tasks"]
    return counts


async def tasks_of(url: str) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    after = ""
    for _ in range(100):
        page = await get_json(f"{url}/tasks?limit=1000{after}")
        tasks.extend(page["items"])
        if "next" not in page:
            return tasks
        after = f"&after={page['next']}"
    raise AssertionError("more pages than tasks")


async def wait_until(predicate: Any, *, timeout_s: float, what: str, explain: Any = None) -> None:
    """Polls ``predicate``; on timeout the message carries what ``explain()`` returns."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            detail = await explain() if explain is not None else ""
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; {detail}")
        await asyncio.sleep(0.25)


async def unfinished(url: str, process: ShoalProcess) -> str:
    """The tasks not yet succeeded and the tail of the process log, for a failure message."""
    left = [t for t in await tasks_of(url) if t["state"] != "succeeded"]
    return f"{len(left)} not succeeded, e.g. {left[:3]}; log: {process.log()[-2000:]}"


async def test_controller_sigkilled_mid_load_and_restarted_finishes_every_task(
    tmp_path: Path, docker_client: docker.DockerClient, worker_image: str, instance_label: str
) -> None:
    manifests = tmp_path / "pool.yaml"
    manifests.write_text(
        delivery_manifest(
            min_replicas=0,
            max_replicas=4,
            concurrency=2,
            lease_timeout="3s",
            min_interval="200ms",
            backlog_per_replica=2,
        )
    )
    state_dir = tmp_path / "state"
    first = ShoalProcess(manifests=manifests, state_dir=state_dir, instance=instance_label)
    second = ShoalProcess(
        manifests=manifests, state_dir=state_dir, instance=instance_label, port=first.port
    )
    producer = Producer(
        urls=[first.url], n_tasks=150, rate_per_s=12, work_s=1.0, key_prefix="restart"
    )
    peak = ContainerPeak(docker_client, [instance_label])
    t0 = time.monotonic()
    try:
        with peak.sampling():
            await asyncio.to_thread(first.start)
            sending = asyncio.create_task(producer.run())

            async def busy() -> bool:
                counts = await task_counts(first.url)
                return counts["succeeded"] >= 10 and counts["running"] >= 2

            await wait_until(busy, timeout_s=60, what="tasks running and done")
            at_kill = await task_counts(first.url)
            await asyncio.to_thread(first.kill)
            killed_at = time.monotonic()
            await asyncio.sleep(1.0)
            await asyncio.to_thread(second.start)
            down_s = time.monotonic() - killed_at
            await sending

            async def all_done() -> bool:
                counts = await task_counts(second.url)
                assert counts["failed"] == 0 and counts["dead"] == 0, counts
                return counts["succeeded"] >= producer.n_tasks

            await wait_until(
                all_done,
                timeout_s=120,
                what="every task to succeed",
                explain=lambda: unfinished(second.url, second),
            )
            tasks = await tasks_of(second.url)
    finally:
        for process in (first, second):
            if process.process is not None and process.process.poll() is None:
                await asyncio.to_thread(process.terminate)

    assert len(producer.ids) == producer.n_tasks
    assert len(tasks) == producer.n_tasks, "a task was lost or enqueued twice"
    assert {t["id"] for t in tasks} == set(producer.ids.values())
    assert all(t["state"] == "succeeded" for t in tasks)
    reran = [t for t in tasks if t["attempts"] > 1]
    # The tasks running at the kill had their leases reclaimed and ran again.
    assert len(reran) >= at_kill["running"] - 2, (at_kill, len(reran))
    # The new process adopted the old one's workers instead of starting a second pool.
    assert peak.peak <= 4, peak.peak
    print(
        f"restart: {producer.n_tasks} tasks succeeded in {time.monotonic() - t0:.1f}s; "
        f"at the SIGKILL {at_kill['succeeded']} done, {at_kill['running']} running, "
        f"{at_kill['queued']} queued; API down {down_s:.1f}s, {producer.retries} enqueue "
        f"retries, answers {producer.answers}; ran again: {len(reran)}; "
        f"peak containers {peak.peak}"
    )
