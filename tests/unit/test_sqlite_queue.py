"""SQLite-only guarantees: WAL, group commits, crash safety under SIGKILL, concurrency."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.errors import QueueUnavailable
from controller.queues import EnqueueRequest, IdempotencyConflict, RetryPolicy, Task, TaskQueue
from controller.queues.memory import MemoryQueue
from controller.queues.sqlite import SqliteQueue


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_sqlite_queue_uses_wal_and_normal_sync(tmp_path: Path) -> None:
    queue = await SqliteQueue.open(tmp_path / "q.db")
    try:
        await queue.enqueue(EnqueueRequest(pool="p", payload=1))
        with sqlite3.connect(tmp_path / "q.db") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert (tmp_path / "q.db-wal").exists()
    finally:
        await queue.close()


async def test_sqlite_concurrent_enqueues_are_group_committed(tmp_path: Path) -> None:
    """200 concurrent clients, 10,000 enqueues: no error reaches a caller, commits are shared."""
    queue = await SqliteQueue.open(tmp_path / "q.db")
    try:

        async def client(n: int) -> list[str]:
            ids = []
            for i in range(50):
                task, created = await queue.enqueue(
                    EnqueueRequest(pool="p", payload={"client": n, "i": i})
                )
                assert created
                ids.append(task.id)
            return ids

        results = await asyncio.gather(*(client(n) for n in range(200)))
        ids = [task_id for ids in results for task_id in ids]
        assert len(set(ids)) == 10_000
        assert (await queue.counts("p")).queued == 10_000
        stats = queue.stats
        assert stats["operations"] >= 10_000
        # Far fewer transactions than operations: the writer batched them.
        assert stats["batches"] < stats["operations"] / 5
    finally:
        await queue.close()


async def test_sqlite_concurrent_leasers_never_share_a_task(tmp_path: Path) -> None:
    queue = await SqliteQueue.open(tmp_path / "q.db")
    try:
        for i in range(500):
            await queue.enqueue(EnqueueRequest(pool="p", payload=i))

        async def leaser(name: str) -> list[str]:
            got = []
            while (task := await queue.lease("p", worker=name, lease_s=60)) is not None:
                got.append(task.id)
                assert await queue.ack(task.id, worker=name, result=None)
            return got

        results = await asyncio.gather(*(leaser(f"w{n}") for n in range(50)))
        leased = [task_id for got in results for task_id in got]
        assert len(leased) == len(set(leased)) == 500
        assert (await queue.counts("p")).succeeded == 500
    finally:
        await queue.close()


async def test_sqlite_two_processes_worth_of_writers_share_one_file(tmp_path: Path) -> None:
    """Two queues (two writer threads) on one file wait for each other, never raise 'locked'."""
    first = await SqliteQueue.open(tmp_path / "q.db")
    second = await SqliteQueue.open(tmp_path / "q.db")
    try:

        async def client(queue: SqliteQueue, n: int) -> None:
            for i in range(20):
                await queue.enqueue(EnqueueRequest(pool="p", payload=[n, i]))

        await asyncio.gather(*(client(first if n % 2 else second, n) for n in range(40)))
        assert (await first.counts("p")).queued == 800
    finally:
        await first.close()
        await second.close()


async def test_sqlite_reopen_keeps_running_leases_until_they_expire(tmp_path: Path) -> None:
    clock = FakeClock()
    queue = await SqliteQueue.open(tmp_path / "q.db", clock=clock)
    task, _ = await queue.enqueue(EnqueueRequest(pool="p", payload="x"))
    await queue.lease("p", worker="w1", lease_s=30)
    await queue.close()

    reopened = await SqliteQueue.open(tmp_path / "q.db", clock=clock)
    try:
        held = await reopened.get(task.id)
        assert held is not None and held.state == "running" and held.worker == "w1"
        assert await reopened.reclaim_expired() == 0
        # The worker outlived the controller and reports back: accepted.
        assert await reopened.extend(task.id, worker="w1", lease_s=30)
        clock.now += 31
        assert await reopened.reclaim_expired() == 1
        back = await reopened.get(task.id)
        assert back is not None and back.state == "queued" and back.attempts == 1
    finally:
        await reopened.close()


async def test_sqlite_one_bad_operation_fails_alone_in_its_batch(tmp_path: Path) -> None:
    """A batch that fails is replayed one by one: only the bad call sees the error."""
    queue = await SqliteQueue.open(tmp_path / "q.db")
    try:
        calls = [
            queue.enqueue(EnqueueRequest(pool="p", payload=object() if n == 25 else n))
            for n in range(50)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1 and isinstance(errors[0], TypeError)
        assert (await queue.counts("p")).queued == 49
        stored = sorted(t.payload for t in await queue.list(pool="p", limit=100))
        assert stored == [n for n in range(50) if n != 25]
    finally:
        await queue.close()


async def test_sqlite_closed_queue_raises_queue_unavailable(tmp_path: Path) -> None:
    queue = await SqliteQueue.open(tmp_path / "q.db")
    await queue.close()
    await queue.close()
    with pytest.raises(QueueUnavailable):
        await queue.enqueue(EnqueueRequest(pool="p", payload=1))


async def test_sqlite_unopenable_path_raises_queue_unavailable(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(QueueUnavailable, match="cannot open"):
        await SqliteQueue.open(tmp_path / "dir.db")


# A child process that enqueues (or leases and acks) as fast as it can with 50
# concurrent coroutines and prints a line only after each call returned.
_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from controller.queues import EnqueueRequest
    from controller.queues.sqlite import SqliteQueue

    async def main(path, mode):
        queue = await SqliteQueue.open(Path(path))
        seq = iter(range(10**9))

        async def enqueuer():
            while True:
                n = next(seq)
                task, _ = await queue.enqueue(EnqueueRequest(pool="p", payload=n))
                print("E", n, task.id, flush=True)

        async def worker(name):
            while True:
                task = await queue.lease("p", worker=name, lease_s=600)
                if task is None:
                    print("IDLE", flush=True)
                    await asyncio.sleep(0.01)
                    continue
                assert await queue.ack(task.id, worker=name, result=task.payload)
                print("A", task.id, flush=True)

        if mode == "enqueue":
            await asyncio.gather(*(enqueuer() for _ in range(50)))
        else:
            await asyncio.gather(*(worker(f"w{i}") for i in range(50)))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def _run_until_killed(path: Path, mode: str, *, lines: int) -> list[list[str]]:
    """Runs the child until it printed ``lines`` lines, SIGKILLs it, returns what it printed."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    printed: list[list[str]] = []
    try:
        assert child.stdout is not None
        while len(printed) < lines:
            line = child.stdout.readline()
            if not line.endswith("\n"):
                break
            printed.append(line.split())
        os.kill(child.pid, signal.SIGKILL)
        # Whatever it printed before dying was also acknowledged to it; a line
        # cut off by the kill is not counted.
        rest, _ = child.communicate(timeout=30)
        printed.extend(line.split() for line in rest.split("\n")[:-1])
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    return printed


