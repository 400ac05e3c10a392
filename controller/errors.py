"""Shoal's exception tree.

::

    ShoalError
     ├── TransientError(retry_after_s)     retry later; the loop carries on
     │    ├── RuntimeUnavailable            the container engine did not answer
     │    ├── QueueUnavailable              the queue backend did not answer
     │    └── StartFailed                   a worker could not be started (cleaned up)
     └── PermanentError                     retrying will not help; show it in status
          ├── PolicyError(source, problems) a manifest failed validation
          ├── UnknownPool                   a request named a pool nobody declared
          └── TaskNotFound

Third-party exceptions (docker, aiohttp, sqlite3, redis) are translated into
these at the boundary, in the one adapter module that talks to each, with
``raise ... from exc`` so the cause stays visible in logs.
"""

from __future__ import annotations


class ShoalError(Exception):
    """Base of every error Shoal raises on purpose."""


class TransientError(ShoalError):
    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RuntimeUnavailable(TransientError):
    pass


class QueueUnavailable(TransientError):
    pass


class StartFailed(TransientError):
    pass


class PermanentError(ShoalError):
    pass


class PolicyError(PermanentError):
    """A manifest was refused. ``problems`` are lines of ``field.path: reason``."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(f"{source}: " + "; ".join(self.problems))


class UnknownPool(PermanentError):
    def __init__(self, pool: str) -> None:
        self.pool = pool
        super().__init__(f"unknown pool {pool!r}")


class TaskNotFound(PermanentError):
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"no task with id {task_id!r}")
