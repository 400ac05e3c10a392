"""Property tests of ``decide`` over random policies and random observation sequences."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.autoscaler import Decision, History, PoolMetrics, decide
from controller.policy import PoolSpec


@st.composite
def specs(draw: st.DrawFn) -> PoolSpec:
    highest = draw(st.integers(min_value=0, max_value=40))
    lowest = draw(st.integers(min_value=0, max_value=highest))
    backlog = draw(st.one_of(st.none(), st.floats(min_value=0.25, max_value=20)))
    utilization = draw(st.floats(min_value=0.1, max_value=1.0))
    if backlog is not None:
        utilization = draw(st.one_of(st.none(), st.just(utilization)))
    scaling: dict[str, Any] = {
        "targets": {
            "backlogPerReplica": backlog,
            "utilization": utilization,
            "tolerance": draw(st.floats(min_value=0, max_value=0.5)),
        },
        "scaleUp": {
            "stabilizationWindow": draw(st.sampled_from([0, 5, 30])),
            "maxStep": draw(st.integers(min_value=1, max_value=10)),
            "period": draw(st.sampled_from([1, 15, 60])),
        },
        "scaleDown": {
            "stabilizationWindow": draw(st.sampled_from([0, 10, 60, 300])),
            "maxStep": draw(st.one_of(st.none(), st.integers(min_value=1, max_value=5))),
        },
        "scaleToZero": {"after": draw(st.sampled_from([0, 5, 120]))},
        "panic": {
            "enabled": draw(st.booleans()),
            "threshold": draw(st.floats(min_value=1.1, max_value=4)),
        },
        "predictive": {
            "enabled": draw(st.booleans()),
            "horizon": draw(st.sampled_from(["auto", 3, 30])),
        },
    }
    return PoolSpec.model_validate(
        {"replicas": {"min": lowest, "max": highest}, "scaling": scaling}
    )


@st.composite
def observations(draw: st.DrawFn) -> list[PoolMetrics]:
    concurrency = draw(st.integers(min_value=1, max_value=4))
    n_steps = draw(st.integers(min_value=1, max_value=30))
    now_s, arrivals = 0.0, 0
    steps = []
    for _ in range(n_steps):
        now_s += draw(st.sampled_from([0.0, 0.5, 1.0, 3.0, 20.0, 130.0]))
        ready = draw(st.integers(min_value=0, max_value=30))
        queued = draw(st.integers(min_value=0, max_value=200))
        arrivals += queued + draw(st.integers(min_value=0, max_value=50))
        steps.append(
            PoolMetrics(
                now_s=now_s,
                queued=queued,
                in_flight=draw(st.integers(min_value=0, max_value=ready * concurrency)),
                ready=ready,
                starting=draw(st.integers(min_value=0, max_value=5)),
                draining=draw(st.integers(min_value=0, max_value=3)),
                concurrency=concurrency,
                arrivals_total=arrivals,
                service_time_s=draw(st.one_of(st.none(), st.floats(min_value=0.01, max_value=60))),
                startup_s=draw(st.one_of(st.none(), st.floats(min_value=0.1, max_value=60))),
            )
        )
    return steps


def run(spec: PoolSpec, steps: list[PoolMetrics]) -> list[Decision]:
    history = History.empty()
    decisions = []
    for metrics in steps:
        decision = decide(spec, metrics, history)
        history = decision.history
        decisions.append(decision)
    return decisions


@settings(max_examples=300, deadline=None)
@given(spec=specs(), steps=observations())
def test_decide_desired_stays_within_min_and_max(spec: PoolSpec, steps: list[PoolMetrics]) -> None:
    for decision in run(spec, steps):
        assert spec.replicas.min <= decision.desired <= spec.replicas.max, decision.reason


@settings(max_examples=300, deadline=None)
@given(spec=specs(), steps=observations())
def test_decide_never_plans_to_stop_a_busy_worker(spec: PoolSpec, steps: list[PoolMetrics]) -> None:
    """Within max, desired covers every worker that has a task in flight."""
    for metrics, decision in zip(steps, run(spec, steps), strict=True):
        busy = math.ceil(metrics.in_flight / metrics.concurrency)
        assert decision.desired >= min(busy, spec.replicas.max), decision.reason


@settings(max_examples=300, deadline=None)
@given(spec=specs(), steps=observations())
def test_decide_wakes_a_pool_at_zero_on_the_first_queued_task(
    spec: PoolSpec, steps: list[PoolMetrics]
) -> None:
    for metrics, decision in zip(steps, run(spec, steps), strict=True):
        if metrics.queued > 0 and spec.replicas.max > 0:
            assert decision.desired >= 1, decision.reason


@settings(max_examples=100, deadline=None)
@given(spec=specs(), steps=observations())
def test_decide_is_a_pure_function_of_its_inputs(spec: PoolSpec, steps: list[PoolMetrics]) -> None:
    assert run(spec, steps) == run(spec, steps)