def _rows(path: Path) -> list[tuple[str, str, str, str | None]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT id, state, payload, result FROM tasks ORDER BY id").fetchall()


@pytest.mark.parametrize("kill_after", [1, 300, 1500])
def test_sqlite_sigkill_during_enqueues_loses_and_duplicates_nothing(
    tmp_path: Path, kill_after: int
) -> None:
    path = tmp_path / "q.db"
    printed = _run_until_killed(path, "enqueue", lines=kill_after)
    acknowledged = {int(line[1]): line[2] for line in printed if line[0] == "E"}
    assert len(acknowledged) >= kill_after

    rows = _rows(path)
    stored_seqs = [json.loads(payload) for _, _, payload, _ in rows]
    assert len(stored_seqs) == len(set(stored_seqs)), "a task was stored twice"
    stored = {json.loads(payload): task_id for task_id, _, payload, _ in rows}
    missing = {n for n, task_id in acknowledged.items() if stored.get(n) != task_id}
    assert not missing, f"acknowledged enqueues lost: {sorted(missing)[:10]}"
    # The database opens cleanly afterwards.
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_sqlite_sigkill_during_acks_keeps_every_ack_and_leaves_leases_held(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.db"
    clock = FakeClock(now=0.0)
    queue = await SqliteQueue.open(path)
    for n in range(3000):
        await queue.enqueue(EnqueueRequest(pool="p", payload=n))
    await queue.close()

    printed = await asyncio.to_thread(_run_until_killed, path, "work", lines=700)
    acked = {line[1] for line in printed if line[0] == "A"}
    assert len(acked) >= 600

    rows = _rows(path)
    assert len(rows) == 3000
    by_id = {task_id: (state, result) for task_id, state, _, result in rows}
    assert all(by_id[task_id][0] == "succeeded" for task_id in acked)
    states = [state for state, _ in by_id.values()]
    # Leases the dead process held are left alone on open, then reclaimed later.
    clock.now = 10**12
    reopened = await SqliteQueue.open(path, clock=clock)
    try:
        running = states.count("running")
        assert await reopened.reclaim_expired() == running
        counts = await reopened.counts("p")
        assert counts.succeeded == states.count("succeeded")
        assert counts.queued == 3000 - counts.succeeded
    finally:
        await reopened.close()


# A tasks table as Shoal wrote it before fingerprints (and its idempotency index).
_OLD_SCHEMA = """
CREATE TABLE tasks (
    id TEXT PRIMARY KEY, pool TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL, created_at REAL NOT NULL, work_seconds REAL,
    idempotency_key TEXT, worker TEXT, payload TEXT NOT NULL, result TEXT, error TEXT,
    started_at REAL, finished_at REAL, lease_expires_at REAL, not_before REAL,
    traceparent TEXT, history TEXT NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX tasks_idempotency
    ON tasks (pool, idempotency_key) WHERE idempotency_key IS NOT NULL;
"""


async def test_sqlite_opens_a_file_from_before_fingerprints(tmp_path: Path) -> None:
    """The column is added in place; an old row's key matches any retry (it cannot be judged)."""
    path = tmp_path / "q.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(_OLD_SCHEMA)
        conn.execute(
            "INSERT INTO tasks VALUES ('00000000000001aaaaaaaaaa', 'p', 'queued', 0, 5, 1.0, "
            "NULL, 'old-key', NULL, '{\"n\": 1}', NULL, NULL, NULL, NULL, NULL, NULL, NULL, '[]')"
        )
    conn.close()
    queue = await SqliteQueue.open(path)
    try:
        old, created = await queue.enqueue(
            EnqueueRequest(pool="p", payload={"n": 2}, idempotency_key="old-key")
        )
        assert not created and old.id == "00000000000001aaaaaaaaaa" and old.fingerprint is None
        assert old.payload == {"n": 1}
        new, created = await queue.enqueue(
            EnqueueRequest(pool="p", payload={"n": 1}, idempotency_key="new-key")
        )
        assert created and new.fingerprint is not None
        with pytest.raises(IdempotencyConflict):
            await queue.enqueue(
                EnqueueRequest(pool="p", payload={"n": 2}, idempotency_key="new-key")
            )
        assert (await queue.get(new.id)) == new
        assert len(await queue.list(pool="p")) == 2
    finally:
        await queue.close()
    reopened = await SqliteQueue.open(path)
    try:
        assert [t.id for t in await reopened.list()] == [old.id, new.id]
    finally:
        await reopened.close()


# --- sqlite behaves exactly as the in-memory model --------------------------------

_POOLS = st.sampled_from(["a", "b"])
_WORKERS = st.sampled_from(["w1", "w2", "w3"])
_TASK = st.integers(min_value=0, max_value=7)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("enqueue"), _POOLS, st.sampled_from([None, "k1", "k2"])),
        st.tuples(st.just("lease"), _POOLS, _WORKERS, st.sampled_from([5.0, 30.0])),
        st.tuples(st.just("ack"), _TASK, _WORKERS),
        st.tuples(st.just("fail"), _TASK, _WORKERS, st.booleans()),
        st.tuples(st.just("release"), _TASK, _WORKERS),
        st.tuples(st.just("extend"), _TASK, _WORKERS),
        st.tuples(st.just("cancel"), _TASK),
        st.tuples(st.just("redrive"), _TASK),
        st.tuples(st.just("reclaim")),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 10.0, 40.0])),
        st.tuples(st.just("prune"), st.sampled_from([0.0, 5.0, 30.0])),
    ),
    max_size=40,
)


