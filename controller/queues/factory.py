"""Turns a queue URL from the configuration into an open ``TaskQueue``.

It owns URL parsing and backend choice only; each backend owns its storage.
Called once at controller start-up (and by tests and ``hack/`` scripts).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from controller.queues.base import TaskQueue
from controller.queues.retention import parse_duration_s

if TYPE_CHECKING:
    from controller.queues.memory import MemoryQueue
    from controller.queues.redis import RedisQueue
    from controller.queues.sqlite import SqliteQueue

logger = logging.getLogger(__name__)

DEFAULT_SQLITE_FILE = "queue.db"


async def open_queue(
    url: str,
    *,
    state_dir: Path,
    clock: Callable[[], float] = time.time,
    task_retention: str | float | None = None,
) -> TaskQueue:
    """Opens the backend ``url`` names; ``await`` it, then ``close()`` when done.

    ``memory://``; ``sqlite://`` (``state_dir/queue.db``) or ``sqlite:///abs/path.db``;
    ``redis://host:port/db``. Anything else raises ``ValueError``.

    ``task_retention`` (seconds, or text such as ``"7d"``; 0 or None: keep every
    task) starts the job that prunes finished tasks that much older; the queue's
    ``close`` stops it. A retention that does not parse raises ``ValueError``.
    """
    retention_s = (
        parse_duration_s(task_retention)
        if isinstance(task_retention, str)
        else float(task_retention or 0.0)
    )
    queue = await _open(url, state_dir=state_dir, clock=clock)
    if retention_s > 0:
        queue.start_retention(retention_s=retention_s)
        logger.info("finished tasks are pruned %s s after they finish", retention_s)
    return queue


async def _open(
    url: str,
    *,
    state_dir: Path,
    clock: Callable[[], float],
) -> MemoryQueue | SqliteQueue | RedisQueue:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        if parts.netloc or parts.path not in ("", "/"):
            raise ValueError(f"queue URL {url!r}: memory:// takes no host or path")
        from controller.queues.memory import MemoryQueue

        return MemoryQueue(clock=clock)
    if scheme == "sqlite":
        return await _open_sqlite(url, parts.netloc, parts.path, state_dir=state_dir, clock=clock)
    if scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ValueError(
                f"queue URL {url!r}: redis:// needs a host, e.g. redis://127.0.0.1:6379/0"
            )
        from controller.queues.redis import RedisQueue

        return await RedisQueue.open(url, clock=clock)
    raise ValueError(
        f"queue URL {url!r}: unknown scheme {parts.scheme!r}; "
        "use memory://, sqlite:///abs/path.db, sqlite:// or redis://host:port/db"
    )


async def _open_sqlite(
    url: str,
    netloc: str,
    path: str,
    *,
    state_dir: Path,
    clock: Callable[[], float],
) -> SqliteQueue:
    from controller.queues.sqlite import SqliteQueue

    if netloc:
        raise ValueError(
            f"queue URL {url!r}: sqlite URLs take an absolute path after three slashes, "
            "e.g. sqlite:///var/lib/shoal/queue.db"
        )
    if path in ("", "/"):
        file = state_dir / DEFAULT_SQLITE_FILE
    elif path.endswith("/"):
        raise ValueError(f"queue URL {url!r}: the path names a folder, not a file")
    else:
        file = Path(path)
    return await SqliteQueue.open(file, clock=clock)
