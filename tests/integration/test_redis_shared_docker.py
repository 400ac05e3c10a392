"""Two Shoal processes share one Redis queue; one is SIGKILLed mid-load (issue 4).

Each ``shoal up`` runs under its own ``--instance`` and owns its Docker workers; both serve
the API and lease from the same streams in a real ``redis-server``. The producer spreads
enqueues over both and, once one is dead, sends everything to the survivor with the same
idempotency keys. The survivor reclaims the leases the dead process held when they expire
and finishes every task; none is lost and none is stored twice.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import docker
import pytest
import redis

from controller.queues.base import EnqueueRequest
from controller.queues.redis import RedisQueue
from tests.integration.shoal_harness import ShoalProcess
from tests.integration.test_lease_docker import delivery_manifest
from tests.integration.test_restart_docker import (
    ContainerPeak,
    Producer,
    task_counts,
    tasks_of,
    unfinished,
    wait_until,
)
from tests.redis_server import RedisServer, redis_server  # noqa: F401  (fixture)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]

# A database of its own on the session's server, emptied first: other tests use db 0.
REDIS_DB = 5


@pytest.mark.docker
async def test_two_shoals_on_one_redis_survivor_finishes_everything_after_a_sigkill(
    tmp_path: Path,
    docker_client: docker.DockerClient,
    worker_image: str,
    instance_label: str,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    queue_url = f"redis://127.0.0.1:{redis_server.port}/{REDIS_DB}"
    redis.Redis.from_url(queue_url).flushdb()
    manifests = tmp_path / "pool.yaml"
    manifests.write_text(
        delivery_manifest(
            min_replicas=0,
            max_replicas=3,
            concurrency=2,
            lease_timeout="3s",
            min_interval="200ms",
            backlog_per_replica=2,
        )
    )
    survivor_instance = f"{instance_label}-b"
    doomed = ShoalProcess(
        manifests=manifests, state_dir=tmp_path / "a", instance=instance_label, queue=queue_url
    )
    survivor = ShoalProcess(
        manifests=manifests, state_dir=tmp_path / "b", instance=survivor_instance, queue=queue_url
    )
    producer = Producer(
        urls=[doomed.url, survivor.url], n_tasks=150, rate_per_s=12, work_s=1.0, key_prefix="rs"
    )
    peak = ContainerPeak(docker_client, [instance_label, survivor_instance])
    t0 = time.monotonic()
    try:
        with peak.sampling():
            await asyncio.gather(asyncio.to_thread(doomed.start), asyncio.to_thread(survivor.start))
            sending = asyncio.create_task(producer.run())

            async def both_busy() -> bool:
                counts = await task_counts(survivor.url)
                workers = (await _metrics(doomed.url))["activeTasks"]
                return counts["succeeded"] >= 10 and workers >= 2

            await wait_until(both_busy, timeout_s=60, what="both processes running tasks")
            doomed_workers = {
                c.name
                for c in docker_client.containers.list(
                    filters={"label": f"shoal.instance={instance_label}"}
                )
            }
            await asyncio.to_thread(doomed.kill)
            killed_at = time.time()
            at_kill = await task_counts(survivor.url)
            await sending

            async def all_done() -> bool:
                counts = await task_counts(survivor.url)
                assert counts["failed"] == 0 and counts["dead"] == 0, counts
                return counts["succeeded"] >= producer.n_tasks

            await wait_until(
                all_done,
                timeout_s=120,
                what="the survivor to finish everything",
                explain=lambda: unfinished(survivor.url, survivor),
            )
            tasks = await tasks_of(survivor.url)
    finally:
        if survivor.process is not None and survivor.process.poll() is None:
            await asyncio.to_thread(survivor.terminate)
        # The doomed process's workers go with instance_label; the survivor's are ours here.
        for container in docker_client.containers.list(
            all=True, filters={"label": f"shoal.instance={survivor_instance}"}
        ):
            container.remove(force=True)

    assert len(producer.ids) == producer.n_tasks
    assert len(tasks) == producer.n_tasks, "a task was lost or enqueued twice"
    assert {t["id"] for t in tasks} == set(producer.ids.values())
    assert all(t["state"] == "succeeded" for t in tasks)
    by_doomed = [t for t in tasks if t["workers"][-1] in doomed_workers]
    by_survivor = [t for t in tasks if t["workers"][-1] not in doomed_workers]
    # After the kill only the survivor could record a result.
    assert all(t["finishedAt"] <= killed_at + 0.5 for t in by_doomed), "dead process acked"
    assert by_doomed and by_survivor
    taken_over = [t for t in by_survivor if set(t["workers"][:-1]) & doomed_workers]
    reran = [t for t in tasks if t["attempts"] > 1]
    assert taken_over, "the dead process held leases; the survivor must have run them again"
    # Both pools stayed within their bounds: 3 workers each.
    assert peak.peak <= 6, peak.peak
    print(
        f"redis shared: {producer.n_tasks} tasks succeeded in {time.monotonic() - t0:.1f}s; "
        f"at the SIGKILL {at_kill['succeeded']} done, {at_kill['running']} running, "
        f"{at_kill['queued']} queued; finished by the killed process {len(by_doomed)}, by the "
        f"survivor {len(by_survivor)} (taken over from the dead one: {len(taken_over)}); "
        f"ran again: {len(reran)}; enqueue retries {producer.retries}; peak containers "
        f"{peak.peak}"
    )


async def _metrics(url: str) -> dict[str, int]:
    from tests.integration.test_restart_docker import get_json

    metrics: dict[str, int] = await get_json(f"{url}/metrics.json")
    return metrics


async def test_redis_queue_call_honours_a_cancel_that_lands_as_the_command_completes(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """The dispatcher's lease keeper is cancelled mid-``extend``; it must stop, every time.

    redis-py writes commands under ``asyncio.wait_for``, which on Python 3.11 can swallow a
    cancel that arrives as the inner call finishes. A keeper that swallowed it kept its
    delivery, and the worker's slot, forever: the shared-queue test above stalled on it.
    """
    queue = await RedisQueue.open(
        f"redis://127.0.0.1:{redis_server.port}/{REDIS_DB + 1}", prefix="cancel-test"
    )
    rng = random.Random(3)
    try:
        task, _ = await queue.enqueue(EnqueueRequest(pool="p", payload=None))
        leased = await queue.lease("p", worker="w", lease_s=60)
        assert leased is not None and leased.id == task.id

        async def keeper() -> None:
            for _ in range(100_000):
                await queue.extend(task.id, worker="w", lease_s=60)

        stuck = 0
        for _ in range(100):
            running = asyncio.create_task(keeper())
            await asyncio.sleep(rng.random() * 0.003)
            running.cancel()
            done, _ = await asyncio.wait([running], timeout=1.0)
            if not done:
                stuck += 1
                # Repeated cancels until it ends, so the next round starts clean.
                for _ in range(50):
                    running.cancel()
                    done, _ = await asyncio.wait([running], timeout=0.1)
                    if done:
                        break
            assert running.done() and running.cancelled()
        assert stuck == 0, f"{stuck} of 100 cancels were swallowed"
    finally:
        await queue.close()
