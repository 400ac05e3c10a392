"""The in-memory runtime that the reconciler's tests lean on: it must behave like the real ones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from controller.errors import RuntimeUnavailable, StartFailed
from controller.runtimes.base import LABEL_INSTANCE, LABEL_MANAGED, RuntimeEvent, WorkerSpec
from controller.runtimes.fake import FIRST_FAKE_PORT, FakeRuntime


def _spec(name: str) -> WorkerSpec:
    return WorkerSpec(
        pool="p",
        name=name,
        image="shoal/worker:latest",
        port=8080,
        concurrency=1,
        template_hash="t1",
        labels={"extra": "yes"},
    )


async def _take(events: AsyncIterator[RuntimeEvent], count: int) -> list[RuntimeEvent]:
    got: list[RuntimeEvent] = []
    async with asyncio.timeout(5):
        async for event in events:
            got.append(event)
            if len(got) == count:
                break
    return got


async def test_fake_runtime_start_assigns_ids_ports_labels_and_clock_time():
    runtime = FakeRuntime(instance="i1", clock=lambda: 1234.5)

    first = await runtime.start(_spec("a"))
    second = await runtime.start(_spec("b"))

    assert (first.host_port, second.host_port) == (FIRST_FAKE_PORT, FIRST_FAKE_PORT + 1)
    assert first.worker_id != second.worker_id
    assert first.engine_state == "running" and first.started_at == 1234.5
    assert first.labels[LABEL_MANAGED] == "true" and first.labels[LABEL_INSTANCE] == "i1"
    assert first.labels["extra"] == "yes"
    assert await runtime.list() == [first, second]


async def test_fake_runtime_records_every_call_in_order():
    runtime = FakeRuntime()
    worker = await runtime.start(_spec("a"))
    await runtime.list()
    await runtime.stop(worker.worker_id, grace_s=2.5)
    await runtime.close()

    assert runtime.calls == [
        ("start", "a"),
        ("list",),
        ("stop", worker.worker_id, "2.5"),
        ("close",),
    ]
    assert runtime.started() == ["a"]
    assert runtime.stopped() == [worker.worker_id]


async def test_fake_runtime_fails_the_next_starts_and_leaves_nothing():
    runtime = FakeRuntime()
    runtime.fail_next_starts(2, reason="port is already allocated")

    for name in ("a", "b"):
        with pytest.raises(StartFailed, match="port is already allocated"):
            await runtime.start(_spec(name))
    third = await runtime.start(_spec("c"))

    assert await runtime.list() == [third]
    assert runtime.started() == ["a", "b", "c"]


async def test_fake_runtime_refuses_a_name_in_use():
    runtime = FakeRuntime()
    await runtime.start(_spec("a"))
    with pytest.raises(StartFailed, match="already in use"):
        await runtime.start(_spec("a"))


async def test_fake_runtime_crash_keeps_the_worker_listed_as_exited_and_emits_die():
    runtime = FakeRuntime()
    events = runtime.events()
    pending = asyncio.ensure_future(_take(events, 2))
    await asyncio.sleep(0)
    worker = await runtime.start(_spec("a"))

    crashed = runtime.crash(worker.worker_id, exit_code=137)

    assert [(e.worker_id, e.action) for e in await pending] == [
        (worker.worker_id, "start"),
        (worker.worker_id, "die"),
    ]
    assert (crashed.engine_state, crashed.exit_code) == ("exited", 137)
    assert await runtime.list() == [crashed]


async def test_fake_runtime_stop_removes_and_emits_die_then_destroy():
    runtime = FakeRuntime()
    worker = await runtime.start(_spec("a"))
    events = runtime.events()
    pending = asyncio.ensure_future(_take(events, 2))
    await asyncio.sleep(0)

    await runtime.stop(worker.worker_id, grace_s=1)
    await runtime.stop(worker.worker_id, grace_s=1)  # already gone: not an error

    assert [e.action for e in await pending] == ["die", "destroy"]
    assert await runtime.list() == []


async def test_fake_runtime_unavailable_raises_runtime_unavailable_everywhere():
    runtime = FakeRuntime()
    worker = await runtime.start(_spec("a"))
    runtime.unavailable = True

    with pytest.raises(RuntimeUnavailable):
        await runtime.list()
    with pytest.raises(RuntimeUnavailable):
        await runtime.start(_spec("b"))
    with pytest.raises(RuntimeUnavailable):
        await runtime.stop(worker.worker_id, grace_s=0)
    runtime.unavailable = False
    assert [w.name for w in await runtime.list()] == ["a"]


async def test_fake_runtime_start_gate_holds_starts_in_flight():
    runtime = FakeRuntime()
    runtime.start_gate = asyncio.Event()
    starts = [asyncio.create_task(runtime.start(_spec(n))) for n in ("a", "b")]
    await asyncio.sleep(0)

    assert runtime.starts_in_flight == 2
    assert await runtime.list() == []
    runtime.start_gate.set()
    await asyncio.gather(*starts)
    assert runtime.starts_in_flight == 0
    assert len(await runtime.list()) == 2


async def test_fake_runtime_seed_adds_preexisting_workers_without_calls():
    runtime = FakeRuntime()
    seeded = runtime.seed(_spec("old"))
    dead = runtime.seed(_spec("older"), engine_state="exited")

    assert await runtime.list() == [seeded, dead]
    assert dead.exit_code == 0
    assert runtime.started() == []


async def test_fake_runtime_close_ends_event_streams():
    runtime = FakeRuntime()
    events = runtime.events()
    collected = asyncio.ensure_future(_take(events, 10))
    await asyncio.sleep(0)
    runtime.emit(runtime.seed(_spec("a")).worker_id, "health_status: healthy")

    await runtime.close()

    assert [e.action for e in await collected] == ["health_status: healthy"]
    assert [e async for e in runtime.events()] == []
