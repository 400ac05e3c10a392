"""Task queue backends behind one contract (``controller.queues.base``)."""

from controller.queues.base import (
    FINAL_STATES,
    TASK_STATES,
    EnqueueRequest,
    IdempotencyConflict,
    QueueCounts,
    RetryPolicy,
    Task,
    TaskQueue,
    TaskState,
)
from controller.queues.factory import open_queue

__all__ = [
    "FINAL_STATES",
    "TASK_STATES",
    "EnqueueRequest",
    "IdempotencyConflict",
    "QueueCounts",
    "RetryPolicy",
    "Task",
    "TaskQueue",
    "TaskState",
    "open_queue",
]
