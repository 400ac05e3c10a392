"""Table-driven tests of ``controller.autoscaler.decide``, one row per rule.

Each case is a policy (a manifest's ``spec``, partially), a list of observations fed to
``decide`` in order with the history threaded through, and what the last ``Decision`` must
say. Time is the injected ``now_s``; nothing sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from controller.autoscaler import Decision, History, PoolMetrics, decide
from controller.policy import PoolSpec

NO_PANIC: dict[str, Any] = {"panic": {"enabled": False}}


def make_spec(
    *, replicas: dict[str, int] | None = None, scaling: dict[str, Any] | None = None
) -> PoolSpec:
    return PoolSpec.model_validate(
        {"replicas": replicas or {"min": 0, "max": 32}, "scaling": scaling or {}}
    )


def observe(now_s: float, **fields: Any) -> PoolMetrics:
    values: dict[str, Any] = {
        "queued": 0,
        "in_flight": 0,
        "ready": 0,
        "starting": 0,
        "draining": 0,
        "concurrency": 1,
        "arrivals_total": 0,
    }
    values.update(fields)
    return PoolMetrics(now_s=now_s, **values)


def run(spec: PoolSpec, observations: list[PoolMetrics]) -> list[Decision]:
    history = History.empty()
    decisions = []
    for metrics in observations:
        decision = decide(spec, metrics, history)
        history = decision.history
        decisions.append(decision)
    return decisions


@dataclass(frozen=True)
class Case:
    id: str
    spec: PoolSpec
    steps: list[PoolMetrics]
    desired: int
    reason: str = ""
    panic: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _idle_after_busy(times_s: list[float], *, ready: int) -> list[PoolMetrics]:
    """A pool that had 2 tasks per worker at t=0 and nothing at each later time."""
    first = observe(0.0, queued=ready, in_flight=ready, ready=ready)
    return [first] + [observe(t, ready=ready) for t in times_s]


CASES = [
    Case(
        "backlog-per-replica",
        make_spec(scaling=NO_PANIC),
        [observe(0, queued=6, in_flight=2, ready=2)],
        desired=4,
        reason="backlog 8 / 2 per replica -> 4",
    ),
    Case(
        "backlog-rounds-up",
        make_spec(scaling=NO_PANIC),
        [observe(0, queued=4, in_flight=3, ready=4)],
        desired=4,
    ),
    Case(
        "clamped-to-max",
        make_spec(replicas={"min": 0, "max": 5}, scaling=NO_PANIC),
        [observe(0, queued=40, in_flight=4, ready=4)],
        desired=5,
        reason="clamped to [0, 5]",
    ),
    Case(
        "clamped-to-min",
        make_spec(replicas={"min": 3, "max": 8}),
        [observe(0, ready=3)],
        desired=3,
    ),
    Case(
        "max-zero-is-zero",
        make_spec(replicas={"min": 0, "max": 0}),
        [observe(0, queued=10)],
        desired=0,
    ),
    Case(
        "tolerance-keeps-current",
        make_spec(scaling=NO_PANIC),
        [observe(0, queued=8, in_flight=10, ready=10)],
        desired=10,
        reason="within tolerance",
    ),
    Case(
        "utilization-hpa-formula",
        make_spec(
            scaling={
                "targets": {"backlogPerReplica": None, "utilization": 0.5},
                "scaleUp": {"maxStep": 8},
                **NO_PANIC,
            }
        ),
        [observe(0, in_flight=4, ready=4)],
        desired=8,
        reason="utilization 100% / target 50% -> 8",
    ),
    Case(
        "utilization-within-tolerance",
        make_spec(scaling={"targets": {"backlogPerReplica": None, "utilization": 0.7}}),
        [observe(0, in_flight=7, ready=10)],
        desired=10,
        reason="within tolerance",
    ),
    Case(
        "max-over-metrics",
        make_spec(
            scaling={
                "targets": {"backlogPerReplica": 4, "utilization": 0.5},
                **NO_PANIC,
            }
        ),
        [observe(0, queued=0, in_flight=6, ready=6)],
        desired=10,
        extra={"recommendations": (("backlog", 2), ("utilization", 12), ("busy", 6))},
    ),
    Case(
        "scale-up-capped-by-max-step",
        make_spec(scaling=NO_PANIC),
        [observe(0, queued=38, in_flight=2, ready=2)],
        desired=6,
        reason="capped by maxStep 4 per 15s -> 6",
    ),
    Case(
        "max-step-counts-the-whole-period",
        make_spec(scaling=NO_PANIC),
        [
            observe(0, queued=38, in_flight=2, ready=2),
            observe(5, queued=36, in_flight=4, ready=4, starting=2),
        ],
        desired=6,
    ),
    Case(
        "max-step-renews-after-period",
        make_spec(scaling=NO_PANIC),
        [
            observe(0, queued=38, in_flight=2, ready=2),
            observe(16, queued=34, in_flight=6, ready=6),
        ],
        desired=10,
    ),
    Case(
        "scale-up-stabilization-takes-window-minimum",
        make_spec(scaling={"scaleUp": {"stabilizationWindow": "10s"}, **NO_PANIC}),
        [
            observe(0, queued=2, in_flight=2, ready=2),
            observe(5, queued=6, in_flight=2, ready=2),
        ],
        desired=2,
        reason="held at 2 by the 10s scale-up window",
    ),
    Case(
        "scale-up-stabilization-lets-go-after-window",
        make_spec(scaling={"scaleUp": {"stabilizationWindow": "10s"}, **NO_PANIC}),
        [
            observe(0, queued=2, in_flight=2, ready=2),
            observe(5, queued=6, in_flight=2, ready=2),
            observe(11, queued=6, in_flight=2, ready=2),
        ],
        desired=4,
    ),
    Case(
        "scale-down-held-by-window",
        make_spec(replicas={"min": 1, "max": 32}),
        _idle_after_busy([30.0], ready=8),
        desired=8,
        reason="held at 8 by the 60s scale-down window",
    ),
    Case(
        "scale-down-after-window",
        make_spec(replicas={"min": 1, "max": 32}),
        _idle_after_busy([30.0, 61.0], ready=8),
        desired=1,
    ),
    Case(
        "scale-down-window-keeps-highest-recent",
        make_spec(replicas={"min": 1, "max": 32}),
        [
            observe(0, queued=8, in_flight=8, ready=8),
            observe(30, queued=4, in_flight=4, ready=8),
            observe(61, ready=8),
        ],
        desired=4,
    ),
    Case(
        "scale-down-one-step-per-period",
        make_spec(
            replicas={"min": 1, "max": 32}, scaling={"scaleDown": {"stabilizationWindow": 0}}
        ),
        [
            observe(0, queued=8, in_flight=8, ready=8),
            observe(1, queued=2, in_flight=4, ready=8),
            observe(5, in_flight=1, ready=4),
        ],
        desired=4,
        reason="next scale-down in 11s (one per 15s)",
    ),
    Case(
        "scale-down-next-step-after-period",
        make_spec(
            replicas={"min": 1, "max": 32}, scaling={"scaleDown": {"stabilizationWindow": 0}}
        ),
        [
            observe(0, queued=8, in_flight=8, ready=8),
            observe(1, queued=2, in_flight=4, ready=8),
            observe(16, in_flight=1, ready=6),
        ],
        desired=1,
    ),
    Case(
        "scale-down-max-step",
        make_spec(
            replicas={"min": 1, "max": 32},
            scaling={"scaleDown": {"stabilizationWindow": 0, "maxStep": 2}},
        ),
        _idle_after_busy([1.0], ready=8),
        desired=6,
        reason="scale-down capped by maxStep 2 per 15s -> 6",
    ),
    Case(
        "panic-scales-up-at-once-past-max-step",
        make_spec(),
        [observe(0, queued=50, in_flight=2, ready=2)],
        desired=26,
        reason="panic: demand 26 >= 2 x 2",
        panic=True,
    ),
    Case(
        "panic-sees-demand-beyond-max",
        make_spec(replicas={"min": 0, "max": 12}),
        [observe(0, queued=30, in_flight=10, ready=10)],
        desired=12,
        reason="panic: demand 20 >= 2 x 10",
        panic=True,
    ),
    Case(
        "panic-forbids-scale-down",
        make_spec(scaling={"scaleDown": {"stabilizationWindow": 0}}),
        [
            observe(0, queued=50, in_flight=2, ready=2),
            observe(3, queued=0, in_flight=2, ready=26),
        ],
        desired=26,
        reason="panic: holding 26",
        panic=True,
    ),
    Case(
        "panic-ends-after-window",
        make_spec(scaling={"scaleDown": {"stabilizationWindow": 0}}),
        [
            observe(0, queued=50, in_flight=2, ready=2),
            observe(7, queued=0, in_flight=2, ready=26),
        ],
        desired=2,
    ),
    Case(
        "below-threshold-is-no-panic",
        make_spec(scaling={"scaleUp": {"maxStep": 1}}),
        [observe(0, queued=8, in_flight=4, ready=4)],
        desired=5,
        reason="capped by maxStep 1",
    ),
    Case(
        "scale-to-zero-waits-idle-period",
        make_spec(),
        _idle_after_busy([30.0, 61.0, 119.0], ready=2),
        desired=1,
        reason="idle 119s of 120s before scaling to zero",
    ),
    Case(
        "scale-to-zero-after-idle-period",
        make_spec(),
        _idle_after_busy([30.0, 61.0, 119.0, 120.0], ready=2),
        desired=0,
    ),
    Case(
        "scale-to-zero-needs-no-in-flight",
        make_spec(scaling={"scaleDown": {"stabilizationWindow": 0}, "scaleToZero": {"after": 0}}),
        [observe(0, in_flight=1, ready=1), observe(200, in_flight=1, ready=1)],
        desired=1,
    ),
    Case(
        "first-task-wakes-pool-at-zero",
        make_spec(
            scaling={
                "scaleUp": {"stabilizationWindow": "30s", "maxStep": 1},
                "targets": {"backlogPerReplica": 5},
                **NO_PANIC,
            }
        ),
        [observe(0), observe(1), observe(2, queued=1)],
        desired=1,
        reason="a queued task wakes the pool",
    ),
    Case(
        "busy-floor",
        make_spec(replicas={"min": 0, "max": 32}, scaling={"targets": {"backlogPerReplica": 10}}),
        [observe(0, in_flight=6, ready=3, concurrency=2)],
        desired=3,
        reason="6 in flight keep 3 workers busy",
    ),
    Case(
        "busy-floor-beats-stabilized-scale-down",
        make_spec(
            replicas={"min": 0, "max": 32},
            scaling={"scaleDown": {"stabilizationWindow": 0, "maxStep": 8}},
        ),
        [observe(0, in_flight=8, ready=8), observe(1, in_flight=5, ready=8)],
        desired=5,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decide_follows_rule(case: Case) -> None:
    last = run(case.spec, case.steps)[-1]

    assert last.desired == case.desired, last.reason
    assert case.reason in last.reason
    assert last.panic == case.panic
    for name, value in case.extra.items():
        assert getattr(last, name) == value


def test_decide_burst_raises_desired_on_the_same_call() -> None:
    """50 tasks in one second: the very next call asks for more replicas."""
    spec = make_spec()
    steady = observe(0, queued=0, in_flight=1, ready=1, arrivals_total=10)
    burst = observe(1, queued=50, in_flight=1, ready=1, arrivals_total=60)

    before, after = run(spec, [steady, burst])

    assert before.desired == 1
    assert after.desired == 26
    assert after.panic


def test_decide_predictive_forecast_leads_reactive_answer() -> None:
    """A rising arrival rate is met ahead of the backlog, by Little's law."""
    spec = make_spec(scaling={"predictive": {"enabled": True, "horizon": "10s"}, **NO_PANIC})
    # Rate grows by 1/s each second; each task takes 2 s; the queue is kept empty.
    steps = []
    total = 0
    for second in range(12):
        total += second
        steps.append(
            observe(
                float(second),
                in_flight=2,
                ready=4,
                arrivals_total=total,
                service_time_s=2.0,
            )
        )
    reactive_only = run(make_spec(scaling=NO_PANIC), steps)[-1]
    predictive = run(spec, steps)[-1]

    assert predictive.forecast_rate_per_s is not None
    assert predictive.forecast_rate_per_s > 11.0
    assert predictive.forecast_replicas is not None
    assert predictive.forecast_replicas >= 22
    assert predictive.desired > reactive_only.desired
    assert "forecast" in predictive.reason