async def _replay(queue: TaskQueue, clock: FakeClock, ops: list[tuple[Any, ...]]) -> list[Any]:
    """Runs ``ops`` and returns what each answered, with ids replaced by enqueue order."""
    ids: list[str] = []

    def norm(task: Task | None) -> Any:
        if task is None:
            return None
        fields = dataclasses.asdict(task)
        fields["id"] = ids.index(task.id) if task.id in ids else task.id
        return fields

    def task_id(n: int) -> str:
        return ids[n % len(ids)] if ids else "0" * 24

    retry = RetryPolicy(max_attempts=3, backoff_initial_s=1.0, backoff_max_s=8.0, jitter=True)
    out: list[Any] = []
    for op in ops:
        kind = op[0]
        if kind == "enqueue":
            try:
                task, created = await queue.enqueue(
                    EnqueueRequest(
                        pool=op[1], payload=len(ids), idempotency_key=op[2], max_attempts=3
                    )
                )
            except IdempotencyConflict as exc:
                out.append(
                    ("conflict", exc.pool, exc.idempotency_key, norm(await queue.get(exc.task_id)))
                )
                continue
            if created:
                ids.append(task.id)
            out.append((norm(task), created))
        elif kind == "lease":
            out.append(norm(await queue.lease(op[1], worker=op[2], lease_s=op[3])))
        elif kind == "ack":
            out.append(await queue.ack(task_id(op[1]), worker=op[2], result={"by": op[2]}))
        elif kind == "fail":
            failed = await queue.fail(
                task_id(op[1]), worker=op[2], error="e", retry=retry, permanent=op[3]
            )
            out.append(norm(failed))
        elif kind == "release":
            out.append(await queue.release(task_id(op[1]), worker=op[2]))
        elif kind == "extend":
            out.append(await queue.extend(task_id(op[1]), worker=op[2], lease_s=30.0))
        elif kind == "cancel":
            out.append(norm(await queue.cancel(task_id(op[1]))))
        elif kind == "redrive":
            out.append(norm(await queue.redrive(task_id(op[1]))))
        elif kind == "reclaim":
            out.append(await queue.reclaim_expired())
        elif kind == "prune":
            out.append(await queue.prune(retention_s=op[1], limit=2))
        else:
            clock.now += op[1]
        out.append([await queue.counts(pool) for pool in ("a", "b")])
    out.append([norm(task) for task in await queue.list(limit=1000)])
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS)
def test_sqlite_answers_every_sequence_as_the_memory_model_does(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[Any, ...]]
) -> None:
    async def both() -> tuple[list[Any], list[Any]]:
        model_clock, sqlite_clock = FakeClock(), FakeClock()
        # Same jitter draws for both: a fixed sequence.
        model = MemoryQueue(clock=model_clock, rand=itertools.cycle([0.1, 0.7, 0.4]).__next__)
        real = await SqliteQueue.open(
            tmp_path_factory.mktemp("model") / "q.db",
            clock=sqlite_clock,
            rand=itertools.cycle([0.1, 0.7, 0.4]).__next__,
        )
        try:
            return await _replay(model, model_clock, ops), await _replay(real, sqlite_clock, ops)
        finally:
            await real.close()

    expected, actual = asyncio.run(both())
    assert actual == expected
