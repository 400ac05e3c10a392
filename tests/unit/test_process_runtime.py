"""The process runtime, with real worker subprocesses on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controller.errors import StartFailed
from controller.runtimes import process as process_module
from controller.runtimes.base import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_POOL,
    LABEL_TEMPLATE_HASH,
    RuntimeEvent,
    WorkerId,
    WorkerSpec,
)
from controller.runtimes.process import ProcessRuntime


def _spec(name: str = "w-1", **overrides: Any) -> WorkerSpec:
    fields: dict[str, Any] = {
        "pool": "default",
        "name": name,
        "image": "ignored",
        "port": 8080,
        "concurrency": 2,
        "template_hash": "h1",
        "env": {"WORK_SECONDS": "0"},
        "labels": {"test.case": "process"},
    }
    fields.update(overrides)
    return WorkerSpec(**fields)


async def _http(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One HTTP/1.1 request with a JSON body over a fresh connection; stdlib asyncio only."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = b"" if body is None else json.dumps(body).encode()
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: w\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + data
    )
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


async def _until_busy(port: int) -> None:
    """Polls the worker's metrics until a task is in flight (bounded: about 20 s)."""
    for _ in range(2000):
        if (await _http(port, "GET", "/metrics"))[1]["active"] > 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the task never started")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
async def runtime() -> AsyncIterator[ProcessRuntime]:
    rt = ProcessRuntime(instance="unit-proc")
    try:
        yield rt
    finally:
        await rt.close()


async def _next_event(events: AsyncIterator[RuntimeEvent], action: str) -> RuntimeEvent:
    async with asyncio.timeout(20):
        async for event in events:
            if event.action == action:
                return event
    raise AssertionError(f"the event stream ended before {action!r}")


async def test_process_runtime_start_returns_a_listening_worker(runtime):
    worker = await runtime.start(_spec())

    assert worker.worker_id.startswith("proc-")
    assert worker.engine_state == "running"
    assert (worker.name, worker.pool, worker.template_hash) == ("w-1", "default", "h1")
    assert worker.host == "127.0.0.1" and worker.host_port
    assert worker.labels[LABEL_MANAGED] == "true"
    assert worker.labels[LABEL_INSTANCE] == "unit-proc"
    assert worker.labels[LABEL_POOL] == "default"
    assert worker.labels[LABEL_TEMPLATE_HASH] == "h1"
    assert worker.labels["test.case"] == "process"
    assert await _http(worker.host_port, "GET", "/healthz") == (200, {"status": "ok"})
    metrics = (await _http(worker.host_port, "GET", "/metrics"))[1]
    assert (metrics["id"], metrics["concurrency"]) == ("w-1", 2)
    assert await runtime.list() == [worker]


async def test_process_runtime_gives_two_workers_distinct_ports(runtime):
    first, second = await asyncio.gather(runtime.start(_spec("a")), runtime.start(_spec("b")))
    assert first.host_port != second.host_port
    assert first.worker_id != second.worker_id
    assert {w.name for w in await runtime.list()} == {"a", "b"}


async def test_process_runtime_refuses_a_name_already_in_use(runtime):
    await runtime.start(_spec("same"))
    with pytest.raises(StartFailed, match="already in use"):
        await runtime.start(_spec("same"))
    assert len(await runtime.list()) == 1


async def test_process_runtime_stop_drains_the_task_in_flight(runtime):
    worker = await runtime.start(_spec())
    task = asyncio.create_task(
        _http(worker.host_port, "POST", "/process-task", {"id": "t", "work_seconds": 0.5})
    )
    await _until_busy(worker.host_port)

    await runtime.stop(worker.worker_id, grace_s=30)

    status, body = await task
    assert status == 200 and body["id"] == "t"
    assert await runtime.list() == []
    assert not _alive(int(worker.worker_id.removeprefix("proc-")))


async def test_process_runtime_stop_kills_after_the_grace_period(runtime):
    worker = await runtime.start(_spec())
    task = asyncio.create_task(
        _http(worker.host_port, "POST", "/process-task", {"id": "t", "work_seconds": 60})
    )
    await _until_busy(worker.host_port)

    async with asyncio.timeout(20):
        await runtime.stop(worker.worker_id, grace_s=0.2)

    # The killed worker could not answer the task it held.
    with pytest.raises((ConnectionError, IndexError, ValueError)):
        await task
    assert not _alive(int(worker.worker_id.removeprefix("proc-")))


async def test_process_runtime_stop_of_an_unknown_worker_is_not_an_error(runtime):
    worker = await runtime.start(_spec())
    await runtime.stop(WorkerId("proc-999999999"), grace_s=1)
    assert await runtime.list() == [worker]


async def test_process_runtime_lists_a_crashed_worker_as_exited_and_emits_die(runtime):
    events = runtime.events()
    # An event stream begins when first awaited; this one must see the start.
    first = asyncio.ensure_future(_next_event(events, "start"))
    await asyncio.sleep(0)
    worker = await runtime.start(_spec())
    assert (await first).worker_id == worker.worker_id

    os.kill(int(worker.worker_id.removeprefix("proc-")), signal.SIGKILL)
    died = await _next_event(events, "die")

    [listed] = await runtime.list()
    assert died.worker_id == worker.worker_id
    assert listed.engine_state == "exited"
    assert listed.exit_code == -signal.SIGKILL
    await runtime.stop(worker.worker_id, grace_s=1)
    assert await runtime.list() == []
    await events.aclose()


async def test_process_runtime_reports_why_a_worker_failed_to_start(tmp_path: Path):
    broken = tmp_path / "broken.py"
    broken.write_text("import sys\nsys.stderr.write('no config here\\n')\nsys.exit(5)\n")
    rt = ProcessRuntime(instance="unit-proc", worker_script=broken)
    try:
        with pytest.raises(StartFailed, match="code 5: no config here"):
            await rt.start(_spec())
        assert await rt.list() == []
    finally:
        await rt.close()


async def test_process_runtime_passes_the_worker_contract_env(tmp_path: Path):
    """A bad MODE in spec.env reaches the worker, which refuses it: proof the env is passed."""
    rt = ProcessRuntime(instance="unit-proc")
    try:
        with pytest.raises(StartFailed, match=r"code 2: .*not supported"):
            await rt.start(_spec(env={"MODE": "carrier-pigeon"}))
    finally:
        await rt.close()


async def test_process_runtime_retries_when_its_port_was_taken(runtime, monkeypatch):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken, process_module.free_port()])
        monkeypatch.setattr(process_module, "free_port", lambda: next(ports))

        worker = await runtime.start(_spec())

    assert worker.host_port != taken
    assert (await _http(worker.host_port, "GET", "/healthz"))[0] == 200


async def test_process_runtime_close_kills_children_and_ends_events():
    rt = ProcessRuntime(instance="unit-proc")
    events = rt.events()
    pending = asyncio.ensure_future(events.__anext__())
    await asyncio.sleep(0)
    workers = [await rt.start(_spec(f"c{i}")) for i in range(2)]
    assert (await pending).action == "start"

    await rt.close()

    pids = [int(w.worker_id.removeprefix("proc-")) for w in workers]
    assert not any(_alive(pid) for pid in pids)
    remaining = [event async for event in events]
    assert all(event.action in ("start", "die") for event in remaining)
    with pytest.raises(StartFailed):
        await rt.start(_spec("late"))
