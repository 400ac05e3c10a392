"""The stdlib worker, run as a real subprocess on a free 127.0.0.1 port."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

WORKER = Path(__file__).resolve().parents[2] / "workerimg" / "worker.py"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _load_worker_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("shoal_worker_under_test", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is being built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


worker_mod = _load_worker_module()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Worker:
    """A worker subprocess and a tiny JSON client for it."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = 30.0,
    ) -> tuple[int, dict[str, Any], http.client.HTTPResponse]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            conn.request(method, path, body=data, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read()), resp
        finally:
            conn.close()

    def post_task(self, doc: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        status, body, _ = self.request("POST", "/process-task", doc, **kwargs)
        return status, body

    def metrics(self) -> dict[str, Any]:
        return self.request("GET", "/metrics")[1]

    def wait_until(self, predicate: Callable[[dict[str, Any]], bool], *, timeout_s: float = 10.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            snap = self.metrics()
            if predicate(snap):
                return snap
            time.sleep(0.01)
        raise AssertionError(f"metrics never matched; last: {snap}")


@pytest.fixture
def start_worker() -> Iterator[Callable[..., Worker]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> Worker:
        port = _free_port()
        full_env = {
            "PATH": os.environ.get("PATH", ""),
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "SHOAL_WORKER_ID": "w-test",
            **env,
        }
        proc = subprocess.Popen([sys.executable, str(WORKER)], env=full_env, stderr=subprocess.PIPE)
        procs.append(proc)
        worker = Worker(proc, port)
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                if worker.request("GET", "/healthz", timeout_s=1)[0] == 200:
                    return worker
            except OSError:
                pass
            assert time.monotonic() < deadline, "worker never answered /healthz"
            time.sleep(0.02)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


def _in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Runs ``fn`` in a thread; ``out`` gets its result, or the exception it raised."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:  # the worker may be killed under a long request
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_worker_process_task_echoes_payload_and_traceparent(start_worker):
    worker = start_worker(WORK_SECONDS="60")
    status, body, resp = worker.request(
        "POST",
        "/process-task",
        {"id": "t1", "payload": {"n": [1, 2]}, "work_seconds": 0},
        headers={"traceparent": TRACEPARENT},
    )
    assert status == 200
    assert body["id"] == "t1"
    assert body["worker"] == "w-test"
    assert body["result"] == {"echo": {"n": [1, 2]}, "traceparent": TRACEPARENT}
    assert body["durationS"] >= 0
    assert body["startedAt"].endswith("Z") and body["finishedAt"] >= body["startedAt"]
    assert resp.getheader("traceparent") == TRACEPARENT


def test_worker_ignores_malformed_traceparent(start_worker):
    worker = start_worker()
    status, body = worker.post_task(
        {"id": "t", "work_seconds": 0}, headers={"traceparent": "not-a-trace"}
    )
    assert status == 200
    assert "traceparent" not in body["result"]


def test_worker_rejects_with_429_when_all_slots_are_busy(start_worker):
    worker = start_worker(CONCURRENCY="2")
    threads = [
        _in_background(lambda i=i: worker.post_task({"id": f"long{i}", "work_seconds": 30}))
        for i in range(2)
    ]
    worker.wait_until(lambda m: m["active"] == 2)

    status, body = worker.post_task({"id": "extra", "work_seconds": 0})

    assert status == 429
    assert "busy" in body["error"]
    assert worker.metrics()["rejected"] == 1
    assert all(thread.is_alive() for thread, _ in threads)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        pytest.param(b"{not json", "valid JSON", id="bad-json"),
        pytest.param(b"[1, 2]", "JSON object", id="not-an-object"),
        pytest.param(b'{"payload": 1}', "'id'", id="missing-id"),
        pytest.param(b'{"id": ""}', "'id'", id="empty-id"),
        pytest.param(b'{"id": 7}', "'id'", id="numeric-id"),
        pytest.param(b'{"id": "a", "work_seconds": -1}', "negative", id="negative-work"),
        pytest.param(b'{"id": "a", "work_seconds": "5"}', "number", id="string-work"),
        pytest.param(b'{"id": "a", "work_seconds": true}', "number", id="bool-work"),
        pytest.param(b'{"id": "a", "work_seconds": NaN}', "valid JSON", id="nan-work"),
    ],
)
def test_worker_rejects_bad_input_with_400(start_worker, raw, fragment):
    worker = start_worker()
    status, body = worker.post_task(None, raw=raw)
    assert status == 400
    assert fragment in body["error"]


def test_worker_fail_payload_answers_422_with_the_message(start_worker):
    worker = start_worker()
    status, body = worker.post_task({"id": "f", "payload": {"fail": "bad input row 3"}})
    assert (status, body) == (422, {"error": "bad input row 3"})


def test_worker_metrics_count_processed_failed_and_slots(start_worker):
    worker = start_worker(CONCURRENCY="3", SHOAL_WORKER_ID="w-metrics")
    for i in range(3):
        assert worker.post_task({"id": f"ok{i}", "work_seconds": 0})[0] == 200
    assert worker.post_task({"id": "bad", "payload": {"fail": "x"}})[0] == 422

    snap = worker.metrics()

    assert snap["id"] == "w-metrics"
    assert (snap["processed"], snap["failed"], snap["active"]) == (3, 1, 0)
    assert snap["concurrency"] == 3
    assert snap["draining"] is False
    assert snap["uptimeS"] >= 0


def test_worker_uses_work_seconds_from_env_when_task_gives_none(start_worker):
    worker = start_worker(WORK_SECONDS="0.05")
    status, body = worker.post_task({"id": "d"})
    assert status == 200
    assert body["durationS"] >= 0.05


def test_worker_keeps_the_connection_alive_between_requests(start_worker):
    worker = start_worker()
    conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        first = conn.getresponse()
        first.read()
        sock = conn.sock
        conn.request("POST", "/process-task", body=b'{"id": "k", "work_seconds": 0}')
        second = conn.getresponse()
        second.read()
        assert (first.status, second.status) == (200, 200)
        assert conn.sock is sock, "the client had to reconnect"
    finally:
        conn.close()


def test_worker_consumes_a_get_body_so_it_cannot_smuggle_a_request(start_worker):
    """Bytes in a GET's body must never be read as the next request on the connection."""
    worker = start_worker()
    smuggled = b"GET /metrics HTTP/1.1\r\nHost: w\r\nX-Ignore: "
    first = (
        b"GET /healthz HTTP/1.1\r\nHost: w\r\nContent-Length: "
        + str(len(smuggled)).encode()
        + b"\r\n\r\n"
        + smuggled
    )
    second = b"GET /healthz HTTP/1.1\r\nHost: w\r\n\r\n"
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as sock:
        sock.sendall(first + second)
        reader = sock.makefile("rb")
        bodies = []
        for _ in range(2):
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            bodies.append(json.loads(reader.read(length)))
    assert bodies == [{"status": "ok"}, {"status": "ok"}]


def test_worker_reads_a_too_large_body_before_its_413_and_keeps_the_connection(start_worker):
    """Closing on an unread body would reset the connection and lose the 413."""
    worker = start_worker()
    conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=10)
    try:
        conn.request("POST", "/process-task", body=b"x" * (4 << 20))
        refused = conn.getresponse()
        doc = json.loads(refused.read())
        sock = conn.sock
        conn.request("GET", "/healthz")
        after = conn.getresponse()
        after.read()
        reused = conn.sock is sock
    finally:
        conn.close()
    assert refused.status == 413 and "limit 1048576 bytes" in doc["error"]
    assert after.status == 200 and reused, "the client had to reconnect"


