"""The shared queue behind ``redis://host:port/db``, for several Shoal processes at once.

It owns the key layout below and the scripts that change it; it does not decide
when to lease or retry (the dispatcher and API call it). redis-py errors become
``QueueUnavailable`` here and nowhere else.

Layout (``P`` is the key prefix, ``shoal`` by default):

- ``P:task:{id}`` hash: ``task`` (the task as JSON), ``entry`` (its stream entry, if
  any), ``state``, and ``hist``/``attempts``/``started`` (copies the lease script needs)
- ``P:stream:{pool}`` stream of task ids waiting to be leased, read through the
  consumer group ``shoal``; a leased task's entry stays pending until the lease ends
- ``P:delayed:{pool}`` zset of tasks backing off, by ``not_before``
- ``P:leases`` zset of running tasks, by ``lease_expires_at``
- ``P:idem:{pool}`` hash idempotency key -> id; ``P:counts:{pool}`` hash state -> n
- ``P:idx:...`` zsets of ids (score 0, ordered by id) for ``list`` by pool and/or state
- ``P:finished`` zset of tasks in a final state, by ``finished_at``, for pruning

Every change but a lease is a compare-and-set script: Python applies the
shared transition from ``controller.queues.base`` to the JSON it read, and the
script writes the result only if the stored JSON is still that one, updating
every index in the same atomic step. A lease is one script call that picks a
task and applies ``base.leased`` itself (see ``_LEASE``); an ack, fail or
extend of a lease this process handed out is one call too (its JSON is kept).
A record from an older Shoal is leased in two steps; a process that dies
between them leaves an entry pending with its task still queued, and
``reclaim_expired`` finds such entries with XAUTOCLAIM and puts them back.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import json
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from controller import logfields
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

P = ParamSpec("P")
R = TypeVar("R")

GROUP = "shoal"
# A stream entry delivered this long ago whose task never became ``running``
# belongs to a process that died mid-lease.
DEFAULT_ORPHAN_IDLE_S = 60.0
_RECLAIM_BATCH = 500
# Leases this process handed out and remembers (see ``RedisQueue._change``).
_HELD_CACHE_SIZE = 100_000

# KEYS: idem, record, stream, counts, pools, idx_all, idx_pool, idx_state, idx_ps
# ARGV: idempotency key or '', id, task json, pool, record key prefix
# Returns {1, id} or, for a key already used, {0, first id, first task json or ''}.
# NB: touches the first task's record, not listed in KEYS (one server only).
_ENQUEUE = """
if ARGV[1] ~= '' then
  local existing = redis.call('HGET', KEYS[1], ARGV[1])
  if existing then
    return {0, existing, redis.call('HGET', ARGV[5] .. existing, 'task') or ''}
  end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local entry = redis.call('XADD', KEYS[3], '*', 'id', ARGV[2])
redis.call('HSET', KEYS[2], 'task', ARGV[3], 'entry', entry, 'state', 'queued',
           'hist', '[]', 'attempts', 0, 'started', '')
redis.call('HINCRBY', KEYS[4], 'queued', 1)
redis.call('SADD', KEYS[5], ARGV[4])
for i = 6, 9 do redis.call('ZADD', KEYS[i], 0, ARGV[2]) end
return {1, ARGV[2]}
"""

# KEYS: record, counts, leases, stream, delayed, idx_old_state, idx_new_state,
#       idx_ps_old, idx_ps_new, finished
# ARGV: expected json, new json, id, old state, new state, lease expiry or '',
#       where ('stream' | 'delayed' | 'keep' | ''), not_before, group,
#       history json, attempts, started_at or '', finished_at if final or ''
_APPLY = """
if redis.call('HGET', KEYS[1], 'task') ~= ARGV[1] then return 0 end
local entry = redis.call('HGET', KEYS[1], 'entry') or ''
if ARGV[7] ~= 'keep' and entry ~= '' then
  redis.call('XACK', KEYS[4], ARGV[9], entry)
  redis.call('XDEL', KEYS[4], entry)
  entry = ''
