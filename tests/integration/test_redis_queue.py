"""Redis-only guarantees on a real redis-server: sharing between processes, lost readers.

The behaviour every backend shares is in ``tests/unit/test_queue_contract.py``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from controller.errors import QueueUnavailable
from controller.queues import EnqueueRequest, IdempotencyConflict, open_queue
from controller.queues.base import new_task_id
from controller.queues.redis import GROUP, RedisQueue
from tests.redis_server import _free_port, redis_server, redis_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.redis


@pytest.fixture
def prefix() -> str:
    return f"t{new_task_id()}"


@pytest.fixture
async def pair(redis_url: str, prefix: str) -> AsyncIterator[tuple[RedisQueue, RedisQueue]]:  # noqa: F811
    """Two queues on one Redis, as two Shoal processes would have."""
    first = await RedisQueue.open(redis_url, prefix=prefix)
    second = await RedisQueue.open(redis_url, prefix=prefix)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_redis_open_queue_from_url(redis_url: str, tmp_path: Path) -> None:  # noqa: F811
    queue = await open_queue(redis_url, state_dir=tmp_path)
    try:
        assert isinstance(queue, RedisQueue)
        task, created = await queue.enqueue(EnqueueRequest(pool="p", payload={"x": 1}))
        assert created and (await queue.get(task.id)) == task
    finally:
        await queue.close()


async def test_redis_two_processes_share_tasks_and_never_double_lease(
    pair: tuple[RedisQueue, RedisQueue],
) -> None:
    first, second = pair
    enqueued = await asyncio.gather(
        *(
            (first if n % 2 else second).enqueue(EnqueueRequest(pool="p", payload=n))
            for n in range(400)
        )
    )
    ids = {task.id for task, _ in enqueued}

    async def leaser(queue: RedisQueue, name: str) -> list[str]:
        got = []
        while (task := await queue.lease("p", worker=name, lease_s=60)) is not None:
            got.append(task.id)
            assert await queue.ack(task.id, worker=name, result=name)
        return got

    results = await asyncio.gather(
        *(leaser(first if n % 2 else second, f"w{n}") for n in range(20))
    )
    leased = [task_id for got in results for task_id in got]
    assert len(leased) == len(set(leased)) == 400
    assert set(leased) == ids
    counts = await second.counts("p")
    assert counts.succeeded == 400 and counts.queued == 0 and counts.running == 0


async def test_redis_idempotency_holds_across_processes(
    pair: tuple[RedisQueue, RedisQueue],
) -> None:
    first, second = pair
    results = await asyncio.gather(
        *(
            (first if n % 2 else second).enqueue(
                EnqueueRequest(pool="p", payload={"same": True}, idempotency_key="once")
            )
            for n in range(20)
        )
    )
    assert sum(created for _, created in results) == 1
    assert len({task.id for task, _ in results}) == 1
    assert (await first.counts("p")).queued == 1
    with pytest.raises(IdempotencyConflict):
        await second.enqueue(
            EnqueueRequest(pool="p", payload={"same": False}, idempotency_key="once")
        )
    assert (await first.counts("p")).queued == 1


async def test_redis_reads_a_task_stored_before_fingerprints(
    pair: tuple[RedisQueue, RedisQueue],
) -> None:
    """A record without the field (an older Shoal wrote it) matches any retry of its key."""
    first, _ = pair
    task, _ = await first.enqueue(EnqueueRequest(pool="p", payload=1, idempotency_key="old"))
    record = first._record(task.id)
    stored = json.loads(await first._r.hget(record, "task"))
    del stored["fingerprint"]
    await first._r.hset(record, "task", json.dumps(stored))
    again, created = await first.enqueue(EnqueueRequest(pool="p", payload=2, idempotency_key="old"))
    assert not created and again.id == task.id and again.fingerprint is None


async def test_redis_lease_keeps_payload_numbers_exact(
    pair: tuple[RedisQueue, RedisQueue],
) -> None:
    """The lease script never re-encodes the payload: big ints, floats and [] survive."""
    first, second = pair
    payload = {"big": 2**63 + 1, "f": 0.1 + 0.2, "empty": [], "obj": {}, "s": 'é\u2028"x'}
    task, _ = await first.enqueue(EnqueueRequest(pool="p", payload=payload))
    leased = await second.lease("p", worker='w"1\u00e9', lease_s=30)
    assert leased is not None and leased.payload == payload
    assert leased.worker == 'w"1\u00e9' and leased.history == ('w"1\u00e9',)
    assert await first.get(task.id) == leased
    assert await second.ack(task.id, worker='w"1\u00e9', result=[]) is True
    done = await first.get(task.id)
    assert done is not None and done.payload == payload and done.result == []


async def test_redis_leases_a_record_stored_before_the_lease_script(
    pair: tuple[RedisQueue, RedisQueue],
) -> None:
    """An older Shoal's record lacks the fields the script needs; it is leased all the same."""
    first, second = pair
    task, _ = await first.enqueue(EnqueueRequest(pool="p", payload=1))
    await first._r.hdel(first._record(task.id), "hist", "attempts", "started")
    leased = await second.lease("p", worker="w1", lease_s=10)
    assert leased is not None and leased.id == task.id and leased.attempts == 1
    assert await first.get(task.id) == leased
    fields = await first._r.hmget(first._record(task.id), ["hist", "attempts", "started"])
    assert fields == ['["w1"]', "1", repr(leased.started_at)], "the write brought them back"
    assert await second.release(task.id, worker="w1") is True
    again = await first.lease("p", worker="w2", lease_s=10)
    # The lease given back left no trace; the Lua lease appends to the rewritten record.
    assert again is not None and again.history == ("w2",) and again.attempts == 1


