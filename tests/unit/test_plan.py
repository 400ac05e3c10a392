"""The plan: which workers to start, drain and stop (pure, table-driven)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.plan import Action, PlanInput, plan
from controller.registry import WorkerRecord
from controller.runtimes.base import WorkerId

HASH = "new"


def worker(
    name: str,
    *,
    state: str = "ready",
    in_flight: int = 0,
    template_hash: str = HASH,
    created_at: float = 0.0,
    draining_since: float | None = None,
) -> WorkerRecord:
    return WorkerRecord(
        worker_id=WorkerId(f"id-{name}"),
        name=name,
        pool="default",
        template_hash=template_hash,
        host="127.0.0.1",
        host_port=40000,
        concurrency=1,
        state=state,  # type: ignore[arg-type]
        healthy=state == "ready",
        in_flight=in_flight,
        created_at=created_at,
        draining_since=draining_since,
    )


def run(
    desired: int,
    workers: list[WorkerRecord],
    *,
    spawns: int = 0,
    can_spawn: bool = True,
    now: float = 100.0,
) -> list[tuple[str, str | None]]:
    actions = plan(
        PlanInput(
            desired=desired,
            workers=workers,
            template_hash=HASH,
            spawns_in_flight=spawns,
            can_spawn=can_spawn,
            drain_timeout_s=30.0,
            now=now,
        )
    )
    return [(a.kind, a.worker.name if a.worker else None) for a in actions]


@pytest.mark.parametrize(
    ("desired", "workers", "kwargs", "expected"),
    [
        pytest.param(2, [], {}, [("spawn", None)], id="one-spawn-per-pass"),
        pytest.param(2, [], {"can_spawn": False}, [], id="debounced-spawn-waits"),
        pytest.param(2, [worker("a")], {"spawns": 1}, [], id="spawn-in-flight-counts-as-live"),
        pytest.param(
            1, [worker("a"), worker("b", created_at=1)], {}, [("drain", "b")], id="newest-drains"
        ),
        pytest.param(
            1,
            [worker("busy", in_flight=1), worker("idle")],
            {},
            [("drain", "idle")],
            id="idle-drains-before-busy",
        ),
        pytest.param(
            1,
            [worker("ready", created_at=1), worker("starting", state="starting", created_at=0)],
            {},
            [("drain", "starting")],
            id="starting-drains-before-ready",
        ),
        pytest.param(
            0,
            [worker("d", state="draining", draining_since=99.0)],
            {},
            [("stop", "d")],
            id="idle-draining-worker-stops",
        ),
        pytest.param(
            0,
            [worker("d", state="draining", in_flight=1, draining_since=99.0)],
            {},
            [],
            id="busy-draining-worker-waits",
        ),
        pytest.param(
            0,
            [worker("d", state="draining", in_flight=1, draining_since=10.0)],
            {},
            [("stop", "d")],
            id="drain-timeout-stops-busy-worker",
        ),
        pytest.param(
            2,
            [worker("old1", template_hash="old"), worker("old2", template_hash="old")],
            {},
            [("spawn", None)],
            id="rollout-starts-one-surge",
        ),
        pytest.param(
            2,
            [
                worker("old1", template_hash="old"),
                worker("old2", template_hash="old"),
                worker("new1", state="starting", created_at=5),
            ],
            {},
            [],
            id="rollout-holds-while-surge-starts",
        ),
        pytest.param(
            2,
            [
                worker("old1", template_hash="old", in_flight=1),
                worker("old2", template_hash="old"),
                worker("new1", created_at=5),
            ],
            {},
            [("drain", "old2")],
            id="rollout-drains-idle-outdated-once-surge-ready",
        ),
    ],
)
def test_plan_table(
    desired: int, workers: list[WorkerRecord], kwargs: dict[str, object], expected: list[object]
) -> None:
    assert run(desired, workers, **kwargs) == expected  # type: ignore[arg-type]


_workers = st.lists(
    st.builds(
        worker,
        name=st.uuids().map(str),
        state=st.sampled_from(["starting", "ready", "draining"]),
        in_flight=st.integers(0, 3),
        template_hash=st.sampled_from([HASH, "old"]),
        created_at=st.floats(0, 100),
        draining_since=st.floats(0, 100),
    ),
    max_size=12,
)


@given(desired=st.integers(0, 10), workers=_workers, spawns=st.integers(0, 2))
def test_plan_never_stops_a_busy_worker_before_its_drain_timeout(
    desired: int, workers: list[WorkerRecord], spawns: int
) -> None:
    actions: list[Action] = plan(
        PlanInput(
            desired=desired,
            workers=workers,
            template_hash=HASH,
            spawns_in_flight=spawns,
            can_spawn=True,
            drain_timeout_s=1000.0,
            now=100.0,
        )
    )
    for action in actions:
        if action.kind == "stop":
            assert action.worker is not None
            assert action.worker.in_flight == 0
            assert action.worker.state == "draining"
    assert sum(a.kind == "spawn" for a in actions) <= 1


@given(desired=st.integers(0, 10), workers=_workers, spawns=st.integers(0, 2))
def test_plan_drains_only_down_to_desired(
    desired: int, workers: list[WorkerRecord], spawns: int
) -> None:
    actions = plan(
        PlanInput(
            desired=desired,
            workers=workers,
            template_hash=HASH,
            spawns_in_flight=spawns,
            can_spawn=True,
            drain_timeout_s=1000.0,
            now=100.0,
        )
    )
    live = sum(w.state in ("starting", "ready") for w in workers) + spawns
    drains = sum(a.kind == "drain" for a in actions)
    assert live - drains >= min(live, desired)
