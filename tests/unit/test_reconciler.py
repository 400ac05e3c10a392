"""The reconciler against a fake runtime: single-flight spawns, adoption, crashes, removal.

Time is a variable the test moves; nothing sleeps.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controller.queues.base import EnqueueRequest
from controller.queues.memory import MemoryQueue
from controller.reconciler import Reconciler
from controller.registry import Registry
from controller.runtimes.base import WorkerSpec
from controller.runtimes.fake import FakeRuntime
from controller.store import PolicyStore

POOL = """
apiVersion: shoal/v1
kind: WorkerPool
metadata: {{name: {name}}}
spec:
  replicas: {{min: {min}, max: {max}}}
  template: {{image: shoal/worker:latest, concurrency: 1}}
  scaling:
    targets: {{backlogPerReplica: 1}}
    spawn: {{maxInFlight: 1, minInterval: 1s}}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, tmp_path: Path, manifest: str) -> None:
        self.path = tmp_path / "pool.yaml"
        self.path.write_text(manifest)
        self.clock = Clock()
        self.store = PolicyStore(self.path)
        self.store.load()
        self.registry = Registry(clock=self.clock)
        self.runtime = FakeRuntime()
        self.queue = MemoryQueue(clock=self.clock)
        self.arrivals = 0
        self.reconciler = Reconciler(
            store=self.store,
            registry=self.registry,
            runtime=self.runtime,
            queue=self.queue,
            arrivals=lambda _pool: self.arrivals,
            clock=self.clock,
            wall_clock=self.clock,
        )

    async def enqueue(self, n: int, pool: str = "default") -> None:
        for i in range(n):
            await self.queue.enqueue(EnqueueRequest(pool=pool, payload=i))
            self.arrivals += 1

    async def settle(self) -> None:
        """Lets background spawns and stops finish (the fake runtime answers at once)."""
        for _ in range(5):
            await asyncio.sleep(0)

    async def pass_(self) -> None:
        await self.reconciler.reconcile()
        await self.settle()


def manifest(name: str = "default", *, min: int = 0, max: int = 4) -> str:
    return POOL.format(name=name, min=min, max=max)


async def test_spawns_are_single_flight_and_one_interval_apart(tmp_path: Path) -> None:
    rig = Rig(tmp_path, manifest(max=4))
    await rig.enqueue(8)

    await rig.pass_()
    assert len(rig.runtime.started()) == 1

    rig.clock.now += 0.5
    await rig.pass_()
    assert len(rig.runtime.started()) == 1, "a second spawn within minInterval"

    rig.clock.now += 0.5
    await rig.pass_()
    assert len(rig.runtime.started()) == 2


async def test_a_start_in_flight_holds_the_next_one(tmp_path: Path) -> None:
    rig = Rig(tmp_path, manifest(max=4))
    rig.runtime.start_gate = asyncio.Event()
    await rig.enqueue(8)

    await rig.pass_()
    rig.clock.now += 5
    await rig.pass_()
    assert rig.runtime.starts_in_flight == 1
    assert len(rig.runtime.started()) == 1

    rig.runtime.start_gate.set()
    await rig.settle()
    rig.clock.now += 5
    await rig.pass_()
    assert len(rig.runtime.started()) == 2


async def test_adopted_workers_are_counted_and_nothing_extra_starts(tmp_path: Path) -> None:
    rig = Rig(tmp_path, manifest(max=4))
    template_hash = rig.store.pools["default"].spec.template.template_hash()
    for i in range(3):
        rig.runtime.seed(
            WorkerSpec(
                pool="default",
                name=f"shoal-default-old{i}",
                image="shoal/worker:latest",
                port=8080,
                concurrency=1,
                template_hash=template_hash,
            )
        )
    await rig.enqueue(3)

    await rig.reconciler.relist()
    await rig.pass_()

    assert len(rig.registry.list("default")) == 3
    assert rig.runtime.started() == []


async def test_a_worker_that_keeps_crashing_young_backs_off(tmp_path: Path) -> None:
    rig = Rig(tmp_path, manifest(max=1))
    await rig.enqueue(1)
    delays = []
    for _ in range(4):
        rig.clock.now += 1.0
        await rig.pass_()
        [record] = rig.registry.list("default")
        rig.runtime.crash(record.worker_id)
        await rig.reconciler.relist()
        delays.append(rig.reconciler.pools["default"].backoff_until - rig.clock.now)
        rig.clock.now = max(rig.clock.now, rig.reconciler.pools["default"].backoff_until)

    assert delays[0] <= 0, "the first crash is replaced at once"
    assert delays[1] > 0
    assert delays[3] > delays[2] > delays[1], delays


async def test_a_worker_killed_after_doing_work_is_replaced_without_back_off(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, manifest(max=1))
    await rig.enqueue(1)
    for _ in range(3):
        rig.clock.now += 1.0
        await rig.pass_()
        [record] = rig.registry.list("default")
        rig.registry.mark_ready(record.worker_id)
        rig.clock.now += 60.0  # it lived a while
        rig.runtime.crash(record.worker_id)
        await rig.reconciler.relist()
        assert rig.reconciler.pools["default"].backoff_until <= rig.clock.now


