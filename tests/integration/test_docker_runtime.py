"""The Docker runtime against the real engine.

Each test has its own ``shoal.instance`` label (the ``instance_label`` fixture), which the
fixture uses to remove whatever the test left; containers made here by hand carry it too.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import docker
import pytest

from controller.errors import RuntimeUnavailable, StartFailed
from controller.runtimes.base import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_POOL,
    LABEL_TEMPLATE_HASH,
    ObservedWorker,
    RuntimeEvent,
    WorkerId,
    WorkerSpec,
)
from controller.runtimes.docker import DockerRuntime, _parse_docker_time, docker_available

# The SDK's unix-socket adapter does not close a socket whose connect failed; that leak is
# the SDK's (docker 7.x), and only shows here because these tests aim at a missing socket.
# The tests marked with it collect garbage before they end, so the warnings fall inside them.
leaky_sdk_sockets = pytest.mark.filterwarnings(
    "ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning"
)


def _spec(image: str, name: str, **overrides: Any) -> WorkerSpec:
    fields: dict[str, Any] = {
        "pool": "itest",
        "name": name,
        "image": image,
        "port": 8080,
        "concurrency": 2,
        "template_hash": "th-1",
        "env": {"WORK_SECONDS": "0"},
        "memory_bytes": 64 * 1024 * 1024,
        "cpus": 0.5,
        "pids": 64,
        "labels": {"test.owner": "h1"},
    }
    fields.update(overrides)
    return WorkerSpec(**fields)


def _get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def _until_healthy(worker: ObservedWorker) -> None:
    """Polls /healthz until 200 (bounded: about 15 s)."""
    assert worker.host_port is not None
    for _ in range(300):
        try:
            if (await asyncio.to_thread(_get, worker.host_port, "/healthz"))[0] == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{worker.name} never answered /healthz")


async def _next_action(events: AsyncIterator[RuntimeEvent], action: str, worker_id: str) -> None:
    async with asyncio.timeout(30):
        async for event in events:
            if event.action == action and event.worker_id == worker_id:
                return
    raise AssertionError(f"the event stream ended before {action!r}")


def _our_containers(client: docker.DockerClient, instance: str) -> list[Any]:
    return client.containers.list(
        all=True, filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={instance}"]}
    )


@pytest.fixture
async def runtime(instance_label: str, worker_image: str) -> AsyncIterator[DockerRuntime]:
    rt = DockerRuntime(instance=instance_label)
    try:
        yield rt
    finally:
        await rt.close()


@pytest.fixture
def broken_image(docker_client: docker.DockerClient, worker_image: str) -> Iterator[str]:
    """The worker image with an entrypoint that does not exist: its start fails after create."""
    tag = f"shoal/worker-broken:test-{secrets.token_hex(4)}"
    dockerfile = f'FROM {worker_image}\nENTRYPOINT ["/no/such/binary"]\n'.encode()
    docker_client.images.build(fileobj=io.BytesIO(dockerfile), tag=tag, rm=True)
    yield tag
    docker_client.images.remove(tag, force=True)


@pytest.mark.docker
async def test_docker_runtime_start_publishes_a_loopback_port_that_answers_healthz(
    runtime, worker_image, instance_label
):
    worker = await runtime.start(_spec(worker_image, f"{instance_label}-a"))

    assert worker.engine_state == "running"
    assert worker.name == f"{instance_label}-a"
    assert (worker.pool, worker.template_hash) == ("itest", "th-1")
    assert worker.host == "127.0.0.1" and worker.host_port
    assert worker.started_at is not None and abs(worker.started_at - time.time()) < 300
    assert worker.labels[LABEL_MANAGED] == "true"
    assert worker.labels[LABEL_INSTANCE] == instance_label
    assert worker.labels[LABEL_POOL] == "itest"
    assert worker.labels[LABEL_TEMPLATE_HASH] == "th-1"
    assert worker.labels["test.owner"] == "h1"
    await _until_healthy(worker)
    metrics = (await asyncio.to_thread(_get, worker.host_port, "/metrics"))[1]
    assert (metrics["id"], metrics["concurrency"]) == (worker.name, 2)
    assert await runtime.list() == [worker]


@pytest.mark.docker
async def test_docker_runtime_gives_two_workers_distinct_ports(
    runtime, worker_image, instance_label
):
    first, second = await asyncio.gather(
        runtime.start(_spec(worker_image, f"{instance_label}-a")),
        runtime.start(_spec(worker_image, f"{instance_label}-b")),
    )

    assert first.host_port != second.host_port
    await asyncio.gather(_until_healthy(first), _until_healthy(second))
    assert {w.worker_id for w in await runtime.list()} == {first.worker_id, second.worker_id}


@pytest.mark.docker
async def test_docker_runtime_name_conflict_fails_and_touches_nothing(
    runtime, docker_client, worker_image, instance_label
):
    name = f"{instance_label}-taken"
    squatter = docker_client.containers.create(
        worker_image, name=name, labels={LABEL_INSTANCE: instance_label}
    )

    with pytest.raises(StartFailed, match="already in use"):
        await runtime.start(_spec(worker_image, name))

    squatter.reload()
    assert squatter.status == "created"
    assert _our_containers(docker_client, instance_label) == []


@pytest.mark.docker
async def test_docker_runtime_missing_image_fails_and_leaves_no_container(
    runtime, docker_client, instance_label
):
    with pytest.raises(StartFailed, match="not present"):
        await runtime.start(_spec("shoal/no-such-image:never", f"{instance_label}-x"))
    assert _our_containers(docker_client, instance_label) == []


@pytest.mark.docker
async def test_docker_runtime_failed_start_after_create_removes_the_container(
    runtime, docker_client, broken_image, instance_label
):
    with pytest.raises(StartFailed, match="no/such/binary"):
        await runtime.start(_spec(broken_image, f"{instance_label}-broken"))
    assert _our_containers(docker_client, instance_label) == []


@pytest.mark.docker
async def test_docker_runtime_list_never_returns_containers_it_does_not_own(
    runtime, docker_client, worker_image, instance_label
):
    unmanaged = docker_client.containers.create(
        worker_image, labels={LABEL_INSTANCE: instance_label}
    )
    other_instance = docker_client.containers.create(
        worker_image,
        labels={LABEL_MANAGED: "true", LABEL_INSTANCE: f"{instance_label}-other"},
    )
    try:
        worker = await runtime.start(_spec(worker_image, f"{instance_label}-a"))
        listed = await runtime.list()
    finally:
        other_instance.remove(force=True)

    assert [w.worker_id for w in listed] == [worker.worker_id]
    assert unmanaged.id not in {w.worker_id for w in listed}


@pytest.mark.docker
async def test_docker_runtime_stop_refuses_a_container_it_does_not_own(
    runtime, docker_client, worker_image, instance_label
):
    unmanaged = docker_client.containers.create(
        worker_image, labels={LABEL_INSTANCE: instance_label}
    )

    await runtime.stop(WorkerId(unmanaged.id), grace_s=1)

    unmanaged.reload()
    assert unmanaged.status == "created"


@pytest.mark.docker
async def test_docker_runtime_stop_of_an_idle_worker_returns_before_the_grace_period(
    runtime, docker_client, worker_image, instance_label
):
    worker = await runtime.start(_spec(worker_image, f"{instance_label}-a"))
    await _until_healthy(worker)

    began = time.monotonic()
    await runtime.stop(worker.worker_id, grace_s=30)
    elapsed_s = time.monotonic() - began

    # Far below the 30 s grace: the worker honoured SIGTERM instead of waiting to be killed.
    assert elapsed_s < 20
    assert await runtime.list() == []
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(worker.worker_id)


@pytest.mark.docker
async def test_docker_runtime_stop_of_a_missing_worker_is_not_an_error(runtime, instance_label):
    await runtime.stop(WorkerId("0" * 64), grace_s=1)
    assert await runtime.list() == []


@pytest.mark.docker
async def test_docker_worker_exits_0_on_sigterm(
    runtime, docker_client, worker_image, instance_label
):
    worker = await runtime.start(_spec(worker_image, f"{instance_label}-a"))
    await _until_healthy(worker)
    container = docker_client.containers.get(worker.worker_id)

    await asyncio.to_thread(container.stop, timeout=30)

    container.reload()
    assert container.attrs["State"]["ExitCode"] == 0
    [listed] = await runtime.list()
    assert (listed.engine_state, listed.exit_code) == ("exited", 0)


@pytest.mark.docker
async def test_docker_runtime_applies_the_hardening(
    runtime, docker_client, worker_image, instance_label
):
    spec = _spec(worker_image, f"{instance_label}-a")
    worker = await runtime.start(spec)

    attrs = docker_client.api.inspect_container(worker.worker_id)
    host = attrs["HostConfig"]

    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["PidsLimit"] == spec.pids
    assert host["Memory"] == spec.memory_bytes
    assert host["NanoCpus"] == 500_000_000
    assert host["Privileged"] is False
    assert "/tmp" in host["Tmpfs"]
    assert not host.get("Binds") and attrs["Mounts"] == []
    assert host["AutoRemove"] is False
    assert host["PortBindings"] == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
    assert attrs["Config"]["User"] not in ("", "0", "root", "0:0")
    env = dict(item.split("=", 1) for item in attrs["Config"]["Env"])
    assert (env["PORT"], env["CONCURRENCY"], env["SHOAL_WORKER_ID"]) == ("8080", "2", spec.name)
    assert env["WORK_SECONDS"] == "0"


@pytest.mark.docker
async def test_docker_runtime_lists_a_killed_worker_as_exited(
    runtime, docker_client, worker_image, instance_label
):
    events = runtime.events()
    worker = await runtime.start(_spec(worker_image, f"{instance_label}-a"))
    watching = asyncio.ensure_future(_next_action(events, "die", worker.worker_id))
    await asyncio.sleep(0)

    docker_client.containers.get(worker.worker_id).kill()
    await watching

    [listed] = await runtime.list()
    assert listed.worker_id == worker.worker_id
    assert (listed.engine_state, listed.exit_code, listed.host_port) == ("exited", 137, None)
    await events.aclose()


@pytest.mark.docker
async def test_docker_runtime_events_follow_a_worker_and_end_on_close(
    docker_client, worker_image, instance_label
):
    rt = DockerRuntime(instance=instance_label)
    seen: list[RuntimeEvent] = []

    async def collect() -> None:
        async for event in rt.events():
            seen.append(event)

    collector = asyncio.create_task(collect())
    # The stream covers what happens once it is first awaited: let the collector begin.
    await asyncio.sleep(0)
    stranger = docker_client.containers.create(
        worker_image, labels={LABEL_INSTANCE: instance_label}
    )
    worker = await rt.start(_spec(worker_image, f"{instance_label}-a"))
    await rt.stop(worker.worker_id, grace_s=10)
    for _ in range(100):
        if any(e.action == "destroy" for e in seen):
            break
        await asyncio.sleep(0.1)

    await rt.close()
    async with asyncio.timeout(10):
        await collector

    actions = [e.action for e in seen if e.worker_id == worker.worker_id]
    assert actions[:2] == ["create", "start"]
    assert "die" in actions and actions[-1] == "destroy"
    assert stranger.id not in {e.worker_id for e in seen}


@pytest.mark.docker
def test_docker_available_reports_the_engine(docker_client):
    ok, reason = docker_available(timeout_s=5)
    assert ok, reason
    assert "answered" in reason


def test_docker_available_explains_a_missing_engine(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    ok, reason = docker_available(timeout_s=1)
    gc.collect()  # NB: no ResourceWarning: the SDK is not asked when the socket is missing
    assert not ok
    assert reason == (
        f"no Docker engine answered: cannot connect to {tmp_path}/no-engine.sock: "
        "No such file or directory"
    )


@leaky_sdk_sockets
async def test_docker_runtime_unreachable_engine_raises_runtime_unavailable(tmp_path):
    client = docker.DockerClient(base_url=f"unix://{tmp_path}/no-engine.sock", version="1.41")
    rt = DockerRuntime(instance="nowhere", client=client, retry_attempts=2)
    try:
        with pytest.raises(RuntimeUnavailable):
            await rt.list()
        with pytest.raises(RuntimeUnavailable):
            await rt.start(_spec("shoal/worker:latest", "nowhere-a"))
    finally:
        await rt.close()
        client.close()
        gc.collect()


@leaky_sdk_sockets
async def test_docker_runtime_refuses_calls_after_close(tmp_path):
    client = docker.DockerClient(base_url=f"unix://{tmp_path}/no-engine.sock", version="1.41")
    rt = DockerRuntime(instance="nowhere", client=client)
    await rt.close()
    with pytest.raises(RuntimeUnavailable, match="closed"):
        await rt.list()
    assert [e async for e in rt.events()] == []
    client.close()
    gc.collect()


class _FakeStream:
    """One connection's worth of engine events; blocks at its end when ``hold`` is set."""

    def __init__(self, items: list[dict[str, Any]], *, hold: bool = False) -> None:
        self._items = items
        self._released = threading.Event()
        if not hold:
            self._released.set()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self._items
        self._released.wait(timeout=30)

    def close(self) -> None:
        self._released.set()


