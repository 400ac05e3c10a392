"""The one queue contract suite, run against every backend (memory, sqlite, redis).

Time is a fake clock handed to the backend, so nothing here sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.queues import EnqueueRequest, QueueCounts, RetryPolicy, TaskQueue, open_queue
from controller.queues.base import IdempotencyConflict, backoff_delay_s, new_task_id
from controller.queues.memory import MemoryQueue
from controller.queues.retention import RetentionJob, parse_duration_s
from controller.queues.sqlite import SqliteQueue
from tests.redis_server import redis_server, redis_url  # noqa: F401  (fixtures)

NO_JITTER = RetryPolicy(max_attempts=3, backoff_initial_s=1.0, backoff_max_s=5.0, jitter=False)


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(
    params=[
        pytest.param("memory", id="memory"),
        pytest.param("sqlite", id="sqlite"),
        pytest.param("redis", id="redis", marks=pytest.mark.redis),
    ]
)
async def queue(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[TaskQueue]:
    q: TaskQueue
    if request.param == "memory":
        q = MemoryQueue(clock=clock)
    elif request.param == "sqlite":
        q = await SqliteQueue.open(tmp_path / "queue.db", clock=clock)
    else:
        from controller.queues.redis import RedisQueue

        server = request.getfixturevalue("redis_url")
        q = await RedisQueue.open(server, clock=clock, prefix=f"t{new_task_id()}")
    try:
        yield q
    finally:
        await q.close()


def req(pool: str = "default", payload: object = None, **kwargs: object) -> EnqueueRequest:
    return EnqueueRequest(pool=pool, payload=payload, **kwargs)  # type: ignore[arg-type]


async def test_enqueue_stores_a_queued_task(queue: TaskQueue, clock: FakeClock) -> None:
    task, created = await queue.enqueue(
        req(payload={"n": 1, "s": "é"}, work_seconds=0.5, max_attempts=4, traceparent="00-ab")
    )
    assert created is True
    assert task.state == "queued"
    assert task.attempts == 0
    assert task.max_attempts == 4
    assert task.created_at == clock.now
    stored = await queue.get(task.id)
    assert stored == task
    assert stored is not None and stored.payload == {"n": 1, "s": "é"}
    assert stored.traceparent == "00-ab"
    assert stored.work_seconds == 0.5


async def test_get_unknown_task_returns_none(queue: TaskQueue) -> None:
    assert await queue.get("0" * 24) is None


async def test_enqueue_same_idempotency_key_returns_first_task(queue: TaskQueue) -> None:
    first, created = await queue.enqueue(req(payload=1, idempotency_key="k1"))
    again, created_again = await queue.enqueue(req(payload=1, idempotency_key="k1"))
    other_pool, created_other = await queue.enqueue(
        req(pool="other", payload=3, idempotency_key="k1")
    )
    assert created and not created_again and created_other
    assert again.id == first.id and again.payload == 1
    assert other_pool.id != first.id
    assert len(await queue.list(pool="default")) == 1


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param({"payload": {"n": 2}}, id="payload"),
        pytest.param({"work_seconds": 3.0}, id="work-seconds"),
        pytest.param({"max_attempts": 2}, id="max-attempts"),
    ],
)
async def test_enqueue_same_key_with_different_request_is_refused(
    queue: TaskQueue, changed: dict[str, object]
) -> None:
    fields: dict[str, object] = {"payload": {"n": 1}, "work_seconds": 1.0, "max_attempts": 5}
    first, _ = await queue.enqueue(req(idempotency_key="k1", **fields))
    with pytest.raises(IdempotencyConflict) as refused:
        await queue.enqueue(req(idempotency_key="k1", **{**fields, **changed}))
    assert refused.value.idempotency_key == "k1"
    assert refused.value.task_id == first.id
    assert "k1" in str(refused.value)
    assert [t.id for t in await queue.list()] == [first.id]
    assert await queue.counts("default") == QueueCounts(queued=1, ready=1)


async def test_enqueue_same_request_matches_whatever_the_key_order(queue: TaskQueue) -> None:
    """The fingerprint is of canonical JSON: key order and the traceparent do not count."""
    first, _ = await queue.enqueue(
        req(payload={"a": 1, "b": [1, "é"]}, idempotency_key="k", traceparent="00-one")
    )
    again, created = await queue.enqueue(
        req(payload={"b": [1, "é"], "a": 1}, idempotency_key="k", traceparent="00-two")
    )
    assert not created and again.id == first.id


async def test_enqueue_same_key_refused_even_after_the_task_finished(queue: TaskQueue) -> None:
    first, _ = await queue.enqueue(req(payload=1, idempotency_key="k"))
    await queue.lease("default", worker="w", lease_s=10)
    await queue.ack(first.id, worker="w", result=None)
    with pytest.raises(IdempotencyConflict):
        await queue.enqueue(req(payload=2, idempotency_key="k"))
    again, created = await queue.enqueue(req(payload=1, idempotency_key="k"))
    assert not created and again.state == "succeeded"


async def test_enqueue_idempotent_after_task_progressed(queue: TaskQueue) -> None:
    first, _ = await queue.enqueue(req(idempotency_key="k"))
    await queue.lease("default", worker="w1", lease_s=10)
    again, created = await queue.enqueue(req(idempotency_key="k"))
    assert not created
    assert again.id == first.id and again.state == "running"


async def test_lease_is_fifo_per_pool(queue: TaskQueue) -> None:
    ids = [(await queue.enqueue(req(payload=i)))[0].id for i in range(5)]
    other, _ = await queue.enqueue(req(pool="other"))
    leased = [await queue.lease("default", worker="w", lease_s=30) for _ in range(5)]
    assert [t.id for t in leased if t] == ids
    assert await queue.lease("default", worker="w", lease_s=30) is None
    from_other = await queue.lease("other", worker="w", lease_s=30)
    assert from_other is not None and from_other.id == other.id


async def test_lease_of_empty_or_unknown_pool_returns_none(queue: TaskQueue) -> None:
    assert await queue.lease("nobody", worker="w", lease_s=30) is None


async def test_lease_records_worker_attempt_and_expiry(queue: TaskQueue, clock: FakeClock) -> None:
    await queue.enqueue(req())
    task = await queue.lease("default", worker="w1", lease_s=30)
    assert task is not None
    assert task.state == "running"
    assert task.attempts == 1
    assert task.worker == "w1"
    assert task.started_at == clock.now
    assert task.lease_expires_at == clock.now + 30
    assert task.history == ("w1",)
    assert await queue.get(task.id) == task


async def test_ack_by_holder_succeeds(queue: TaskQueue, clock: FakeClock) -> None:
    task, _ = await queue.enqueue(req())
    await queue.lease("default", worker="w1", lease_s=30)
    clock.advance(2)
    assert await queue.ack(task.id, worker="w1", result={"ok": True}) is True
    done = await queue.get(task.id)
    assert done is not None
    assert done.state == "succeeded"
    assert done.result == {"ok": True}
    assert done.finished_at == clock.now
    assert done.lease_expires_at is None
    assert await queue.ack(task.id, worker="w1", result=None) is False


async def test_ack_by_other_worker_changes_nothing(queue: TaskQueue) -> None:
    task, _ = await queue.enqueue(req())
    leased = await queue.lease("default", worker="w1", lease_s=30)
    assert await queue.ack(task.id, worker="w2", result="x") is False
    assert await queue.fail(task.id, worker="w2", error="e", retry=None) is None
    assert await queue.extend(task.id, worker="w2", lease_s=99) is False
    assert await queue.release(task.id, worker="w2") is False
    assert await queue.get(task.id) == leased


async def test_ack_of_queued_or_unknown_task_is_refused(queue: TaskQueue) -> None:
    task, _ = await queue.enqueue(req())
    assert await queue.ack(task.id, worker="w1", result=1) is False
    assert await queue.ack("f" * 24, worker="w1", result=1) is False
    assert await queue.fail("f" * 24, worker="w1", error="e", retry=None) is None
    assert (await queue.get(task.id)) == task


async def test_late_ack_after_reclaim_and_release_does_not_overwrite(
    queue: TaskQueue, clock: FakeClock
) -> None:
    task, _ = await queue.enqueue(req())
    await queue.lease("default", worker="w1", lease_s=10)
    clock.advance(11)
    assert await queue.reclaim_expired() == 1
    second = await queue.lease("default", worker="w2", lease_s=10)
    assert second is not None and second.id == task.id and second.attempts == 2
    assert await queue.ack(task.id, worker="w1", result="late") is False
    assert await queue.ack(task.id, worker="w2", result="mine") is True
    done = await queue.get(task.id)
    assert done is not None and done.result == "mine" and done.worker == "w2"
    assert done.history == ("w1", "w2")


async def test_extend_pushes_lease_out(queue: TaskQueue, clock: FakeClock) -> None:
    task, _ = await queue.enqueue(req())
    await queue.lease("default", worker="w1", lease_s=10)
    clock.advance(8)
    assert await queue.extend(task.id, worker="w1", lease_s=10) is True
    clock.advance(8)
    assert await queue.reclaim_expired() == 0
    held = await queue.get(task.id)
    assert held is not None and held.state == "running"
    assert held.lease_expires_at == clock.now + 2


async def test_fail_retries_after_exponential_backoff(queue: TaskQueue, clock: FakeClock) -> None:
    task, _ = await queue.enqueue(req(max_attempts=3))
    await queue.lease("default", worker="w1", lease_s=30)
    failed = await queue.fail(task.id, worker="w1", error="boom", retry=NO_JITTER)
    assert failed is not None
    assert failed.state == "queued" and failed.error == "boom"
    assert failed.not_before == clock.now + 1.0
    assert failed.attempts == 1

    # Not leasable during the back-off.
    assert await queue.lease("default", worker="w2", lease_s=30) is None
    assert (await queue.counts("default")).ready == 0
    clock.advance(1.0)
    again = await queue.lease("default", worker="w2", lease_s=30)
    assert again is not None and again.id == task.id and again.attempts == 2

    failed = await queue.fail(task.id, worker="w2", error="boom", retry=NO_JITTER)
    assert failed is not None and failed.not_before == clock.now + 2.0


async def test_lease_skips_backing_off_task_for_younger_ready_one(
    queue: TaskQueue, clock: FakeClock
) -> None:
    old, _ = await queue.enqueue(req(payload="old"))
    young, _ = await queue.enqueue(req(payload="young"))
    await queue.lease("default", worker="w1", lease_s=30)
    await queue.fail(old.id, worker="w1", error="e", retry=NO_JITTER)
    leased = await queue.lease("default", worker="w2", lease_s=30)
    assert leased is not None and leased.id == young.id


async def test_fail_after_last_attempt_dead_letters(queue: TaskQueue, clock: FakeClock) -> None:
    task, _ = await queue.enqueue(req(max_attempts=2))
    for worker in ("w1", "w2"):
        clock.advance(10)
        assert await queue.lease("default", worker=worker, lease_s=30) is not None
        result = await queue.fail(task.id, worker=worker, error=f"by {worker}", retry=NO_JITTER)
    assert result is not None
    assert result.state == "dead" and result.error == "by w2" and result.finished_at == clock.now
    dead = await queue.list(state="dead")
    assert [t.id for t in dead] == [task.id]
    clock.advance(100)
    assert await queue.lease("default", worker="w3", lease_s=30) is None


async def test_fail_permanent_marks_failed(queue: TaskQueue) -> None:
    task, _ = await queue.enqueue(req(max_attempts=5))
    await queue.lease("default", worker="w1", lease_s=30)
    result = await queue.fail(task.id, worker="w1", error="bad input", retry=None, permanent=True)
    assert result is not None and result.state == "failed" and result.attempts == 1
    assert (await queue.counts("default")).failed == 1


async def test_redrive_requeues_dead_and_failed_with_fresh_attempts(queue: TaskQueue) -> None:
    dead, _ = await queue.enqueue(req(payload="dead", max_attempts=1))
    bad, _ = await queue.enqueue(req(payload="bad"))
    await queue.lease("default", worker="w", lease_s=30)
    await queue.lease("default", worker="w", lease_s=30)
    await queue.fail(dead.id, worker="w", error="e", retry=NO_JITTER)
    await queue.fail(bad.id, worker="w", error="e", retry=NO_JITTER, permanent=True)
    for task_id in (dead.id, bad.id):
        again = await queue.redrive(task_id)
        assert again is not None and again.state == "queued" and again.attempts == 0
        assert again.finished_at is None
        assert (again.worker, again.error) == (None, None), "a fresh start shows no stale run"
        assert again.history == ("w",)
    leased = [await queue.lease("default", worker="w", lease_s=30) for _ in range(2)]
    assert {t.id for t in leased if t} == {dead.id, bad.id}


async def test_redrive_of_live_task_changes_nothing(queue: TaskQueue) -> None:
    task, _ = await queue.enqueue(req())
    assert await queue.redrive(task.id) == task
    assert await queue.redrive("0" * 24) is None


async def test_release_returns_task_without_spending_attempt(queue: TaskQueue) -> None:
    task, _ = await queue.enqueue(req(max_attempts=1))
    await queue.lease("default", worker="w1", lease_s=30)
    assert await queue.release(task.id, worker="w1") is True
    back = await queue.get(task.id)
    assert back is not None and back.state == "queued" and back.attempts == 0
    assert back.history == (), "a lease given back unread leaves no trace"
    again = await queue.lease("default", worker="w2", lease_s=30)
    assert again is not None and again.id == task.id and again.attempts == 1
    assert again.history == ("w2",)


async def test_reclaim_expired_requeues_and_spends_attempt(
    queue: TaskQueue, clock: FakeClock
) -> None:
    task, _ = await queue.enqueue(req(max_attempts=3))
    other, _ = await queue.enqueue(req())
    await queue.lease("default", worker="w1", lease_s=10)
    await queue.lease("default", worker="w2", lease_s=60)
    clock.advance(10)
    assert await queue.reclaim_expired() == 1
    back = await queue.get(task.id)
    assert back is not None and back.state == "queued" and back.attempts == 1
    assert back.error is not None and "w1" in back.error
    still = await queue.get(other.id)
    assert still is not None and still.state == "running"


async def test_reclaim_expired_dead_letters_last_attempt(
    queue: TaskQueue, clock: FakeClock
) -> None:
    task, _ = await queue.enqueue(req(max_attempts=1))
    await queue.lease("default", worker="w1", lease_s=10)
    assert await queue.reclaim_expired(now=clock.now + 10) == 1
    gone = await queue.get(task.id)
    assert gone is not None and gone.state == "dead"
    assert await queue.reclaim_expired(now=clock.now + 100) == 0


async def test_counts_track_every_state(queue: TaskQueue, clock: FakeClock) -> None:
    tasks = [(await queue.enqueue(req(payload=i, max_attempts=1)))[0] for i in range(7)]
    await queue.enqueue(req(pool="other"))
    leased = [await queue.lease("default", worker="w", lease_s=30) for _ in range(5)]
    assert all(leased)
    await queue.ack(tasks[0].id, worker="w", result=None)
    await queue.fail(tasks[1].id, worker="w", error="e", retry=None, permanent=True)
    await queue.fail(tasks[2].id, worker="w", error="e", retry=None)
    await queue.cancel(tasks[5].id)
    assert await queue.counts("default") == QueueCounts(
        queued=1, ready=1, running=2, succeeded=1, failed=1, dead=1, cancelled=1
    )
    assert (await queue.counts("other")).queued == 1
    assert await queue.counts("nobody") == QueueCounts()


async def test_counts_ready_excludes_backoff_until_due(queue: TaskQueue, clock: FakeClock) -> None:
    task, _ = await queue.enqueue(req())
    await queue.enqueue(req())
    await queue.lease("default", worker="w", lease_s=30)
    await queue.fail(task.id, worker="w", error="e", retry=NO_JITTER)
    assert await queue.counts("default") == QueueCounts(queued=2, ready=1)
    clock.advance(1.0)
    assert await queue.counts("default") == QueueCounts(queued=2, ready=2)


async def test_list_paginates_in_creation_order(queue: TaskQueue) -> None:
    ids = [(await queue.enqueue(req(payload=i)))[0].id for i in range(7)]
    pages: list[list[str]] = []
    after: str | None = None
    while True:
        page = await queue.list(limit=3, after=after)
        if not page:
            break
        pages.append([t.id for t in page])
        after = page[-1].id
    assert pages == [ids[0:3], ids[3:6], ids[6:7]]


async def test_list_filters_by_pool_and_state(queue: TaskQueue) -> None:
    a1, _ = await queue.enqueue(req(pool="a"))
    b1, _ = await queue.enqueue(req(pool="b"))
    a2, _ = await queue.enqueue(req(pool="a"))
    await queue.lease("a", worker="w", lease_s=30)
    assert [t.id for t in await queue.list(pool="a")] == [a1.id, a2.id]
    assert [t.id for t in await queue.list(state="queued")] == [b1.id, a2.id]
    assert [t.id for t in await queue.list(pool="a", state="running")] == [a1.id]
    assert [t.id for t in await queue.list(pool="a", state="queued", after=a1.id)] == [a2.id]
    assert await queue.list(pool="b", state="dead") == []


async def test_cancel_only_touches_queued_tasks(queue: TaskQueue) -> None:
    queued, _ = await queue.enqueue(req())
    running, _ = await queue.enqueue(req())
    await queue.lease("default", worker="w", lease_s=30)  # takes ``queued``, the older one
    first = await queue.get(queued.id)
    assert first is not None and first.state == "running"
    unchanged = await queue.cancel(queued.id)
    assert unchanged == first
    gone = await queue.cancel(running.id)
    assert gone is not None and gone.state == "cancelled" and gone.finished_at is not None
    assert await queue.lease("default", worker="w", lease_s=30) is None
    assert await queue.cancel("0" * 24) is None


async def test_concurrent_leases_hand_each_task_out_once(queue: TaskQueue) -> None:
    ids = {(await queue.enqueue(req(payload=i)))[0].id for i in range(60)}

    async def leaser(name: str) -> list[str]:
        got: list[str] = []
        while (task := await queue.lease("default", worker=name, lease_s=30)) is not None:
            got.append(task.id)
            assert await queue.ack(task.id, worker=name, result=None)
        return got

    results = await asyncio.gather(*(leaser(f"w{i}") for i in range(8)))
    leased = [task_id for got in results for task_id in got]
    assert len(leased) == len(ids)
    assert set(leased) == ids


async def _one_of_each_state(queue: TaskQueue) -> dict[str, str]:
    """One task in every final state, one running, one queued and one backing off.

    Each has the idempotency key ``k-<name>``; returns name -> id.
    """
    names = ("succeeded", "failed", "dead", "cancelled", "running", "queued", "retried")
    ids = {}
    for name in names:
        task, _ = await queue.enqueue(
            req(
                payload=name,
                max_attempts=3 if name == "retried" else 1,
                idempotency_key=f"k-{name}",
            )
        )
        ids[name] = task.id
    await queue.cancel(ids["cancelled"])
    for _ in range(6):
        assert await queue.lease("default", worker="w", lease_s=10_000) is not None
    await queue.ack(ids["succeeded"], worker="w", result=1)
    await queue.fail(ids["failed"], worker="w", error="e", retry=None, permanent=True)
    await queue.fail(ids["dead"], worker="w", error="e", retry=None)
    await queue.release(ids["queued"], worker="w")
    await queue.fail(ids["retried"], worker="w", error="e", retry=NO_JITTER)
    return ids


async def test_prune_deletes_only_final_tasks_past_retention(
    queue: TaskQueue, clock: FakeClock
) -> None:
    ids = await _one_of_each_state(queue)
    clock.advance(100)
    assert await queue.prune(retention_s=101) == 0, "nothing is old enough yet"
    fresh, _ = await queue.enqueue(req(payload="fresh"))
    await queue.lease("default", worker="w2", lease_s=10_000)  # an older queued task
    clock.advance(50)

    pruned = await queue.prune(retention_s=100)

    assert pruned == 4
    left = {t.id for t in await queue.list(limit=1000)}
    gone = {ids[s] for s in ("succeeded", "failed", "dead", "cancelled")}
    assert not left & gone
    assert left == set(ids.values()) - gone | {fresh.id}
    for task_id in gone:
        assert await queue.get(task_id) is None
    counts = await queue.counts("default")
    assert (counts.succeeded, counts.failed, counts.dead, counts.cancelled) == (0, 0, 0, 0)
    assert (counts.queued, counts.running) == (2, 2)
    assert await queue.list(state="succeeded") == []


async def test_prune_frees_the_idempotency_key_of_a_pruned_task(
    queue: TaskQueue, clock: FakeClock
) -> None:
    ids = await _one_of_each_state(queue)
    clock.advance(10)
    assert await queue.prune(retention_s=5) == 4
    again, created = await queue.enqueue(req(payload="other", idempotency_key="k-succeeded"))
    assert created and again.id != ids["succeeded"]
    still, created = await queue.enqueue(
        req(payload="running", max_attempts=1, idempotency_key="k-running")
    )
    assert not created and still.id == ids["running"]
    still, created = await queue.enqueue(
        req(payload="retried", max_attempts=3, idempotency_key="k-retried")
    )
    assert not created and still.id == ids["retried"]


async def test_prune_works_in_batches_oldest_first(queue: TaskQueue, clock: FakeClock) -> None:
    ids = []
    for n in range(7):
        task, _ = await queue.enqueue(req(payload=n))
        await queue.cancel(task.id)
        ids.append(task.id)
        clock.advance(1)
    clock.advance(100)
    assert await queue.prune(retention_s=50, limit=3) == 3
    assert [t.id for t in await queue.list()] == ids[3:]
    assert await queue.prune(retention_s=50, limit=3) == 3
    assert await queue.prune(retention_s=50, limit=3) == 1
    assert await queue.prune(retention_s=50, limit=3) == 0
    assert await queue.counts("default") == QueueCounts()


async def test_prune_keeps_a_redriven_task_until_it_finishes_again(
    queue: TaskQueue, clock: FakeClock
) -> None:
    ids = await _one_of_each_state(queue)
    clock.advance(100)
    await queue.redrive(ids["dead"])
    await queue.prune(retention_s=10)
    back = await queue.get(ids["dead"])
    assert back is not None and back.state == "queued"


async def test_retention_job_prunes_in_batches_until_one_comes_back_short(
    clock: FakeClock,
) -> None:
    queue = MemoryQueue(clock=clock)
    for n in range(7):
        task, _ = await queue.enqueue(req(payload=n))
        await queue.cancel(task.id)
    calls: list[int] = []

    async def counting_prune(*, retention_s: float, limit: int) -> int:
        pruned = await queue.prune(retention_s=retention_s, limit=limit)
        calls.append(pruned)
        return pruned

    job = RetentionJob(counting_prune, retention_s=60, batch_size=3)
    assert await job.run_once() == 0, "nothing is a minute old yet"
    clock.advance(60)
    assert await job.run_once() == 7
    assert calls == [0, 3, 3, 1]
    assert await queue.list() == []


async def test_open_queue_with_retention_prunes_until_closed(
    tmp_path: Path, clock: FakeClock
) -> None:
    queue = await open_queue(
        f"sqlite://{tmp_path}/q.db", state_dir=tmp_path, clock=clock, task_retention="1h"
    )
    try:
        assert isinstance(queue, SqliteQueue) and queue._retention is not None
        assert queue._retention.retention_s == 3600
        task, _ = await queue.enqueue(req())
        await queue.cancel(task.id)
        clock.advance(3600)
        # The first tick runs at start; this one is the same work, run now.
        assert await queue._retention.run_once() == 1
    finally:
        await queue.close()
    assert queue._retention is not None and queue._retention._task is None
    kept = await open_queue("memory://", state_dir=tmp_path, task_retention="0")
    assert isinstance(kept, MemoryQueue) and kept._retention is None
    with pytest.raises(ValueError, match="duration"):
        await open_queue("memory://", state_dir=tmp_path, task_retention="soon")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("7d", 7 * 86400.0, id="days"),
        pytest.param("24h", 86400.0, id="hours"),
        pytest.param("30m", 1800.0, id="minutes"),
        pytest.param("90s", 90.0, id="seconds"),
        pytest.param("3600", 3600.0, id="bare-number"),
        pytest.param("0", 0.0, id="off"),
    ],
)
def test_parse_duration_reads_units(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "-1h", "7w", "inf", "nan"])
def test_parse_duration_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration_s(text)


def test_backoff_delay_doubles_up_to_max() -> None:
    policy = RetryPolicy(backoff_initial_s=0.5, backoff_max_s=3.0, jitter=False)
    delays = [backoff_delay_s(policy, attempts=n) for n in range(1, 6)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_delay_s(policy, attempts=10_000) == 3.0


def test_backoff_delay_equal_jitter_stays_within_half_to_full() -> None:
    policy = RetryPolicy(backoff_initial_s=1.0, backoff_max_s=60.0, jitter=True)
    assert backoff_delay_s(policy, attempts=3, rand=lambda: 0.0) == 2.0
    assert backoff_delay_s(policy, attempts=3, rand=lambda: 0.999) == pytest.approx(3.998)


def test_new_task_id_sorts_in_creation_order() -> None:
    ids = [new_task_id() for _ in range(1000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


async def test_open_queue_picks_backend_from_url(tmp_path: Path) -> None:
    memory = await open_queue("memory://", state_dir=tmp_path)
    assert isinstance(memory, MemoryQueue)
    default = await open_queue("sqlite://", state_dir=tmp_path)
    explicit = await open_queue(f"sqlite://{tmp_path}/x/q.db", state_dir=tmp_path / "unused")
    try:
        assert isinstance(default, SqliteQueue) and default.path == tmp_path / "queue.db"
        assert isinstance(explicit, SqliteQueue) and explicit.path == tmp_path / "x" / "q.db"
        assert (tmp_path / "x" / "q.db").exists()
    finally:
        await default.close()
        await explicit.close()


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("postgres://db/x", id="unknown-scheme"),
        pytest.param("queue.db", id="no-scheme"),
        pytest.param("sqlite://relative.db", id="sqlite-host"),
        pytest.param("sqlite:///tmp/", id="sqlite-folder"),
        pytest.param("memory://host", id="memory-host"),
        pytest.param("redis:///0", id="redis-no-host"),
    ],
)
async def test_open_queue_rejects_bad_url(url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="queue URL"):
        await open_queue(url, state_dir=tmp_path)