end
redis.call('ZREM', KEYS[5], ARGV[3])
if ARGV[7] == 'stream' then
  entry = redis.call('XADD', KEYS[4], '*', 'id', ARGV[3])
elseif ARGV[7] == 'delayed' then
  redis.call('ZADD', KEYS[5], ARGV[8], ARGV[3])
end
if ARGV[4] ~= ARGV[5] then
  redis.call('HINCRBY', KEYS[2], ARGV[4], -1)
  redis.call('HINCRBY', KEYS[2], ARGV[5], 1)
  redis.call('ZREM', KEYS[6], ARGV[3])
  redis.call('ZADD', KEYS[7], 0, ARGV[3])
  redis.call('ZREM', KEYS[8], ARGV[3])
  redis.call('ZADD', KEYS[9], 0, ARGV[3])
end
if ARGV[6] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[3])
else
  redis.call('ZREM', KEYS[3], ARGV[3])
end
if ARGV[13] ~= '' then
  redis.call('ZADD', KEYS[10], ARGV[13], ARGV[3])
else
  redis.call('ZREM', KEYS[10], ARGV[3])
end
redis.call('HSET', KEYS[1], 'task', ARGV[2], 'entry', entry, 'state', ARGV[5],
           'hist', ARGV[10], 'attempts', ARGV[11], 'started', ARGV[12])
return 1
"""

# The whole of a lease in one call. Moves tasks whose back-off ended into the
# stream, reads the next entry for this process's consumer (dropping entries
# whose task is no longer queued there: cancelled, or re-added under a newer
# entry) and marks that task leased, as ``base.leased`` would.
# It never parses the task JSON (Lua's cjson would round numbers in payloads):
# it appends the changed fields to the object, and a JSON reader keeps the last
# of duplicate names (Python's json does, as documented). The next write from
# Python stores a clean object again. ``hist``, ``attempts`` and ``started``
# are the record fields the append needs; a record without them (stored by an
# older Shoal) is returned unleased for Python to lease by compare-and-set.
# KEYS: delayed, stream, counts, leases, idx_state_queued, idx_state_running,
#       idx_ps_queued, idx_ps_running
# ARGV: now, record key prefix, group, consumer, worker as JSON, lease expiry
# Returns {entry, id, leased task json, 1}, {entry, id, task json, 0} or nil.
# NB: touches record keys not listed in KEYS; fine on one server, not on a cluster.
_LEASE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  local entry = redis.call('XADD', KEYS[2], '*', 'id', id)
  redis.call('HSET', ARGV[2] .. id, 'entry', entry)
end
for _ = 1, 100 do
  local reply = redis.call('XREADGROUP', 'GROUP', ARGV[3], ARGV[4], 'COUNT', 1,
                           'STREAMS', KEYS[2], '>')
  if not reply then return nil end
  local entry = reply[1][2][1][1]
  local id = reply[1][2][1][2][2]
  local key = ARGV[2] .. id
  local record = redis.call('HMGET', key, 'task', 'entry', 'state', 'hist', 'attempts', 'started')
  if record[1] and record[2] == entry and record[3] == 'queued' then
    if not record[4] then return {entry, id, record[1], 0} end
    local attempts = tonumber(record[5]) + 1
    local hist = '[' .. ARGV[5] .. ']'
    if record[4] ~= '[]' then hist = string.sub(record[4], 1, -2) .. ',' .. ARGV[5] .. ']' end
    local changed = ',"state":"running","attempts":' .. attempts .. ',"worker":' .. ARGV[5]
      .. ',"lease_expires_at":' .. ARGV[6]
    local started = record[6]
    if started == '' then
      started = ARGV[1]
      changed = changed .. ',"started_at":' .. started
    end
    local task = string.sub(record[1], 1, -2) .. changed .. ',"history":' .. hist .. '}'
    redis.call('HSET', key, 'task', task, 'state', 'running', 'hist', hist,
               'attempts', attempts, 'started', started)
    redis.call('HINCRBY', KEYS[3], 'queued', -1)
    redis.call('HINCRBY', KEYS[3], 'running', 1)
    redis.call('ZREM', KEYS[5], id)
    redis.call('ZADD', KEYS[6], 0, id)
    redis.call('ZREM', KEYS[7], id)
    redis.call('ZADD', KEYS[8], 0, id)
    redis.call('ZADD', KEYS[4], ARGV[6], id)
    return {entry, id, task, 1}
  end
  redis.call('XACK', KEYS[2], ARGV[3], entry)
  redis.call('XDEL', KEYS[2], entry)
end
return nil
"""