def test_decide_forecast_never_lowers_reactive_answer() -> None:
    spec = make_spec(scaling={"predictive": {"enabled": True}, **NO_PANIC})
    steps = [
        observe(float(t), queued=10, in_flight=4, ready=7, arrivals_total=0, service_time_s=1.0)
        for t in range(5)
    ]

    last = run(spec, steps)[-1]

    assert last.forecast_replicas == 0
    assert last.desired == 7


def test_decide_horizon_auto_uses_measured_startup() -> None:
    """A slow-starting worker makes the forecast look further along a rising trend."""
    spec = make_spec(scaling={"predictive": {"enabled": True}})

    def rising(startup_s: float) -> list[PoolMetrics]:
        return [
            observe(
                float(t), ready=2, arrivals_total=t * t, service_time_s=1.0, startup_s=startup_s
            )
            for t in range(6)
        ]

    slow = run(spec, rising(30.0))[-1].forecast_rate_per_s
    fast = run(spec, rising(1.0))[-1].forecast_rate_per_s

    assert slow is not None and fast is not None
    assert slow > fast


def test_decide_is_deterministic() -> None:
    spec = make_spec(scaling={"predictive": {"enabled": True}})
    steps = [
        observe(float(t), queued=t % 7, in_flight=t % 3, ready=2, arrivals_total=t * 3)
        for t in range(30)
    ]

    first = run(spec, steps)
    second = run(spec, steps)

    assert first == second


