"""The seam between Shoal and whatever runs worker containers.

A runtime starts, stops and lists workers, and tells when one of them changes.
It knows nothing of policies or queues: the reconciler decides how many, the
runtime only does what it is asked and reports what is there. Ownership is the
labels below; a runtime never touches anything without ``shoal.managed=true``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, NewType, Protocol

WorkerId = NewType("WorkerId", str)

LABEL_MANAGED = "shoal.managed"
LABEL_POOL = "shoal.pool"
LABEL_TEMPLATE_HASH = "shoal.template-hash"
LABEL_INSTANCE = "shoal.instance"

# The engine's view of a worker, simplified: running is the only state in which
# a worker can be probed; everything else is on its way in or out.
EngineState = Literal["created", "running", "exited", "unknown"]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a runtime needs to start one worker."""

    pool: str
    name: str
    image: str
    port: int
    concurrency: int
    template_hash: str
    env: Mapping[str, str] = field(default_factory=dict)
    memory_bytes: int | None = None
    cpus: float | None = None
    pids: int | None = None
    # Extra labels (e.g. the test run's own) added beside Shoal's.
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ObservedWorker:
    """One worker as the runtime sees it now (a snapshot, never mutated)."""

    worker_id: WorkerId  # the container id (docker) or "proc-<pid>" (process runtime)
    name: str
    pool: str
    template_hash: str
    engine_state: EngineState
    host: str = "127.0.0.1"
    host_port: int | None = None
    started_at: float | None = None  # unix time
    exit_code: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def short_id(self) -> str:
        return self.worker_id[:12]


@dataclass(frozen=True)
class RuntimeEvent:
    """A hint that something changed; the receiver re-lists (level-triggered)."""

    worker_id: WorkerId
    action: str  # "start", "die", "destroy", ...


class Runtime(Protocol):
    """Starts and stops workers. Every method may raise ``TransientError``."""

    name: str

    async def start(self, spec: WorkerSpec) -> ObservedWorker:
        """Starts a worker and returns it once its host port is known.

        On failure it leaves nothing behind (no created or exited container)
        and raises ``StartFailed``.
        """
        ...

    async def stop(self, worker_id: WorkerId, *, grace_s: float) -> None:
        """Asks the worker to stop (SIGTERM), kills it after ``grace_s``, removes it.

        Stopping a worker that is already gone is not an error.
        """
        ...

    async def list(self) -> list[ObservedWorker]:
        """Every Shoal-managed worker of this runtime's instance, in any engine state."""
        ...

    def events(self) -> AsyncIterator[RuntimeEvent]:
        """Yields hints that a worker changed. Ends when the runtime closes."""
        ...

    async def close(self) -> None: ...