# Deletes one final task if it is still stored as read, with every index entry
# and its idempotency key (only if the key still names this task).
# KEYS: record, counts, finished, idx_all, idx_pool, idx_state, idx_ps, idem
# ARGV: expected json, id, state, idempotency key or ''
_DELETE = """
if redis.call('HGET', KEYS[1], 'task') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HINCRBY', KEYS[2], ARGV[3], -1)
for i = 3, 7 do redis.call('ZREM', KEYS[i], ARGV[2]) end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[8], ARGV[4]) == ARGV[2] then
  redis.call('HDEL', KEYS[8], ARGV[4])
end
return 1
"""

_PRUNE_BACKFILL_PAGE = 500

Where = Literal["stream", "delayed", "keep", ""]


def _translated(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turns redis-py errors raised by ``fn`` into ``QueueUnavailable``.

    It also re-raises a cancel that redis-py swallowed: it writes commands under
    ``asyncio.wait_for``, which on Python 3.11 drops a cancel that lands as the
    write completes. A caller told to stop (the dispatcher's lease keeper, a
    shutdown) would otherwise carry on forever. What the call did stays done.
    """

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        current = asyncio.current_task()
        cancels_before = current.cancelling() if current is not None else 0
        try:
            result = await fn(*args, **kwargs)
        except RedisError as exc:
            raise QueueUnavailable(f"redis queue: {exc}") from exc
        if current is not None and current.cancelling() > cancels_before:
            raise asyncio.CancelledError
        return result

    return wrapper


_TASK_FIELDS = tuple(field.name for field in dataclasses.fields(Task))


def _dump_task(task: Task) -> str:
    # Not dataclasses.asdict: it deep-copies the payload, a third of a lease's CPU.
    fields = {name: getattr(task, name) for name in _TASK_FIELDS}
    fields["history"] = list(task.history)
    return json.dumps(fields, separators=(",", ":"))


def _load_task(text: str) -> Task:
    fields = json.loads(text)
    fields["history"] = tuple(fields["history"])
    return Task(**fields)


class RedisQueue:
    """A ``TaskQueue`` in Redis; open it with ``await RedisQueue.open(url)``."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        prefix: str = "shoal",
        orphan_idle_s: float = DEFAULT_ORPHAN_IDLE_S,
    ) -> None:
        # Typed as Any: redis-py's stubs type replies as bytes | str and cannot
        # know that ``decode_responses=True`` makes every one a str.
        self._r: Any = client
        self._clock = clock
        self._rand = rand
        self._p = prefix
        self._orphan_idle_ms = int(orphan_idle_s * 1000)
        self._consumer = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self._groups: set[str] = set()
        self._sweep_cursor: dict[str, str] = {}
        self._held_json: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._enqueue_script = client.register_script(_ENQUEUE)
        self._apply_script = client.register_script(_APPLY)
        self._lease_script = client.register_script(_LEASE)
        self._delete_script = client.register_script(_DELETE)
        self._retention: RetentionJob | None = None
        self._finished_backfilled = False

    @classmethod
    @_translated
    async def open(
        cls,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        prefix: str = "shoal",
        orphan_idle_s: float = DEFAULT_ORPHAN_IDLE_S,
        max_connections: int = 64,
    ) -> RedisQueue:
        # A blocking pool: a burst of callers waits for a connection instead of
        # failing with "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=10, decode_responses=True
        )
        client = aioredis.Redis.from_pool(pool)
        try:
            await client.ping()
        except RedisError:
            await client.aclose()
            raise
        logger.info("redis queue open at %s (prefix %s)", url, prefix)
        return cls(client, clock=clock, rand=rand, prefix=prefix, orphan_idle_s=orphan_idle_s)

    # --- keys ---------------------------------------------------------------

    def _record(self, task_id: str) -> str:
        return f"{self._p}:task:{task_id}"

    def _stream(self, pool: str) -> str:
        return f"{self._p}:stream:{pool}"

    def _delayed(self, pool: str) -> str:
        return f"{self._p}:delayed:{pool}"

    def _counts(self, pool: str) -> str:
        return f"{self._p}:counts:{pool}"

    def _index(self, *, pool: str | None, state: str | None) -> str:
        if pool is None and state is None:
            return f"{self._p}:idx:all"
        if state is None:
            return f"{self._p}:idx:pool:{pool}"
        if pool is None:
            return f"{self._p}:idx:state:{state}"
        return f"{self._p}:idx:ps:{pool}:{state}"

    @property
    def _leases(self) -> str:
        return f"{self._p}:leases"

    @property
    def _pools(self) -> str:
        return f"{self._p}:pools"

    @property
    def _finished(self) -> str:
        return f"{self._p}:finished"

    # --- the compare-and-set core --------------------------------------------

    async def _read(self, task_id: str) -> tuple[str, str] | None:
        """The stored JSON and stream entry of a task, or None."""
        record = await self._r.hmget(self._record(task_id), ["task", "entry"])
        if record[0] is None:
            return None
        return record[0], record[1] or ""

    async def _apply(self, old_json: str, old: Task, new: Task, *, where: Where) -> str | None:
        """Writes ``new`` if ``old_json`` is still stored; returns the JSON written, or None."""
        new_json = _dump_task(new)
        lease_expiry = repr(new.lease_expires_at) if new.state == "running" else ""
        keys = [
            self._record(new.id),
            self._counts(new.pool),
            self._leases,
            self._stream(new.pool),
            self._delayed(new.pool),
            self._index(pool=None, state=old.state),
            self._index(pool=None, state=new.state),
            self._index(pool=new.pool, state=old.state),
            self._index(pool=new.pool, state=new.state),
            self._finished,
        ]
        args = [
            old_json,
            new_json,
            new.id,
            old.state,
            new.state,
            lease_expiry,
            where,
            repr(new.not_before or 0.0),
            GROUP,
            json.dumps(list(new.history)),
            str(new.attempts),
            "" if new.started_at is None else repr(new.started_at),
            repr(new.finished_at or 0.0) if new.state in base.FINAL_STATES else "",
        ]
        written = bool(await self._apply_script(keys=keys, args=args))
        if not written:
            self._held_json.pop(new.id, None)
            return None
        self._remember(new, new_json)
        return new_json

    def _remember(self, task: Task, task_json: str) -> None:
        """Keeps the JSON of leases this process handed out, to skip a read on ack."""
        if task.state != "running":
            self._held_json.pop(task.id, None)
            return
        self._held_json[task.id] = task_json
        self._held_json.move_to_end(task.id)
        while len(self._held_json) > _HELD_CACHE_SIZE:
            self._held_json.popitem(last=False)

    async def _change(
        self,
        task_id: str,
        decide: Callable[[Task, float], tuple[Task, Where] | None],
    ) -> tuple[Task | None, bool]:
        """Applies ``decide`` until it sticks; returns (task as now stored, changed).

        Starts from the JSON this process last wrote for the task when it has
        one: the compare-and-set refuses it if anyone changed the task since,
        and then the stored version is read and decided on again.
        """
        old_json = self._held_json.get(task_id)
        from_cache = old_json is not None
        while True:
            if old_json is None:
                read = await self._read(task_id)
                if read is None:
                    return None, False
                old_json, _ = read
            old = _load_task(old_json)
            decision = decide(old, self._clock())
            if decision is None:
                if from_cache:
                    from_cache, old_json = False, None
                    continue
                return old, False
            new, where = decision
            if await self._apply(old_json, old, new, where=where) is not None:
                return new, True
            # Someone else changed the task between our read and write: decide again.
            from_cache, old_json = False, None

    def _requeue_where(self, task: Task) -> Where:
        if task.state != "queued":
            return ""
        if task.not_before is not None and task.not_before > self._clock():
            return "delayed"
        return "stream"

    async def _ensure_group(self, pool: str) -> None:
        if pool in self._groups:
            return
        try:
            # From id 0: entries added before the group existed are delivered too.
            await self._r.xgroup_create(self._stream(pool), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(pool)

    # --- the contract ---------------------------------------------------------

    @_translated
    async def enqueue(self, request: EnqueueRequest) -> tuple[Task, bool]:
        task = base.make_task(request, task_id=base.new_task_id(), now=self._clock())
        pool = request.pool
        keys = [
            f"{self._p}:idem:{pool}",
            self._record(task.id),
            self._stream(pool),
            self._counts(pool),
            self._pools,
            self._index(pool=None, state=None),
            self._index(pool=pool, state=None),
            self._index(pool=None, state="queued"),
            self._index(pool=pool, state="queued"),
        ]
        args = [request.idempotency_key or "", task.id, _dump_task(task), pool, self._record("")]
        reply = await self._enqueue_script(keys=keys, args=args)
        if reply[0]:
            return task, True
        task_id, first_json = reply[1], reply[2]
        if not first_json:
            raise QueueUnavailable(f"redis queue: idempotency key points at lost task {task_id}")
        return base.same_request(_load_task(first_json), request), False

    @_translated
    async def lease(self, pool: str, *, worker: str, lease_s: float) -> Task | None:
        await self._ensure_group(pool)
        keys = [
            self._delayed(pool),
            self._stream(pool),
            self._counts(pool),
            self._leases,
            self._index(pool=None, state="queued"),
            self._index(pool=None, state="running"),
            self._index(pool=pool, state="queued"),
            self._index(pool=pool, state="running"),
        ]
        while True:
            now = self._clock()
            # repr: the shortest text that reads back as the same float.
            args = [
                repr(now),
                self._record(""),
                GROUP,
                self._consumer,
                json.dumps(worker),
                repr(now + lease_s),
            ]
            picked = await self._lease_script(keys=keys, args=args)
            if picked is None:
                return None
            entry, task_id, task_json, leased = picked
            if leased:
                task = _load_task(task_json)
                self._remember(task, task_json)
                return task
            slow = await self._lease_by_compare_and_set(
                entry, task_id, task_json, worker=worker, lease_s=lease_s
            )
            if slow is not None:
                return slow

    async def _lease_by_compare_and_set(
        self, entry: str, task_id: str, old_json: str, *, worker: str, lease_s: float
    ) -> Task | None:
        """Leases a task whose record predates the one-call lease; None if it moved on."""
        while True:
            old = _load_task(old_json)
            new = base.leased(old, worker=worker, now=self._clock(), lease_s=lease_s)
            if await self._apply(old_json, old, new, where="keep") is not None:
                return new
            # Changed between pick and write. Still queued under the entry we
            # hold: try again; otherwise (cancelled, requeued) pick another.
            read = await self._read(task_id)
            if read is None or read[1] != entry or _load_task(read[0]).state != "queued":
                return None
            old_json = read[0]

    def _held(
        self, worker: str, change: Callable[[Task, float], Task], *, requeue: bool = False
    ) -> Callable[[Task, float], tuple[Task, Where] | None]:
        def decide(task: Task, now: float) -> tuple[Task, Where] | None:
            if not base.holds_lease(task, worker):
                return None
            new = change(task, now)
            if new.state == "running":
                return new, "keep"
            return new, self._requeue_where(new)

        return decide

    @_translated
    async def extend(self, task_id: str, *, worker: str, lease_s: float) -> bool:
        _, changed = await self._change(
            task_id, self._held(worker, lambda t, now: base.extended(t, now=now, lease_s=lease_s))
        )
        return changed

    @_translated
    async def ack(self, task_id: str, *, worker: str, result: Any) -> bool:
        _, changed = await self._change(
            task_id, self._held(worker, lambda t, now: base.acked(t, now=now, result=result))
        )
        return changed

    @_translated
    async def fail(
        self,
        task_id: str,
        *,
        worker: str,
        error: str,
        retry: RetryPolicy | None,
        permanent: bool = False,
    ) -> Task | None:
        jitter = self._rand()
        task, changed = await self._change(
            task_id,
            self._held(
                worker,
                lambda t, now: base.failed(
                    t, now=now, error=error, retry=retry, permanent=permanent, rand=lambda: jitter
                ),
            ),
        )
        return task if changed else None

    @_translated
    async def release(self, task_id: str, *, worker: str) -> bool:
        _, changed = await self._change(
            task_id, self._held(worker, lambda t, now: base.released(t))
        )
        return changed

    @_translated
    async def reclaim_expired(self, *, now: float | None = None) -> int:
        at = self._clock() if now is None else now
        expired_ids: list[str] = await self._r.zrangebyscore(
            self._leases, "-inf", repr(at), start=0, num=_RECLAIM_BATCH
        )

        def decide(task: Task, _now: float) -> tuple[Task, Where] | None:
            if task.state != "running" or (task.lease_expires_at or 0.0) > at:
                return None
            new = base.reclaimed(task, now=at)
            return new, "stream" if new.state == "queued" else ""

        reclaimed = 0
        for task_id in expired_ids:
            _, changed = await self._change(task_id, decide)
            reclaimed += changed
        await self._requeue_orphans()
        return reclaimed

    async def _requeue_orphans(self) -> None:
        """Puts back entries a dead process read but never turned into a lease."""

        def decide(task: Task, _now: float) -> tuple[Task, Where] | None:
            return None if task.state != "queued" else (task, "stream")

        pools: set[str] = await self._r.smembers(self._pools)
        for pool in sorted(pools):
            await self._ensure_group(pool)
            stream = self._stream(pool)
            # Resume where the last sweep stopped, so a long run of legitimately
            # pending entries (long tasks) cannot hide an orphan behind it.
            cursor = self._sweep_cursor.get(pool, "0-0")
            reply = await self._r.xautoclaim(
                stream, GROUP, self._consumer, self._orphan_idle_ms, start_id=cursor, count=100
            )
            self._sweep_cursor[pool] = reply[0]
            for entry, fields in reply[1]:
                if not fields:
                    continue  # deleted since; XAUTOCLAIM already dropped it from the PEL
                task_id = fields["id"]
                read = await self._read(task_id)
                if read is None or read[1] != entry:
                    # The task moved on under another entry: this one is garbage.
                    await self._r.xack(stream, GROUP, entry)
                    await self._r.xdel(stream, entry)
                    continue
                _, changed = await self._change(task_id, decide)
                if changed:
                    logger.warning(
                        "requeued task %s read but never leased by a lost process",
                        task_id,
                        extra={logfields.TASK_ID: task_id, logfields.POOL: pool},
                    )

    @_translated
    async def get(self, task_id: str) -> Task | None:
        text = await self._r.hget(self._record(task_id), "task")
        return None if text is None else _load_task(text)

    @_translated
    async def list(
        self,
        *,
        pool: str | None = None,
        state: TaskState | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[Task]:
        if limit <= 0:
            return []
        ids: list[str] = await self._r.zrangebylex(
            self._index(pool=pool, state=state),
            "-" if after is None else f"({after}",
            "+",
            start=0,
            num=limit,
        )
        if not ids:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hget(self._record(task_id), "task")
            texts = await pipe.execute()
        return [_load_task(text) for text in texts if text is not None]

    @_translated
    async def counts(self, pool: str) -> QueueCounts:
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._counts(pool))
            pipe.zcount(self._delayed(pool), f"({self._clock()!r}", "+inf")
            by_state_raw, waiting = await pipe.execute()
        by_state = {state: int(by_state_raw.get(state, 0)) for state in TASK_STATES}
        return QueueCounts(ready=by_state["queued"] - int(waiting), **by_state)

    @_translated
    async def cancel(self, task_id: str) -> Task | None:
        def decide(task: Task, now: float) -> tuple[Task, Where] | None:
            return None if task.state != "queued" else (base.cancelled(task, now=now), "")

        task, _ = await self._change(task_id, decide)
        return task

    @_translated
    async def redrive(self, task_id: str) -> Task | None:
        def decide(task: Task, _now: float) -> tuple[Task, Where] | None:
            if task.state not in ("dead", "failed"):
                return None
            return base.redriven(task), "stream"

        task, _ = await self._change(task_id, decide)
        return task

    @_translated
    async def prune(self, *, retention_s: float, limit: int = 500) -> int:
        cutoff = self._clock() - retention_s
        if not self._finished_backfilled:
            await self._backfill_finished()
        ids: list[str] = await self._r.zrangebyscore(
            self._finished, "-inf", repr(cutoff), start=0, num=max(0, limit)
        )
        if not ids:
            return 0
        async with self._r.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hget(self._record(task_id), "task")
            texts: list[str | None] = await pipe.execute()
        # One flag per queued command: True for a delete, False for a cleanup.
        deletes: list[bool] = []
        async with self._r.pipeline(transaction=False) as pipe:
            for task_id, text in zip(ids, texts, strict=True):
                task = None if text is None else _load_task(text)
                if text is None or task is None or task.state not in base.FINAL_STATES:
                    # Gone, or redriven after the read above: not ours to delete.
                    pipe.zrem(self._finished, task_id)
                    deletes.append(False)
                    continue
                if (task.finished_at or 0.0) > cutoff:
                    continue
                self._held_json.pop(task_id, None)
                keys = [
                    self._record(task_id),
                    self._counts(task.pool),
                    self._finished,
                    self._index(pool=None, state=None),
                    self._index(pool=task.pool, state=None),
                    self._index(pool=None, state=task.state),
                    self._index(pool=task.pool, state=task.state),
                    f"{self._p}:idem:{task.pool}",
                ]
                args = [text, task_id, task.state, task.idempotency_key or ""]
                await self._delete_script(keys=keys, args=args, client=pipe)
                deletes.append(True)
            replies = await pipe.execute()
        return sum(1 for delete, reply in zip(deletes, replies, strict=True) if delete and reply)

    async def _backfill_finished(self) -> None:
        """Indexes final tasks stored before ``P:finished`` existed; once per Redis."""
        done_key = f"{self._finished}:backfilled"
        if await self._r.exists(done_key):
            self._finished_backfilled = True
            return
        for state in sorted(base.FINAL_STATES):
            start = "-"
            while True:
                ids: list[str] = await self._r.zrangebylex(
                    self._index(pool=None, state=state),
                    start,
                    "+",
                    start=0,
                    num=_PRUNE_BACKFILL_PAGE,
                )
                if not ids:
                    break
                async with self._r.pipeline(transaction=False) as pipe:
                    for task_id in ids:
                        pipe.hget(self._record(task_id), "task")
                    texts = await pipe.execute()
                scores = {
                    task.id: task.finished_at or 0.0
                    for task in (_load_task(text) for text in texts if text is not None)
                    if task.state in base.FINAL_STATES
                }
                if scores:
                    await self._r.zadd(self._finished, scores, nx=True)
                start = f"({ids[-1]}"
        await self._r.set(done_key, "1")
        self._finished_backfilled = True

    def start_retention(
        self, *, retention_s: float, interval_s: float = DEFAULT_INTERVAL_S
    ) -> None:
        """Prunes finished tasks every ``interval_s`` until ``close``."""
        self._retention = RetentionJob(self.prune, retention_s=retention_s, interval_s=interval_s)
        self._retention.start()

    async def close(self) -> None:
        if self._retention is not None:
            await self._retention.stop()
        await self._r.aclose()
