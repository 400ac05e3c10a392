"""Per-pool state the reconciler keeps between passes, and the status built from it.

The reconciler owns and mutates ``PoolRuntimeState``; nothing here does I/O.
``pool_status`` renders what ``/autoscaler-status`` and the dashboard show.
NB: this state is a memory of past passes (history, back-offs, measurements),
never the truth about workers: that is the registry, rebuilt from the engine.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.autoscaler import Decision, History
from controller.policy import WorkerPool
from controller.queues.base import QueueCounts
from controller.registry import WorkerRecord


@dataclass(frozen=True)
class ScalingEvent:
    time: float  # unix
    pool: str
    from_replicas: int
    to_replicas: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "pool": self.pool,
            "from": self.from_replicas,
            "to": self.to_replicas,
            "reason": self.reason,
        }


@dataclass
class PoolRuntimeState:
    """What the reconciler keeps per pool between passes (never the truth about workers)."""

    history: History = field(default_factory=History.empty)
    desired: int | None = None
    decision: Decision | None = None
    decided_at: float | None = None
    pending_spawns: dict[str, float] = field(default_factory=dict)  # name -> monotonic start
    last_spawn_at: float = -math.inf  # monotonic
    spawn_failures: int = 0
    backoff_until: float = -math.inf  # monotonic
    crashes: collections.deque[float] = field(default_factory=collections.deque)
    last_error: str | None = None
    startup_s: float | None = None  # EWMA of spawn -> ready
    service_time_s: float | None = None  # EWMA of task run time
    counts: QueueCounts = field(default_factory=QueueCounts)
    # Synchronous traffic (the balancer's activator) that wants a worker until then.
    demand_until: float = -math.inf  # monotonic
    # The balancer's requests in flight, counted as work until ``sync_until``.
    sync_in_flight: int = 0
    sync_until: float = -math.inf  # monotonic


def ewma(previous: float | None, sample: float, *, alpha: float = 0.3) -> float:
    return sample if previous is None else previous + alpha * (sample - previous)


def pool_status(
    name: str,
    *,
    pool: WorkerPool | None,
    state: PoolRuntimeState,
    workers: Sequence[WorkerRecord],
    now: float,
) -> dict[str, Any]:
    decision = state.decision
    by_state = collections.Counter(w.state for w in workers)
    return {
        "pool": name,
        "declared": pool is not None,
        "replicas": (
            {"min": pool.spec.replicas.min, "max": pool.spec.replicas.max} if pool else None
        ),
        "desired": state.desired,
        "ready": by_state.get("ready", 0),
        "starting": by_state.get("starting", 0) + len(state.pending_spawns),
        "draining": by_state.get("draining", 0),
        "spawnsInFlight": len(state.pending_spawns),
        "queue": state.counts.to_json(),
        "lastDecision": (
            {
                "desired": decision.desired,
                "reason": decision.reason,
                "at": state.decided_at,
                "panic": decision.panic,
                "forecastRatePerS": decision.forecast_rate_per_s,
                "forecastReplicas": decision.forecast_replicas,
            }
            if decision is not None
            else None
        ),
        "panic": decision.panic if decision is not None else False,
        "startupS": state.startup_s,
        "serviceTimeS": state.service_time_s,
        "backoffS": max(0.0, state.backoff_until - now),
        "lastError": state.last_error,
        "templateHash": pool.spec.template.template_hash() if pool else None,
    }