class _FakeEventsClient:
    """Stands in for DockerClient at the seam: each events() call is one connection."""

    def __init__(self, connections: list[Any]) -> None:
        self._connections = connections
        self.calls: list[dict[str, Any]] = []

    def events(self, **kwargs: Any) -> _FakeStream:
        self.calls.append(kwargs)
        outcome = self._connections.pop(0) if self._connections else _FakeStream([], hold=True)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def close(self) -> None:
        pass


def _raw_event(action: str, container_id: str, time_ns: int, **labels: str) -> dict[str, Any]:
    return {
        "Type": "container",
        "Action": action,
        "Actor": {"ID": container_id, "Attributes": {"name": "w", **labels}},
        "timeNano": time_ns,
    }


async def test_docker_runtime_events_resume_after_a_lost_stream():
    ours = {LABEL_MANAGED: "true", LABEL_INSTANCE: "ev"}
    client = _FakeEventsClient(
        [
            _FakeStream(
                [
                    _raw_event("start", "c1", 1_700_000_000_000_000_005, **ours),
                    _raw_event("start", "c2", 1_700_000_000_000_000_006),
                ]
            ),
            OSError("engine restarting"),
            _FakeStream([_raw_event("die", "c1", 1_700_000_001_000_000_000, **ours)], hold=True),
        ]
    )
    rt = DockerRuntime(instance="ev", client=client)
    seen: list[RuntimeEvent] = []

    async def collect() -> None:
        async for event in rt.events():
            seen.append(event)
            if len(seen) == 2:
                await rt.close()

    async with asyncio.timeout(20):
        await collect()

    assert [(e.worker_id, e.action) for e in seen] == [("c1", "start"), ("c1", "die")]
    # Both reconnects resume just after the last event read (even one filtered out here), so
    # nothing that happened in the gap is lost.
    assert [call["since"] for call in client.calls[1:3]] == ["1700000000.000000007"] * 2
    assert client.calls[0]["filters"]["label"] == [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}=ev"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("2024-05-01T10:00:00.123456789Z", 1714557600.123456, id="nanoseconds"),
        pytest.param("2024-05-01T10:00:00Z", 1714557600.0, id="whole-seconds"),
        pytest.param("2024-05-01T12:00:00.5+02:00", 1714557600.5, id="offset"),
        pytest.param("0001-01-01T00:00:00Z", None, id="never-started"),
        pytest.param("", None, id="empty"),
    ],
)
def test_parse_docker_time_handles_engine_timestamps(raw, expected):
    assert _parse_docker_time(raw) == expected