async def test_redis_prune_finds_tasks_finished_before_the_index_existed(
    redis_url: str,  # noqa: F811
    prefix: str,
) -> None:
    now = [1000.0]
    queue = await RedisQueue.open(redis_url, prefix=prefix, clock=lambda: now[0])
    try:
        old, _ = await queue.enqueue(EnqueueRequest(pool="p", payload=1, idempotency_key="k"))
        await queue.cancel(old.id)
        young, _ = await queue.enqueue(EnqueueRequest(pool="p", payload=2))
        await queue.cancel(young.id)
        # As an older Shoal left them: no P:finished index at all.
        await queue._r.delete(f"{prefix}:finished")
        now[0] += 100
        assert await queue.prune(retention_s=50) == 2
        assert await queue.get(old.id) is None and await queue.get(young.id) is None
        assert await queue._r.hlen(f"{prefix}:idem:p") == 0
        assert await queue._r.zcard(f"{prefix}:idx:all") == 0
        assert (await queue.counts("p")).cancelled == 0
    finally:
        await queue.close()


async def test_redis_lease_expired_in_one_process_is_reclaimed_by_another(
    redis_url: str,  # noqa: F811
    prefix: str,
) -> None:
    now = [1000.0]
    first = await RedisQueue.open(redis_url, prefix=prefix, clock=lambda: now[0])
    second = await RedisQueue.open(redis_url, prefix=prefix, clock=lambda: now[0])
    try:
        task, _ = await first.enqueue(EnqueueRequest(pool="p", payload=1))
        await first.lease("p", worker="w1", lease_s=10)
        now[0] += 11
        assert await second.reclaim_expired() == 1
        again = await second.lease("p", worker="w2", lease_s=10)
        assert again is not None and again.id == task.id and again.attempts == 2
        assert not await first.ack(task.id, worker="w1", result="late")
        assert await first.ack(task.id, worker="w2", result="ok")
    finally:
        await first.close()
        await second.close()


