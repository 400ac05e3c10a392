"""The durable single-node queue behind ``sqlite:///path``: one file, one writer thread.

It owns the schema, the writer thread that batches concurrent writes into one
transaction (group commit), and a reader thread for ``get``/``list``/``counts``.
It does not decide when to lease or retry; the dispatcher and API call it.
Every call returns only after its transaction committed, so an ``enqueue``
that returned survives a SIGKILL of the process the next instant.
sqlite3 errors become ``QueueUnavailable`` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from controller.errors import QueueUnavailable
from controller.queues import base
from controller.queues.base import (
    TASK_STATES,
    EnqueueRequest,
    QueueCounts,
    RetryPolicy,
    Task,
    TaskState,
)
from controller.queues.retention import DEFAULT_INTERVAL_S, RetentionJob

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Most operations one writer transaction may carry; bounds the latency a single
# call can see behind a burst.
_MAX_BATCH = 2000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    pool TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    created_at REAL NOT NULL,
    work_seconds REAL,
    idempotency_key TEXT,
    worker TEXT,
    payload TEXT NOT NULL,
    result TEXT,
    error TEXT,
    started_at REAL,
    finished_at REAL,
    lease_expires_at REAL,
    not_before REAL,
    traceparent TEXT,
    history TEXT NOT NULL,
    fingerprint TEXT
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency
    ON tasks (pool, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_pool_state ON tasks (pool, state, id);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks (state, id);
CREATE INDEX IF NOT EXISTS tasks_lease ON tasks (lease_expires_at) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS tasks_delayed
    ON tasks (pool, not_before) WHERE state = 'queued' AND not_before IS NOT NULL;
-- Finished tasks by age, for pruning (only final states set finished_at).
CREATE INDEX IF NOT EXISTS tasks_finished
    ON tasks (finished_at, id) WHERE finished_at IS NOT NULL;
-- Per-pool counters kept by triggers, so counts() reads a handful of rows
-- however many finished tasks the table holds.
CREATE TABLE IF NOT EXISTS pool_counts (
    pool TEXT NOT NULL,
    state TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (pool, state)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS tasks_count_insert AFTER INSERT ON tasks BEGIN
    INSERT INTO pool_counts (pool, state, n) VALUES (new.pool, new.state, 1)
        ON CONFLICT (pool, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS tasks_count_update AFTER UPDATE OF state ON tasks
WHEN old.state != new.state BEGIN
    UPDATE pool_counts SET n = n - 1 WHERE pool = old.pool AND state = old.state;
    INSERT INTO pool_counts (pool, state, n) VALUES (new.pool, new.state, 1)
        ON CONFLICT (pool, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS tasks_count_delete AFTER DELETE ON tasks BEGIN
    UPDATE pool_counts SET n = n - 1 WHERE pool = old.pool AND state = old.state;
END;
"""

_FINAL_STATES_SQL = ", ".join(f"'{state}'" for state in sorted(base.FINAL_STATES))

_COLUMNS = (
    "id, pool, state, attempts, max_attempts, created_at, work_seconds, idempotency_key, "
    "worker, payload, result, error, started_at, finished_at, lease_expires_at, not_before, "
    "traceparent, history, fingerprint"
)
_INSERT = f"INSERT INTO tasks ({_COLUMNS}) VALUES ({', '.join('?' * 19)})"
_UPDATE = (
    "UPDATE tasks SET state = ?, attempts = ?, worker = ?, result = ?, error = ?, "
    "started_at = ?, finished_at = ?, lease_expires_at = ?, not_before = ?, history = ? "
    "WHERE id = ?"
)


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    conn.execute("PRAGMA journal_mode = WAL")
    # WAL + synchronous=NORMAL: a commit is in the WAL file (the OS page cache)
    # before it returns, so a killed process loses nothing it committed; only a
    # power cut or kernel crash can roll back the last few commits (never
    # corrupt the file). fsync happens at checkpoints instead of every commit.
    conn.execute("PRAGMA synchronous = NORMAL")
    # Two Shoal processes on one file (or a checkpoint) wait instead of raising
    # "database is locked" at the caller.
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA foreign_keys = OFF")
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    """Brings a file made by an older Shoal up to this schema; a no-op on a new one.

    Columns are only ever added, as NULL-able, so old rows stay valid and an
    older Shoal can still read the file.
    """
    columns = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
    if "fingerprint" not in columns:
        # Rows from before have no fingerprint: any retry of their key matches.
        conn.execute("ALTER TABLE tasks ADD COLUMN fingerprint TEXT")
        logger.info("sqlite queue: added the fingerprint column to an older file")


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _row_to_task(row: tuple[Any, ...]) -> Task:
    return Task(
        id=row[0],
        pool=row[1],
        state=row[2],
        attempts=row[3],
        max_attempts=row[4],
        created_at=row[5],
        work_seconds=row[6],
        idempotency_key=row[7],
        worker=row[8],
        payload=json.loads(row[9]),
        result=None if row[10] is None else json.loads(row[10]),
        error=row[11],
        started_at=row[12],
        finished_at=row[13],
        lease_expires_at=row[14],
        not_before=row[15],
        traceparent=row[16],
        history=tuple(json.loads(row[17])),
        fingerprint=row[18],
    )