def test_worker_frees_the_slot_of_a_task_whose_client_hung_up(start_worker):
    """A caller that gave up (a timed-out request through the balancer) holds no slot."""
    worker = start_worker(CONCURRENCY="1")
    body = b'{"id": "gone", "work_seconds": 600}'
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as sock:
        sock.sendall(
            b"POST /process-task HTTP/1.1\r\nHost: w\r\nContent-Length: %d\r\n\r\n%b"
            % (len(body), body)
        )
        worker.wait_until(lambda m: m["active"] == 1)
    snap = worker.wait_until(lambda m: m["active"] == 0, timeout_s=5.0)
    assert snap["processed"] == 0
    status, doc = worker.post_task({"id": "next", "work_seconds": 0})
    assert (status, doc["id"]) == (200, "next")


def test_worker_answers_404_for_unknown_routes(start_worker):
    worker = start_worker()
    assert worker.request("GET", "/nope")[0] == 404
    assert worker.request("POST", "/nope", {"id": "x"})[0] == 404


def test_worker_sigterm_finishes_the_task_in_flight_then_exits_0(start_worker):
    worker = start_worker()
    # The task outlasts the checks below by far; once it ends, the worker is gone.
    thread, out = _in_background(lambda: worker.post_task({"id": "inflight", "work_seconds": 3}))
    worker.wait_until(lambda m: m["active"] == 1)

    worker.proc.send_signal(signal.SIGTERM)
    worker.wait_until(lambda m: m["draining"])
    health = worker.request("GET", "/healthz")
    refused = worker.post_task({"id": "late", "work_seconds": 0})

    thread.join(timeout=30)
    assert out and out[0][0] == 200 and out[0][1]["id"] == "inflight"
    assert health[0] == 503 and health[1] == {"status": "draining"}
    assert refused[0] == 503
    assert worker.proc.wait(timeout=30) == 0


