"""Task queue backends behind one contract (``controller.queues.base``)."""

from controller.queues.base import (
    FINAL_STATES,
    TASK_STATES,
    EnqueueRequest,
    QueueCounts,
    RetryPolicy,
    Task,
    TaskQueue,
    TaskState,
)

__all__ = [
    "FINAL_STATES",
    "TASK_STATES",
    "EnqueueRequest",
    "QueueCounts",
    "RetryPolicy",
    "Task",
    "TaskQueue",
    "TaskState",
]