def _insert(conn: sqlite3.Connection, task: Task) -> None:
    conn.execute(
        _INSERT,
        (
            task.id,
            task.pool,
            task.state,
            task.attempts,
            task.max_attempts,
            task.created_at,
            task.work_seconds,
            task.idempotency_key,
            task.worker,
            _dump(task.payload),
            None if task.result is None else _dump(task.result),
            task.error,
            task.started_at,
            task.finished_at,
            task.lease_expires_at,
            task.not_before,
            task.traceparent,
            _dump(list(task.history)),
            task.fingerprint,
        ),
    )


def _update(conn: sqlite3.Connection, task: Task) -> Task:
    conn.execute(
        _UPDATE,
        (
            task.state,
            task.attempts,
            task.worker,
            None if task.result is None else _dump(task.result),
            task.error,
            task.started_at,
            task.finished_at,
            task.lease_expires_at,
            task.not_before,
            _dump(list(task.history)),
            task.id,
        ),
    )
    return task


def _select(conn: sqlite3.Connection, task_id: str) -> Task | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
    return None if row is None else _row_to_task(row)


@dataclass
class _Request:
    op: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _settle(outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    """Runs on the event loop: hands each caller its result (once per batch)."""
    for future, ok, value in outcomes:
        if future.done():
            continue  # the caller gave up (cancelled); the write still happened
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class _Writer(threading.Thread):
    """Owns the one writing connection; runs queued operations in group commits.

    NB: an operation must be a pure function of the database it reads, because a
    batch that fails is rolled back and its operations replayed one by one.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(name=f"shoal-sqlite-writer:{path.name}", daemon=True)
        self._path = path
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.batches = 0
        self.operations = 0

    def start_and_wait(self) -> None:
        self.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise QueueUnavailable(
                f"cannot open sqlite queue {self._path}: {self._startup_error}"
            ) from self._startup_error

    def submit(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._requests.put(_Request(op, future, loop))
        return future

    def stop(self) -> None:
        self._requests.put(None)

    def run(self) -> None:
        try:
            conn = _connect(self._path)
            conn.executescript(_SCHEMA)
            _migrate(conn)
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._serve(conn)
        finally:
            conn.close()

    def _serve(self, conn: sqlite3.Connection) -> None:
        while True:
            first = self._requests.get()
            if first is None:
                return
            batch = [first]
            stopping = False
            # Group commit: whatever queued up while the last batch ran goes
            # into this one transaction.
            while len(batch) < _MAX_BATCH:
                try:
                    more = self._requests.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.append(more)
            self._run_batch(conn, batch)
            if stopping:
                return

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Request]) -> None:
        outcomes: list[tuple[_Request, bool, Any]]
        try:
            conn.execute("BEGIN IMMEDIATE")
            outcomes = [(request, True, request.op(conn)) for request in batch]
            conn.execute("COMMIT")
        except Exception as exc:
            _rollback(conn)
            if len(batch) == 1:
                outcomes = [(batch[0], False, _translate(exc))]
            else:
                logger.warning(
                    "sqlite batch of %d failed (%s); replaying one by one", len(batch), exc
                )
                outcomes = [self._run_alone(conn, request) for request in batch]
        self.batches += 1
        self.operations += len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for request, ok, value in outcomes:
            by_loop.setdefault(request.loop, []).append((request.future, ok, value))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, settled)
            except RuntimeError:
                pass  # that loop is closed; nobody is waiting any more

    def _run_alone(self, conn: sqlite3.Connection, request: _Request) -> tuple[_Request, bool, Any]:
        try:
            conn.execute("BEGIN IMMEDIATE")
            value = request.op(conn)
            conn.execute("COMMIT")
        except Exception as exc:
            _rollback(conn)
            return request, False, _translate(exc)
        return request, True, value


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # no transaction was open


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, sqlite3.Error):
        error = QueueUnavailable(f"sqlite queue: {exc}")
        error.__cause__ = exc
        return error
    return exc


class SqliteQueue:
    """A ``TaskQueue`` in one SQLite file; open it with ``await SqliteQueue.open(path)``.

    Tasks left ``running`` by a previous process keep their lease: a worker may
    still finish them and report back; ``reclaim_expired`` requeues them once
    the lease ran out.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.path = path
        self._clock = clock
        self._rand = rand
        self._writer = _Writer(path)
        self._reader_pool = ThreadPoolExecutor(1, thread_name_prefix="shoal-sqlite-reader")
        self._reader_local = threading.local()
        self._closed = False
        self._retention: RetentionJob | None = None

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> SqliteQueue:
        path.parent.mkdir(parents=True, exist_ok=True)
        queue_ = cls(path, clock=clock, rand=rand)
        await asyncio.get_running_loop().run_in_executor(None, queue_._writer.start_and_wait)
        logger.info("sqlite queue open at %s", path)
        return queue_

    @property
    def stats(self) -> dict[str, int]:
        """Writer batches and operations so far (group-commit ratio, for benchmarks)."""
        return {"batches": self._writer.batches, "operations": self._writer.operations}

    async def _write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise QueueUnavailable("sqlite queue is closed")
        return await self._writer.submit(op)

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise QueueUnavailable("sqlite queue is closed")

        def run() -> T:
            conn = getattr(self._reader_local, "conn", None)
            if conn is None:
                conn = self._reader_local.conn = _connect(self.path)
            try:
                return op(conn)
            except sqlite3.Error as exc:
                raise QueueUnavailable(f"sqlite queue: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._reader_pool, run)

    async def enqueue(self, request: EnqueueRequest) -> tuple[Task, bool]:
        task = base.make_task(request, task_id=base.new_task_id(), now=self._clock())

        def op(conn: sqlite3.Connection) -> tuple[Task, bool]:
            if task.idempotency_key is not None:
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM tasks WHERE pool = ? AND idempotency_key = ?",
                    (task.pool, task.idempotency_key),
                ).fetchone()
                if row is not None:
                    return base.same_request(_row_to_task(row), request), False
            _insert(conn, task)
            return task, True

        return await self._write(op)

    async def lease(self, pool: str, *, worker: str, lease_s: float) -> Task | None:
        def op(conn: sqlite3.Connection) -> Task | None:
            now = self._clock()
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE pool = ? AND state = 'queued' "
                "AND (not_before IS NULL OR not_before <= ?) ORDER BY id LIMIT 1",
                (pool, now),
            ).fetchone()
            if row is None:
                return None
            task = _row_to_task(row)
            return _update(conn, base.leased(task, worker=worker, now=now, lease_s=lease_s))

        return await self._write(op)

    async def _change_held(
        self, task_id: str, worker: str, change: Callable[[Task, float], Task]
    ) -> Task | None:
        def op(conn: sqlite3.Connection) -> Task | None:
            task = _select(conn, task_id)
            if task is None or not base.holds_lease(task, worker):
                return None
            return _update(conn, change(task, self._clock()))

        return await self._write(op)

    async def extend(self, task_id: str, *, worker: str, lease_s: float) -> bool:
        changed = await self._change_held(
            task_id, worker, lambda t, now: base.extended(t, now=now, lease_s=lease_s)
        )
        return changed is not None

    async def ack(self, task_id: str, *, worker: str, result: Any) -> bool:
        changed = await self._change_held(
            task_id, worker, lambda t, now: base.acked(t, now=now, result=result)
        )
        return changed is not None

    async def fail(
        self,
        task_id: str,
        *,
        worker: str,
        error: str,
        retry: RetryPolicy | None,
        permanent: bool = False,
    ) -> Task | None:
        # Drawn outside the op so a replayed batch gives the same back-off.
        jitter = self._rand()
        return await self._change_held(
            task_id,
            worker,
            lambda t, now: base.failed(
                t, now=now, error=error, retry=retry, permanent=permanent, rand=lambda: jitter
            ),
        )

    async def release(self, task_id: str, *, worker: str) -> bool:
        changed = await self._change_held(task_id, worker, lambda t, now: base.released(t))
        return changed is not None

    async def reclaim_expired(self, *, now: float | None = None) -> int:
        def op(conn: sqlite3.Connection) -> int:
            at = self._clock() if now is None else now
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE state = 'running' "
                "AND lease_expires_at <= ? ORDER BY id",
                (at,),
            ).fetchall()
            for row in rows:
                _update(conn, base.reclaimed(_row_to_task(row), now=at))
            return len(rows)

        return await self._write(op)

    async def get(self, task_id: str) -> Task | None:
        return await self._read(lambda conn: _select(conn, task_id))

    async def list(
        self,
        *,
        pool: str | None = None,
        state: TaskState | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[Task]:
        clauses: list[str] = []
        params: list[Any] = []
        if pool is not None:
            clauses.append("pool = ?")
            params.append(pool)
        if state is not None:
            clauses.append("state = ?")
            params.append(state)
        if after is not None:
            clauses.append("id > ?")
            params.append(after)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT {_COLUMNS} FROM tasks {where} ORDER BY id LIMIT ?"
        params.append(max(0, limit))

        def op(conn: sqlite3.Connection) -> list[Task]:
            return [_row_to_task(row) for row in conn.execute(sql, params)]

        return await self._read(op)

    async def counts(self, pool: str) -> QueueCounts:
        def op(conn: sqlite3.Connection) -> QueueCounts:
            by_state = dict.fromkeys(TASK_STATES, 0)
            for state, n in conn.execute(
                "SELECT state, n FROM pool_counts WHERE pool = ?", (pool,)
            ):
                by_state[state] = n
            (waiting,) = conn.execute(
                "SELECT count(*) FROM tasks WHERE pool = ? AND state = 'queued' "
                "AND not_before IS NOT NULL AND not_before > ?",
                (pool, self._clock()),
            ).fetchone()
            # NB: two reads, two snapshots: a commit between them must not make
            # ``ready`` negative (a status page would show it).
            return QueueCounts(ready=max(0, by_state["queued"] - waiting), **by_state)

        return await self._read(op)

    async def cancel(self, task_id: str) -> Task | None:
        def op(conn: sqlite3.Connection) -> Task | None:
            task = _select(conn, task_id)
            if task is None or task.state != "queued":
                return task
            return _update(conn, base.cancelled(task, now=self._clock()))

        return await self._write(op)

    async def redrive(self, task_id: str) -> Task | None:
        def op(conn: sqlite3.Connection) -> Task | None:
            task = _select(conn, task_id)
            if task is None or task.state not in ("dead", "failed"):
                return task
            return _update(conn, base.redriven(task))

        return await self._write(op)

    async def prune(self, *, retention_s: float, limit: int = 500) -> int:
        def op(conn: sqlite3.Connection) -> int:
            cutoff = self._clock() - retention_s
            # The pool_counts trigger and the unique index follow the delete: the
            # counts drop and the idempotency key is free.
            cursor = conn.execute(
                "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks "
                "WHERE finished_at IS NOT NULL AND finished_at <= ? "
                f"AND state IN ({_FINAL_STATES_SQL}) ORDER BY finished_at, id LIMIT ?)",
                (cutoff, max(0, limit)),
            )
            return cursor.rowcount

        return await self._write(op)

    def start_retention(
        self, *, retention_s: float, interval_s: float = DEFAULT_INTERVAL_S
    ) -> None:
        """Prunes finished tasks every ``interval_s`` until ``close``."""
        self._retention = RetentionJob(self.prune, retention_s=retention_s, interval_s=interval_s)
        self._retention.start()

    async def close(self) -> None:
        """Finishes queued writes, then stops both threads. Idempotent."""
        if self._closed:
            return
        if self._retention is not None:
            await self._retention.stop()
        self._closed = True
        self._writer.stop()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._writer.join)

        def close_reader() -> None:
            conn = getattr(self._reader_local, "conn", None)
            if conn is not None:
                conn.close()

        await loop.run_in_executor(self._reader_pool, close_reader)
        self._reader_pool.shutdown(wait=True)
