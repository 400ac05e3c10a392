"""Task retention: the periodic job that prunes finished tasks from a queue.

It owns the schedule only (when to prune, in what batches, what to log); each
backend's ``prune`` decides atomically what may go: a task in a final state
(succeeded, failed, dead, cancelled) whose ``finished_at`` is at least the
retention ago. Queued and running tasks are never touched. A redriven task is
queued again, so it stays until it finishes anew. Once a task is pruned its
idempotency key is free for a new task.

``controller.queues.factory.open_queue`` starts it when given a retention, and
the backend's ``close`` stops it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from controller.errors import TransientError

logger = logging.getLogger(__name__)

DEFAULT_TASK_RETENTION_S = 7 * 24 * 3600.0
DEFAULT_INTERVAL_S = 60.0
# Small batches: each is one short transaction or script, so enqueues and leases
# never wait long behind a prune.
DEFAULT_BATCH_SIZE = 500
# Most batches one tick runs; a backlog (the first start on a big queue) drains
# over several ticks instead of holding the queue busy for minutes.
MAX_BATCHES_PER_TICK = 20

Prune = Callable[..., Awaitable[int]]


def parse_duration_s(text: str) -> float:
    """``"7d"``, ``"24h"``, ``"30m"``, ``"90s"`` or plain seconds; ``"0"`` disables retention.

    Raises ``ValueError`` for anything else (negative included).
    """
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    cleaned = text.strip().lower()
    factor = units.get(cleaned[-1:], None)
    number = cleaned[:-1] if factor is not None else cleaned
    try:
        value = float(number) * (factor or 1.0)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a duration like 7d, 24h, 30m or 3600") from exc
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{text!r}: a retention is zero (off) or a positive duration")
    return value


class RetentionJob:
    """Calls ``prune`` every ``interval_s``, in batches, until a batch comes back short."""

    def __init__(
        self,
        prune: Prune,
        *,
        retention_s: float,
        interval_s: float = DEFAULT_INTERVAL_S,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        self._prune = prune
        self.retention_s = retention_s
        self.interval_s = interval_s
        self.batch_size = batch_size
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts the loop on the running event loop; a second call does nothing."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="task-retention")

    async def stop(self) -> None:
        """Cancels the loop and waits for it. Idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise

    async def run_once(self) -> int:
        """One tick: prunes up to ``MAX_BATCHES_PER_TICK`` batches; returns how many tasks went."""
        total = 0
        for _ in range(MAX_BATCHES_PER_TICK):
            pruned = await self._prune(retention_s=self.retention_s, limit=self.batch_size)
            total += pruned
            if pruned < self.batch_size:
                break
            # Let enqueues and leases in between two batches.
            await asyncio.sleep(0)
        return total

    async def _run(self) -> None:
        while True:
            try:
                pruned = await self.run_once()
            except TransientError as exc:
                logger.warning("pruning finished tasks failed, retrying next tick: %s", exc)
            except Exception:  # the job must outlive a bad tick
                logger.exception("pruning finished tasks failed")
            else:
                if pruned:
                    logger.info(
                        "pruned %d finished task(s) older than %s s", pruned, self.retention_s
                    )
            await asyncio.sleep(self.interval_s)