async def test_our_own_stop_is_not_counted_as_a_crash(tmp_path: Path) -> None:
    rig = Rig(tmp_path, manifest(max=2))
    await rig.enqueue(2)
    for _ in range(2):
        rig.clock.now += 1.0
        await rig.pass_()
    records = rig.registry.list("default")
    assert len(records) == 2

    # Scale in: nothing queued any more.
    while (task := await rig.queue.lease("default", worker="w", lease_s=60)) is not None:
        await rig.queue.ack(task.id, worker="w", result=None)
    rig.store.path.write_text(manifest(max=0))
    rig.store.reload()
    for _ in range(3):
        rig.clock.now += 1.0
        await rig.pass_()
    await rig.reconciler.relist()

    assert rig.registry.list("default") == []
    assert not rig.reconciler.pools["default"].crashes


async def test_workers_of_a_removed_pool_drain_and_stop(tmp_path: Path) -> None:
    rig = Rig(tmp_path, manifest("a", max=2) + "---" + manifest("b", max=2))
    await rig.enqueue(1, pool="b")
    rig.clock.now += 1
    await rig.pass_()
    [record] = rig.registry.list("b")

    rig.store.path.write_text(manifest("a", max=2))
    assert rig.store.reload()
    await rig.pass_()
    await rig.pass_()

    assert rig.registry.get(record.worker_id) is None
    assert record.worker_id in rig.runtime.stopped()


async def test_an_invalid_edit_keeps_the_last_good_policy(tmp_path: Path) -> None:
    rig = Rig(tmp_path, manifest(max=3))
    rig.store.path.write_text(
        "apiVersion: shoal/v1\nkind: WorkerPool\nmetadata: {name: default}\n"
        "spec: {replicas: {min: 5, max: 2}}\n"
    )
    assert not rig.store.reload()
    assert rig.store.get("default") is not None
    assert rig.store.get("default").spec.replicas.max == 3  # type: ignore[union-attr]
    assert rig.store.error is not None
    assert any("min (5) is greater than max (2)" in p for p in rig.store.error.problems)


@pytest.mark.parametrize("max_replicas", [0, 1])
async def test_request_capacity_wakes_a_pool_at_zero_unless_max_is_zero(
    tmp_path: Path, max_replicas: int
) -> None:
    rig = Rig(tmp_path, manifest(max=max_replicas))
    granted = rig.reconciler.request_capacity("default")
    await rig.pass_()
    assert granted is (max_replicas > 0)
    assert len(rig.runtime.started()) == max_replicas


async def test_a_pool_woken_by_the_activator_stays_up_for_scale_to_zero_after(
    tmp_path: Path,
) -> None:
    """The activator's ask lasts 2 s; the worker it woke must last scaleToZero.after."""
    rig = Rig(tmp_path, manifest(max=2))
    assert rig.reconciler.request_capacity("default", hold_s=2.0)
    await rig.pass_()
    [worker] = rig.registry.list("default")
    rig.registry.mark_ready(worker.worker_id)
    rig.clock.now += 5.0  # the ask lapsed; the pool has been idle since
    await rig.pass_()
    state = rig.reconciler.pools["default"]
    assert state.desired == 1 and state.decision is not None
    assert "before scaling to zero" in state.decision.reason
    for _ in range(3):  # past scaleToZero.after and the default scale-down window
        rig.clock.now += 300.0
        await rig.pass_()
    assert rig.reconciler.pools["default"].desired == 0


async def test_balancer_load_counts_as_work_in_flight_until_it_lapses(tmp_path: Path) -> None:
    rig = Rig(tmp_path, manifest(max=4))
    rig.reconciler.report_sync_load("default", in_flight=3, hold_s=10.0)
    await rig.pass_()
    assert rig.reconciler.pools["default"].desired == 3

    rig.clock.now += 11.0  # the report was not renewed
    await rig.pass_()
    decision = rig.reconciler.pools["default"].decision
    assert decision is not None and "backlog 0" in decision.reason


async def test_a_frozen_worker_is_killed_and_replaced(tmp_path: Path) -> None:
    rig = Rig(tmp_path, manifest(max=1))
    await rig.enqueue(1)
    rig.clock.now += 1
    await rig.pass_()
    [frozen] = rig.registry.list("default")
    rig.registry.mark_ready(frozen.worker_id)
    for _ in range(10):
        rig.registry.mark_unhealthy(frozen.worker_id, eject=True)

    rig.clock.now += 1
    await rig.pass_()
    rig.clock.now += 1
    await rig.pass_()

    assert frozen.worker_id in rig.runtime.stopped()
    assert len(rig.runtime.started()) == 2, "a replacement starts"


async def test_a_worker_that_never_becomes_ready_is_replaced(tmp_path: Path) -> None:
    rig = Rig(tmp_path, manifest(max=1))
    await rig.enqueue(1)
    rig.clock.now += 1
    await rig.pass_()
    [stuck] = rig.registry.list("default")

    rig.clock.now += 61
    await rig.pass_()

    assert stuck.worker_id in rig.runtime.stopped()


async def test_a_container_created_but_never_started_is_removed_in_time(tmp_path: Path) -> None:
    rig = Rig(tmp_path, manifest(max=1))
    template_hash = rig.store.pools["default"].spec.template.template_hash()
    orphan = rig.runtime.seed(
        WorkerSpec(
            pool="default",
            name="shoal-default-orphan",
            image="shoal/worker:latest",
            port=8080,
            concurrency=1,
            template_hash=template_hash,
        ),
        engine_state="created",
    )
    await rig.reconciler.relist()
    await rig.settle()
    assert orphan.worker_id not in rig.runtime.stopped(), "a start may still be under way"

    rig.clock.now += 61
    await rig.reconciler.relist()
    await rig.settle()
    assert orphan.worker_id in rig.runtime.stopped()