def test_decide_history_is_pruned_to_longest_window() -> None:
    spec = make_spec()
    steps = [observe(float(t), queued=1, ready=1) for t in range(500)]

    history = run(spec, steps)[-1].history

    assert len(history.recommendations) <= 61
    assert len(history.before) <= 61


def test_decide_first_call_over_adopted_workers_waits_for_the_scale_down_window() -> None:
    """After a restart, idle adopted workers go as they would have: not at once (as HPA)."""
    spec = make_spec(
        replicas={"min": 1, "max": 8},
        scaling={**NO_PANIC, "scaleDown": {"stabilizationWindow": "30s"}},
    )
    first, at_29s, at_31s = run(
        spec, [observe(0.0, ready=4), observe(29.0, ready=4), observe(31.0, ready=4)]
    )
    assert (first.desired, at_29s.desired) == (4, 4)
    assert "held at 4 by the 30s scale-down window" in first.reason
    assert at_31s.desired < 4


def test_decide_first_call_scales_up_at_once() -> None:
    spec = make_spec(scaling=NO_PANIC)
    (first,) = run(spec, [observe(0.0, queued=12, ready=2)])
    assert first.desired == 6


def test_decide_recent_synchronous_requests_keep_the_pool_from_zero() -> None:
    """A balancer request that came and went between two decisions still counts as work."""
    spec = make_spec(
        replicas={"min": 0, "max": 4},
        scaling={
            **NO_PANIC,
            "scaleToZero": {"after": "60s"},
            "scaleDown": {"stabilizationWindow": "0s"},
        },
    )
    decisions = run(
        spec,
        [
            observe(0.0, ready=1, sync_active=True),
            observe(40.0, ready=1, sync_active=True),
            observe(90.0, ready=1),
            observe(101.0, ready=1),
        ],
    )
    assert [d.desired for d in decisions] == [1, 1, 1, 0]
    assert "idle 50s of 60s before scaling to zero" in decisions[2].reason
