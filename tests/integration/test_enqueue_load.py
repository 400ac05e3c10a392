"""10,000 enqueues from 200 concurrent clients through the HTTP API, on SQLite (issue 4).

``shoal up`` runs as a child process over its SQLite queue, with a pool capped at zero
replicas so that nothing is pushed: 16 pullers lease through ``POST /dequeue-task`` and
report through ``/tasks/{id}/result`` while the 200 clients are still enqueuing, so leases
and enqueues contend for the one writer. Every request must succeed (no "database is
locked" reaches a client or the log) and every task must be leased exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import aiohttp
import pytest

from tests.integration.shoal_harness import ShoalProcess

pytestmark = pytest.mark.timeout(240)

N_CLIENTS = 200
PER_CLIENT = 50
N_PULLERS = 16

MANIFEST = """
apiVersion: shoal/v1
kind: WorkerPool
metadata: {name: default}
spec:
  replicas: {min: 0, max: 0}
  delivery: {leaseTimeout: 300s, maxAttempts: 5}
"""


async def test_ten_thousand_enqueues_from_200_clients_no_errors_no_double_lease(
    tmp_path: Path,
) -> None:
    manifests = tmp_path / "pool.yaml"
    manifests.write_text(MANIFEST)
    # The process runtime: with max 0 replicas no worker is ever started, Docker or not.
    shoal = ShoalProcess(
        manifests=manifests,
        state_dir=tmp_path / "state",
        instance="enqueue-load",
        extra_args=("--runtime", "process"),
    )
    await asyncio.to_thread(shoal.start)
    total = N_CLIENTS * PER_CLIENT
    errors: collections.Counter[str] = collections.Counter()
    enqueued: list[str] = []
    leased: list[str] = []
    enqueuing_done = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=60)

    async def client(n: int) -> None:
        # One session per client: its own connection, as separate programs would have.
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for k in range(PER_CLIENT):
                body = {"payload": {"client": n, "k": k}}
                try:
                    async with session.post(f"{shoal.url}/enqueue-task", json=body) as response:
                        reply = await response.json(content_type=None)
                        if response.status != 202:
                            errors[f"enqueue {response.status}: {reply}"] += 1
                            continue
                        enqueued.append(reply["id"])
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors[f"enqueue {type(exc).__name__}"] += 1

    async def puller(n: int) -> None:
        worker = f"puller-{n}"
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(total * 4):  # bounded; ends far sooner
                if enqueuing_done.is_set() and len(leased) >= len(enqueued):
                    return
                try:
                    async with session.post(
                        f"{shoal.url}/dequeue-task", json={"worker": worker}
                    ) as response:
                        if response.status == 204:
                            await asyncio.sleep(0.01)
                            continue
                        task = await response.json(content_type=None)
                        if response.status != 200:
                            errors[f"dequeue {response.status}: {task}"] += 1
                            continue
                    leased.append(task["id"])
                    async with session.post(
                        f"{shoal.url}/tasks/{task['id']}/result",
                        json={"worker": worker, "result": {"ok": True}},
                    ) as response:
                        if response.status != 200:
                            errors[f"result {response.status}: {await response.text()}"] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors[f"pull {type(exc).__name__}"] += 1

    try:
        started = time.monotonic()
        pulling = [asyncio.create_task(puller(n)) for n in range(N_PULLERS)]
        await asyncio.gather(*(client(n) for n in range(N_CLIENTS)))
        enqueue_s = time.monotonic() - started
        enqueuing_done.set()
        await asyncio.wait_for(asyncio.gather(*pulling), 180)
        all_s = time.monotonic() - started
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{shoal.url}/metrics.json") as response,
        ):
            counts = (await response.json())["pools"]["default"]["tasks"]
    finally:
        await asyncio.to_thread(shoal.terminate)

    log = shoal.log_path.read_text(errors="replace")
    assert not errors, errors.most_common(5)
    assert "database is locked" not in log
    assert len(enqueued) == total and len(set(enqueued)) == total
    twice = [task_id for task_id, n in collections.Counter(leased).items() if n > 1]
    assert twice == [], f"{len(twice)} tasks leased more than once"
    assert sorted(leased) == sorted(enqueued)
    assert counts["succeeded"] == total and counts["queued"] == counts["running"] == 0, counts
    print(
        f"enqueue load: {total} enqueues from {N_CLIENTS} clients in {enqueue_s:.1f}s "
        f"({total / enqueue_s:.0f}/s through HTTP, with {N_PULLERS} pullers leasing alongside); "
        f"all leased once and acked in {all_s:.1f}s; errors 0; leased twice 0"
    )
