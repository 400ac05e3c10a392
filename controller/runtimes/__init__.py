"""Runtimes: the adapters that start and stop workers (docker, process, fake)."""

from controller.runtimes.base import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_POOL,
    LABEL_TEMPLATE_HASH,
    ObservedWorker,
    Runtime,
    RuntimeEvent,
    WorkerId,
    WorkerSpec,
)

__all__ = [
    "LABEL_INSTANCE",
    "LABEL_MANAGED",
    "LABEL_POOL",
    "LABEL_TEMPLATE_HASH",
    "ObservedWorker",
    "Runtime",
    "RuntimeEvent",
    "WorkerId",
    "WorkerSpec",
]