def test_worker_idle_sigterm_exits_0(start_worker):
    worker = start_worker()
    worker.proc.send_signal(signal.SIGTERM)
    # Generous bound: an idle worker that ignored SIGTERM would hang here until killed.
    assert worker.proc.wait(timeout=10) == 0


def test_worker_sigint_drains_like_sigterm(start_worker):
    worker = start_worker()
    worker.proc.send_signal(signal.SIGINT)
    assert worker.proc.wait(timeout=10) == 0


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        pytest.param({"MODE": "carrier-pigeon"}, "not supported", id="unknown-mode"),
        pytest.param({"CONCURRENCY": "0"}, "CONCURRENCY", id="zero-concurrency"),
        pytest.param({"WORK_SECONDS": "soon"}, "WORK_SECONDS", id="bad-work-seconds"),
        pytest.param({"PORT": "http"}, "PORT", id="bad-port"),
    ],
)
def test_worker_exits_2_with_a_clear_message_on_bad_config(env, fragment):
    result = subprocess.run(
        [sys.executable, str(WORKER)],
        env={"PATH": os.environ.get("PATH", ""), "HOST": "127.0.0.1", "PORT": "0", **env},
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == worker_mod.EXIT_BAD_CONFIG
    assert fragment in result.stderr.decode()


def test_worker_exits_3_when_its_port_is_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(WORKER)],
            env={"PATH": os.environ.get("PATH", ""), "HOST": "127.0.0.1", "PORT": str(port)},
            capture_output=True,
            timeout=30,
        )
    assert result.returncode == worker_mod.EXIT_BIND_FAILED


def test_config_defaults_match_the_contract():
    config = worker_mod.Config.from_env({})
    assert (config.port, config.concurrency, config.work_seconds) == (8080, 1, 120.0)
    assert config.worker_id == socket.gethostname()
    assert config.log_requests is False


def test_parse_task_accepts_integer_work_seconds_and_missing_payload():
    task = worker_mod.parse_task(b'{"id": "a", "work_seconds": 2}', default_work_s=9.0)
    assert (task.task_id, task.payload, task.work_s) == ("a", None, 2.0)
