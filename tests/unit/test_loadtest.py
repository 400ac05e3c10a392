"""Tests for ``hack/loadtest.py`` against a small fake Shoal API served on loopback.

The fake follows the HTTP contract the load generator relies on (enqueue, task status,
metrics, scaling events) and scripts each task's fate by its sequence number. Server
times are synthetic, so latency percentiles can be checked exactly.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

HACK_DIR = Path(__file__).resolve().parents[2] / "hack"
BUSY = "a" * 64
IDLE_MANAGED = "b" * 64
NOT_A_CONTAINER = "c" * 64
# Like the real API: tasks name their worker's container, /metrics.json gives short ids.
BUSY_NAME = "shoal-default-aaaaaa"


def _load_loadtest() -> ModuleType:
    spec = importlib.util.spec_from_file_location("shoal_hack_loadtest", HACK_DIR / "loadtest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


loadtest = _load_loadtest()


@dataclass
class FakeShoal:
    """An in-memory stand-in for the Shoal API; ``fates`` maps a task's seq to its end.

    Fates: succeeded (default), failed, dead, gone (404), stuck (running forever),
    retried (succeeded on a second worker), until-kill (runs on ``BUSY`` until killed).
    """

    fates: dict[int, str] = field(default_factory=dict)
    unavailable: int = 0
    replicas: int = 3
    url: str = ""
    enqueued: list[dict[str, Any]] = field(default_factory=list)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)
    event_time: float | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/enqueue-task", self.enqueue)
        app.router.add_get("/tasks/{id}", self.task)
        app.router.add_get("/metrics.json", self.metrics)
        app.router.add_get("/scaling-events", self.scaling_events)
        return app

    async def enqueue(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("pool") != "default":
            return web.json_response({"error": "unknown pool"}, status=400)
        if self.unavailable > 0:
            self.unavailable -= 1
            return web.json_response(
                {"error": "queue unavailable"}, status=503, headers={"Retry-After": "0"}
            )
        self.enqueued.append(body)
        if self.event_time is None:
            self.event_time = time.time()
        seq = body["payload"]["seq"]
        task = {
            "id": f"task-{seq}",
            "pool": "default",
            "state": "queued",
            "seq": seq,
            "polls": 0,
            "createdAt": 1000.0 + seq,
        }
        self.tasks[task["id"]] = task
        return web.json_response(self._public(task), status=202)

    async def task(self, request: web.Request) -> web.Response:
        task = self.tasks.get(request.match_info["id"])
        fate = self.fates.get(task["seq"], "succeeded") if task else "gone"
        if task is None or fate == "gone":
            return web.json_response({"error": "not found"}, status=404)
        task["polls"] += 1
        started = task["createdAt"] + 0.01 * (task["seq"] + 1)
        task.update(
            startedAt=started, worker=BUSY_NAME, workers=[BUSY_NAME], attempts=1, state="running"
        )
        if fate == "until-kill" and BUSY in self.killed:
            task.update(state="succeeded", attempts=2, workers=[BUSY_NAME, IDLE_MANAGED])
        elif fate not in ("stuck", "until-kill") and task["polls"] >= 2:
            task.update(state="succeeded" if fate == "retried" else fate)
            if fate == "retried":
                task.update(attempts=2, workers=[BUSY_NAME, IDLE_MANAGED])
        if task["state"] != "running":
            task["finishedAt"] = started + 0.5
        return web.json_response(self._public(task))

    async def metrics(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "replicas": self.replicas,
                "workerIds": [BUSY[:12], IDLE_MANAGED[:12], NOT_A_CONTAINER[:12]],
                "workerPorts": [40001, 40002],
                "activeTasks": 1,
                "queueLength": 2,
                "pools": {"default": {"queueLength": 2, "ready": 3, "desired": 4}},
            }
        )

    async def scaling_events(self, request: web.Request) -> web.Response:
        events = [{"time": 5.0, "pool": "default", "from": 0, "to": 1, "reason": "ancient"}]
        if self.event_time is not None:
            events.append(
                {"time": self.event_time, "pool": "default", "from": 1, "to": 3, "reason": "burst"}
            )
        return web.json_response({"events": events})

    @staticmethod
    def _public(task: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in task.items() if k not in ("seq", "polls")}


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeShoal]:
    fake = FakeShoal()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("")).rstrip("/")
    yield fake
    await server.close()


def _argv(fake: FakeShoal, *extra: str) -> list[str]:
    return [
        "--url",
        fake.url,
        "--pool",
        "default",
        "--poll-interval",
        "0.02",
        "--metrics-interval",
        "0.05",
        "--timeout",
        "10",
        "--no-progress",
        "--json",
        *extra,
    ]


def _last_json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    lines = capsys.readouterr().out.strip().splitlines()
    result: dict[str, Any] = json.loads(lines[-1])
    return result


async def test_loadtest_counts_each_outcome_and_exits_nonzero(
    fake_api: FakeShoal, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_api.fates = {0: "failed", 1: "dead", 2: "gone", 3: "retried"}

    code = await loadtest.main_async(_argv(fake_api, "--tasks", "10", "--rate", "200"))

    summary = _last_json(capsys)
    assert code == 1
    assert summary["submitted"] == 10
    assert summary["succeeded"] == 7
    assert (summary["failed"], summary["dead"], summary["lost"]) == (1, 1, 1)
    assert summary["ran_twice"] == 1
    assert summary["rejected"] == 0


async def test_loadtest_json_line_has_contract_keys_and_exact_percentiles(
    fake_api: FakeShoal, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await loadtest.main_async(
        _argv(fake_api, "--tasks", "10", "--rate", "100", "--work-seconds", "0.2")
    )

    summary = _last_json(capsys)
    assert code == 0
    for key in (
        "submitted", "succeeded", "failed", "lost", "dead", "rejected", "ran_twice",
        "max_replicas", "duration_s", "throughput_per_s",
        "p50_wait_s", "p95_wait_s", "p99_wait_s", "p50_e2e_s", "p95_e2e_s", "p99_e2e_s",
    ):  # fmt: skip
        assert key in summary, key
    # Waits are 0.01 * (seq + 1) for seq 0..9 and each task runs 0.5 s after its start.
    assert summary["p50_wait_s"] == pytest.approx(0.055)
    assert summary["p95_wait_s"] == pytest.approx(0.0955)
    assert summary["p50_e2e_s"] == pytest.approx(0.555)
    assert summary["max_replicas"] == 3
    assert summary["scaling_events"] == 1
    assert all(body["work_seconds"] == 0.2 for body in fake_api.enqueued)


async def test_loadtest_task_never_final_is_lost_after_timeout(
    fake_api: FakeShoal, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_api.fates = {0: "stuck"}
    argv = _argv(fake_api, "--tasks", "3", "--rate", "100")
    argv[argv.index("--timeout") + 1] = "0.3"

    code = await loadtest.main_async(argv)

    summary = _last_json(capsys)
    assert code == 1
    assert summary["lost"] == 1
    assert summary["succeeded"] == 2


async def test_loadtest_retries_unavailable_queue_then_succeeds(
    fake_api: FakeShoal, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_api.unavailable = 2

    code = await loadtest.main_async(_argv(fake_api, "--tasks", "1", "--rate", "10"))

    summary = _last_json(capsys)
    assert code == 0
    assert summary["submitted"] == 1
    assert summary["submit_retries"] == 2


async def test_loadtest_counts_refused_tasks_as_rejected(
    fake_api: FakeShoal, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _argv(fake_api, "--tasks", "4", "--rate", "100")
    argv[argv.index("--pool") + 1] = "nope"

    code = await loadtest.main_async(argv)

    summary = _last_json(capsys)
    assert (summary["rejected"], summary["submitted"]) == (4, 0)
    assert code == 1, "a run where nothing was accepted must not pass"


async def test_loadtest_trace_replay_sends_scaled_counts(
    fake_api: FakeShoal, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    trace = tmp_path / "trace.csv"
    rows = [(1, 4), (2, 0), (3, 10), (4, 2), (5, 6), (6, 100)]
    trace.write_text("minute,invocations\n" + "".join(f"{m},{n}\n" for m, n in rows))

    # Minutes 1-5 at 0.05 s each, halved: 2 + 0 + 5 + 1 + 3 tasks; minute 6 is outside.
    code = await loadtest.main_async(
        _argv(
            fake_api,
            *("--trace", str(trace), "--compress", "1200", "--scale", "0.5"),
            *("--start-minute", "1", "--minutes", "5"),
        )
    )

    summary = _last_json(capsys)
    assert code == 0
    assert len(fake_api.enqueued) == 11
    assert summary["submitted"] == 11


def test_trace_schedule_scales_fractions_within_rounding_and_by_seed() -> None:
    counts = [7, 0, 3, 1, 12] * 40

    first = loadtest.trace_schedule(
        counts, minute_s=1.0, scale=0.3, arrival="poisson", rng=random.Random(4)
    )
    again = loadtest.trace_schedule(
        counts, minute_s=1.0, scale=0.3, arrival="poisson", rng=random.Random(4)
    )

    assert first == again
    low = sum(int(n * 0.3) for n in counts)
    high = sum(-(-n * 3 // 10) for n in counts)
    assert low <= len(first) <= high
    assert first == sorted(first)
    assert all(0 <= t < len(counts) for t in first)


def test_read_trace_selects_the_minute_window(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("minute,invocations\n" + "".join(f"{m},{m * 10}\n" for m in range(1, 11)))

    assert loadtest.read_trace(trace, start_minute=3, minutes=4) == [30, 40, 50, 60]
    assert loadtest.read_trace(trace, start_minute=9, minutes=None) == [90, 100]
    with pytest.raises(loadtest.UsageError):
        loadtest.read_trace(trace, start_minute=11, minutes=2)


def test_rate_schedule_constant_is_an_even_open_loop_schedule() -> None:
    offsets = loadtest.rate_schedule(lambda t: 4.0, n_tasks=5, arrival="even", rng=random.Random(0))

    assert offsets == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize(
    ("pattern", "extra", "window", "expected"),
    [
        pytest.param("step", {"change_at_s": 2.0}, (2.0, 3.0), 30, id="step-triples-rate"),
        pytest.param(
            "spike", {"change_at_s": 1.0, "spike_for_s": 1.0}, (1.0, 2.0), 30, id="spike-peak"
        ),
        pytest.param("spike", {"change_at_s": 1.0, "spike_for_s": 1.0}, (2.0, 3.0), 10, id="after"),
    ],
)
def test_rate_schedule_follows_pattern(
    pattern: str, extra: dict[str, float], window: tuple[float, float], expected: int
) -> None:
    config = loadtest.LoadConfig(url="http://127.0.0.1:1", rate=10.0, pattern=pattern, **extra)
    rate_fn = loadtest.rate_function(config, n_tasks=200)

    offsets = loadtest.rate_schedule(rate_fn, n_tasks=200, arrival="even", rng=random.Random(0))

    in_window = [t for t in offsets if window[0] <= t < window[1]]
    assert abs(len(in_window) - expected) <= 1


def test_rate_schedule_poisson_is_seeded_and_keeps_the_mean_rate() -> None:
    def schedule(seed: int) -> list[float]:
        offsets: list[float] = loadtest.rate_schedule(
            lambda t: 50.0, n_tasks=2000, arrival="poisson", rng=random.Random(seed)
        )
        return offsets

    first = schedule(7)

    assert first == schedule(7)
    assert first != schedule(8)
    assert 2000 / first[-1] == pytest.approx(50.0, rel=0.1)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://example.com:8700", id="dns-name"),
        pytest.param("http://10.1.2.3:8700", id="private-ip"),
        pytest.param("http://169.254.169.254", id="metadata"),
        pytest.param("ftp://127.0.0.1", id="not-http"),
    ],
)
async def test_loadtest_refuses_non_loopback_url(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await loadtest.main_async(["--url", url, "--tasks", "1"])

    assert code == 2
    assert "loadtest: error" in capsys.readouterr().err


def test_parse_args_accepts_remote_only_when_allowed() -> None:
    config = loadtest.parse_args(["--url", "http://10.1.2.3:8700", "--allow-remote"])

    assert config.allow_remote
    assert loadtest.parse_args(["--url", "http://[::1]:8700"]).url == "http://[::1]:8700"


@dataclass
class FakeKiller:
    """Stands in for the Docker engine: running managed containers and what was killed."""

    fake: FakeShoal
    running: dict[str, str] = field(
        default_factory=lambda: {BUSY: BUSY_NAME, IDLE_MANAGED: "shoal-default-bbbbbb"}
    )
    killed: list[str] = field(default_factory=list)

    def managed_containers(self) -> list[tuple[str, str]]:
        return list(self.running.items())

    def kill(self, container_id: str) -> None:
        self.killed.append(container_id)
        del self.running[container_id]
        self.fake.killed.add(container_id)


async def test_loadtest_chaos_kills_only_busy_managed_workers(
    fake_api: FakeShoal, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_api.fates = dict.fromkeys(range(3), "until-kill")
    killer = FakeKiller(fake_api)
    argv = _argv(fake_api, "--tasks", "3", "--rate", "100")
    argv += ["--kill-workers-every", "0.1", "--kill-for", "5"]

    code = await loadtest.main_async(argv, killer=killer)

    summary = _last_json(capsys)
    assert killer.killed == [BUSY]
    assert summary["kills"] == 1
    assert summary["ran_twice"] == 3
    assert code == 0


async def test_loadtest_writes_self_contained_html_report(
    fake_api: FakeShoal, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    report = tmp_path / "report.html"

    code = await loadtest.main_async(
        _argv(fake_api, "--tasks", "5", "--rate", "50", "--report", str(report), "--progress")
    )

    page = report.read_text()
    assert code == 0
    assert page.count("<svg") == 4
    assert "burst" in page and "ancient" not in page
    assert "<script" not in page and "<link" not in page
    assert "sent" in capsys.readouterr().err


def _sleeper(docker_client: Any, image: str, labels: dict[str, str]) -> Any:
    return docker_client.containers.run(
        image, entrypoint=["sleep", "120"], labels=labels, detach=True, network_mode="none"
    )


@pytest.mark.docker
def test_docker_killer_kills_a_managed_container(
    docker_client: Any, worker_image: str, instance_label: str
) -> None:
    container = _sleeper(
        docker_client,
        worker_image,
        {"shoal.managed": "true", "shoal.instance": instance_label, "shoal.pool": "chaos-test"},
    )
    killer = loadtest.DockerKiller()

    assert (container.id, container.name) in killer.managed_containers()
    killer.kill(container.id)

    container.reload()
    assert container.status == "exited"


@pytest.mark.docker
def test_docker_killer_refuses_an_unmanaged_container(
    docker_client: Any, worker_image: str, instance_label: str
) -> None:
    container = _sleeper(docker_client, worker_image, {"shoal.instance": instance_label})
    killer = loadtest.DockerKiller()

    assert container.id not in {cid for cid, _ in killer.managed_containers()}
    with pytest.raises(loadtest.ChaosError):
        killer.kill(container.id)

    container.reload()
    assert container.status == "running"


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(None, id="missing-file"),
        pytest.param("minute,calls\n1,3\n", id="wrong-header"),
        pytest.param("minute,invocations\n1,three\n", id="not-a-number"),
    ],
)
async def test_loadtest_refuses_a_bad_trace(
    content: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.csv"
    if content is not None:
        trace.write_text(content)

    code = await loadtest.main_async(["--url", "http://127.0.0.1:9", "--trace", str(trace)])

    assert code == 2
    assert str(trace) in capsys.readouterr().err