async def test_redis_entry_read_by_a_lost_process_is_requeued(
    redis_url: str,  # noqa: F811
    prefix: str,
) -> None:
    """A process died after XREADGROUP but before marking the task running."""
    queue = await RedisQueue.open(redis_url, prefix=prefix, orphan_idle_s=0.0)
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        task, _ = await queue.enqueue(EnqueueRequest(pool="p", payload=1))
        stream = f"{prefix}:stream:p"
        await raw.xgroup_create(stream, GROUP, id="0", mkstream=True)
        read = await raw.xreadgroup(GROUP, "dead-process", {stream: ">"}, count=1)
        assert read[0][1][0][1]["id"] == task.id
        assert await queue.lease("p", worker="w1", lease_s=10) is None

        await queue.reclaim_expired()
        leased = await queue.lease("p", worker="w1", lease_s=10)
        assert leased is not None and leased.id == task.id and leased.attempts == 1
        assert await queue.ack(task.id, worker="w1", result=None)
        pending = await raw.xpending(stream, GROUP)
        assert pending["pending"] == 0
    finally:
        await raw.aclose()
        await queue.close()


async def test_redis_orphan_behind_many_long_leases_is_found(
    redis_url: str,  # noqa: F811
    prefix: str,
) -> None:
    """The XAUTOCLAIM sweep walks on past 100 legitimately pending entries."""
    queue = await RedisQueue.open(redis_url, prefix=prefix, orphan_idle_s=0.0)
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for n in range(150):
            await queue.enqueue(EnqueueRequest(pool="p", payload=n))
            assert await queue.lease("p", worker=f"w{n}", lease_s=3600) is not None
        orphan, _ = await queue.enqueue(EnqueueRequest(pool="p", payload="orphan"))
        stream = f"{prefix}:stream:p"
        await raw.xreadgroup(GROUP, "dead-process", {stream: ">"}, count=1)

        leased = None
        for _ in range(3):
            assert await queue.reclaim_expired() == 0
            leased = await queue.lease("p", worker="late", lease_s=10)
            if leased is not None:
                break
        assert leased is not None and leased.id == orphan.id
        running = await queue.list(pool="p", state="running", limit=1000)
        assert len(running) == 151
    finally:
        await raw.aclose()
        await queue.close()


async def test_redis_stream_holds_no_entries_of_finished_tasks(
    redis_url: str,  # noqa: F811
    prefix: str,
) -> None:
    queue = await RedisQueue.open(redis_url, prefix=prefix)
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        tasks = [(await queue.enqueue(EnqueueRequest(pool="p", payload=n)))[0] for n in range(5)]
        await queue.cancel(tasks[4].id)
        for _ in range(4):
            leased = await queue.lease("p", worker="w", lease_s=10)
            assert leased is not None
            assert await queue.ack(leased.id, worker="w", result=None)
        assert await queue.lease("p", worker="w", lease_s=10) is None
        assert await raw.xlen(f"{prefix}:stream:p") == 0
        assert (await raw.xpending(f"{prefix}:stream:p", GROUP))["pending"] == 0
        assert await raw.zcard(f"{prefix}:leases") == 0
    finally:
        await raw.aclose()
        await queue.close()


async def test_redis_unreachable_server_raises_queue_unavailable() -> None:
    with pytest.raises(QueueUnavailable):
        await RedisQueue.open(f"redis://127.0.0.1:{_free_port()}/0")


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from controller.queues import EnqueueRequest
    from controller.queues.redis import RedisQueue

    async def main(url, prefix):
        queue = await RedisQueue.open(url, prefix=prefix)
        for n in range(300):
            await queue.enqueue(EnqueueRequest(pool="p", payload=n))
        await queue.close()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_redis_tasks_enqueued_by_another_os_process_are_leased_here(
    redis_url: str,  # noqa: F811
    prefix: str,
) -> None:
    queue = await RedisQueue.open(redis_url, prefix=prefix)
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", _CHILD, redis_url, prefix)
    try:
        leased: list[int] = []
        for _ in range(3000):
            task = await queue.lease("p", worker="w", lease_s=30)
            if task is None:
                if child.returncode is not None and len(leased) == 300:
                    break
                await asyncio.sleep(0.01)
                continue
            leased.append(task.payload)
            await queue.ack(task.id, worker="w", result=None)
        assert await child.wait() == 0
        assert sorted(leased) == list(range(300))
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await queue.close()


def test_redis_server_helper_stops_its_process(tmp_path: Path) -> None:
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    port = server.port
    server.stop()
    done = subprocess.run(
        ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True, check=False
    )
    assert "PONG" not in done.stdout
