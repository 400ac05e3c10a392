"""Shoal's reference worker: the process that runs inside each worker container.

It owns one HTTP server with three routes: ``POST /process-task`` simulates a task by
sleeping, ``GET /metrics`` reports its counters as JSON, ``GET /healthz`` says whether it
takes work. It knows nothing about the controller: Shoal finds it through Docker, probes
``/healthz``, sends tasks to it and stops it with SIGTERM, upon which the worker drains
(refuses new tasks with 503, finishes the ones in flight) and exits 0.

Stdlib only, so the image needs nothing but a Python 3.11+ interpreter. Configured by
environment: ``PORT``, ``HOST``, ``CONCURRENCY``, ``WORK_SECONDS``, ``SHOAL_WORKER_ID``,
``MODE`` and ``LOG_REQUESTS``. ``MODE=pull`` turns it around: the worker takes tasks from
``SHOAL_URL`` itself and serves nothing (see the pull mode section at the end).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import re
import select
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

logger = logging.getLogger("shoal.worker")

# Exit codes other than 0 that callers may rely on.
EXIT_BAD_CONFIG = 2
EXIT_BIND_FAILED = 3  # the process runtime retries with another port on this one

MAX_BODY_BYTES = 1 << 20
# A body over the limit is still read and dropped up to this size before the 413, so the
# answer is not lost: closing a socket with unread input resets the connection.
DISCARD_BODY_BYTES = 16 << 20
# W3C Trace Context, version 00 layout; anything else is ignored as the spec asks.
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


class ConfigError(ValueError):
    """The environment holds a value the worker cannot run with."""


@dataclass(frozen=True)
class Config:
    host: str
    port: int
    concurrency: int
    work_seconds: float
    worker_id: str
    log_requests: bool

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str]) -> Config:
        mode = env.get("MODE", "push")
        if mode not in ("push", "pull"):
            raise ConfigError(f"MODE={mode!r} is not supported; use push mode or pull mode")
        port = _env_int(env, "PORT", 8080)
        if not 0 <= port <= 65535:
            raise ConfigError(f"PORT={port} is out of range")
        concurrency = _env_int(env, "CONCURRENCY", 1)
        if concurrency < 1:
            raise ConfigError(f"CONCURRENCY={concurrency} must be at least 1")
        work_seconds = _env_float(env, "WORK_SECONDS", 120.0)
        if work_seconds < 0:
            raise ConfigError(f"WORK_SECONDS={work_seconds} must not be negative")
        return cls(
            host=env.get("HOST", "0.0.0.0"),
            port=port,
            concurrency=concurrency,
            work_seconds=work_seconds,
            worker_id=env.get("SHOAL_WORKER_ID") or socket.gethostname(),
            log_requests=env.get("LOG_REQUESTS", "") in ("1", "true", "yes"),
        )


def _env_int(env: dict[str, str] | os._Environ[str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def _env_float(env: dict[str, str] | os._Environ[str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r} is not a finite number")
    return value


class WorkerState:
    """Slots, counters and the draining flag, shared by all request threads."""

    def __init__(self, *, concurrency: int) -> None:
        self.concurrency = concurrency
        self.started_monotonic = time.monotonic()
        self._cond = threading.Condition()
        self.active = 0
        self.replying = 0  # answers of finished tasks not yet written
        self.processed = 0
        self.failed = 0
        self.rejected = 0
        self.draining = False

    def try_acquire(self) -> bool:
        with self._cond:
            if self.draining or self.active >= self.concurrency:
                self.rejected += 1
                return False
            self.active += 1
            return True

    def release(self, *, ok: bool) -> None:
        """Frees the slot; the answer is still to be written (``replied`` follows)."""
        with self._cond:
            self.active -= 1
            self.replying += 1
            if ok:
                self.processed += 1
            else:
                self.failed += 1
            self._cond.notify_all()

    def replied(self) -> None:
        with self._cond:
            self.replying -= 1
            self._cond.notify_all()

    def count_failure(self) -> None:
        with self._cond:
            self.failed += 1

    def begin_drain(self) -> bool:
        """Marks the worker draining; returns False if it already was."""
        with self._cond:
            was = self.draining
            self.draining = True
            self._cond.notify_all()
            return not was

    def wait_idle(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.active == 0 and self.replying == 0)

    def snapshot(self, worker_id: str) -> dict[str, Any]:
        with self._cond:
            return {
                "id": worker_id,
                "processed": self.processed,
                "failed": self.failed,
                "rejected": self.rejected,
                "active": self.active,
                "concurrency": self.concurrency,
                "draining": self.draining,
                "uptimeS": round(time.monotonic() - self.started_monotonic, 3),
            }


class BadRequest(Exception):
    pass


@dataclass(frozen=True)
class Task:
    task_id: str
    payload: Any
    work_s: float


def parse_task(body: bytes, *, default_work_s: float) -> Task:
    """Validates a ``/process-task`` body; raises ``BadRequest`` with a readable reason."""
    try:
        doc = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    task_id = doc.get("id")
    if not isinstance(task_id, str) or not task_id:
        raise BadRequest("'id' must be a non-empty string")
    work_s = doc.get("work_seconds")
    if work_s is None:
        work_s = default_work_s
    # NB: bool is an int subclass; true/false are not durations.
    elif isinstance(work_s, bool) or not isinstance(work_s, int | float):
        raise BadRequest("'work_seconds' must be a number")
    elif work_s < 0 or not math.isfinite(work_s):
        raise BadRequest("'work_seconds' must be a finite number, not negative")
    return Task(task_id=task_id, payload=doc.get("payload"), work_s=float(work_s))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _iso(ts: float) -> str:
    return (
        datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


class WorkerServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, config: Config, state: WorkerState) -> None:
        self.config = config
        self.state = state
        super().__init__((config.host, config.port), TaskHandler)


class TaskHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Buffer the answer so head and body leave in one write when the handler
    # returns (socketserver flushes wfile after each request): a peer never sees
    # a head without its body, and no Nagle/delayed-ACK stall can split them.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    server_version = "shoal-worker/0.1"
    # Idle keep-alive connections are dropped after this long, so their threads end.
    timeout = 75
    server: WorkerServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        state = self.server.state
        # A GET may carry a body: it must be consumed, or its bytes would be read
        # as the next request on this keep-alive connection (request smuggling).
        if self._read_body() is None:
            return
        if path == "/healthz":
            if state.draining:
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "draining"})
            else:
                self._reply(HTTPStatus.OK, {"status": "ok"})
        elif path == "/metrics":
            self._reply(HTTPStatus.OK, state.snapshot(self.server.config.worker_id))
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route for GET {path}"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        # The body is read first, whatever the answer, so a keep-alive stream stays in step.
        body = self._read_body()
        if body is None:
            return
        if path != "/process-task":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route for POST {path}"})
            return
        self._process_task(body)

    def _process_task(self, body: bytes) -> None:
        config, state = self.server.config, self.server.state
        if state.draining:
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "worker is draining"})
            return
        try:
            task = parse_task(body, default_work_s=config.work_seconds)
        except BadRequest as exc:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        if isinstance(task.payload, dict) and isinstance(task.payload.get("fail"), str):
            state.count_failure()
            logger.info("task %s failed on request: %s", task.task_id, task.payload["fail"])
            self._reply(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": task.payload["fail"]})
            return
        if not state.try_acquire():
            if state.draining:
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "worker is draining"})
            else:
                busy = f"all {state.concurrency} slots are busy"
                self._reply(HTTPStatus.TOO_MANY_REQUESTS, {"error": busy})
            return

        # NB: the slot frees before the answer is written, so a task sent the moment the
        # answer arrives finds room (no spurious 429); a drain still waits for every
        # answer to leave (``replying``) before the process exits.
        ok = abandoned = False
        try:
            started = time.time()
            abandoned = not self._work_while_connected(task.work_s)
            if abandoned:
                return
            finished = time.time()
            result: dict[str, Any] = {"echo": task.payload}
            traceparent = self._traceparent()
            if traceparent:
                result["traceparent"] = traceparent
            answer = {
                "id": task.task_id,
                "worker": config.worker_id,
                "result": result,
                "startedAt": _iso(started),
                "finishedAt": _iso(finished),
                "durationS": round(finished - started, 6),
            }
            ok = True
        finally:
            state.release(ok=ok)
            if abandoned:
                # Nobody is left to answer; the slot was freed now, not at the work's end.
                state.replied()
                self.close_connection = True
                logger.info("task %s abandoned: its client closed the connection", task.task_id)
        try:
            self._reply(HTTPStatus.OK, answer)
        finally:
            state.replied()

    def _work_while_connected(self, work_s: float) -> bool:
        """Simulates ``work_s`` of work; False if the client hung up meanwhile.

        A client that gave up (a timed-out request through the balancer) would otherwise
        hold a slot for the whole work, and the pool would look busy with nobody waiting.
        """
        deadline = time.monotonic() + work_s
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.5))
            if not readable:
                continue
            try:
                peeked = self.connection.recv(1, socket.MSG_PEEK)
            except OSError:
                return False
            if not peeked:
                return False
            # The client sent more (a pipelined request): it is still there.
            time.sleep(max(0.0, deadline - time.monotonic()))
        return True

    def _traceparent(self) -> str | None:
        value = (self.headers.get("traceparent") or "").strip().lower()
        return value if _TRACEPARENT.match(value) else None

    def _read_body(self) -> bytes | None:
        raw_length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "chunked bodies are not supported"})
            return None
        try:
            length = int(raw_length or "0")
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._reply(HTTPStatus.BAD_REQUEST, {"error": "bad Content-Length"})
            return None
        if length > MAX_BODY_BYTES:
            if length > DISCARD_BODY_BYTES or not self._discard(length):
                self.close_connection = True
            self._reply(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": f"body is too large (limit {MAX_BODY_BYTES} bytes)"},
            )
            return None
        return self.rfile.read(length)

    def _discard(self, length: int) -> bool:
        """Reads and drops ``length`` body bytes; False when the client stopped sending."""
        left = length
        while left:
            chunk = self.rfile.read(min(left, 64 * 1024))
            if not chunk:
                return False
            left -= len(chunk)
        return True

    def _reply(self, status: HTTPStatus, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        # A draining worker asks clients to reconnect, which lands them on another worker.
        if self.server.state.draining:
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        traceparent = self._traceparent()
        if traceparent:
            self.send_header("traceparent", traceparent)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        # One write for head and body; done here, not after the handler, so a
        # drain that waits for ``replied`` knows the answer has left.
        self.wfile.flush()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if self.server.config.log_requests:
            logger.info("%s %s -> %s", self.command, self.path, code)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug(format, *args)


def serve(config: Config) -> int:
    """Runs the worker until SIGTERM or SIGINT, drains, and returns the exit code."""
    state = WorkerState(concurrency=config.concurrency)
    try:
        server = WorkerServer(config, state)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        return EXIT_BIND_FAILED if exc.errno == errno.EADDRINUSE else 1

    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if state.begin_drain():
            logger.info(
                "got %s: draining, %d task(s) in flight", signal.Signals(signum).name, state.active
            )
        stop_requested.set()

    # NB: as PID 1 in a container, Python ignores SIGTERM unless a handler is installed.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # A short poll interval keeps shutdown() quick; serving happens off the main thread
    # so that the signal handler never runs inside the accept loop it must stop.
    serving = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    serving.start()
    host, port = server.server_address[:2]
    logger.info(
        "worker %s listening on %s:%s (concurrency %d, work %.3gs)",
        config.worker_id,
        host,
        port,
        config.concurrency,
        config.work_seconds,
    )

    while not stop_requested.wait(timeout=1.0):
        pass
    state.wait_idle()
    server.shutdown()
    server.server_close()
    snap = state.snapshot(config.worker_id)
    logger.info("drained: %d processed, %d failed; exiting", snap["processed"], snap["failed"])
    return 0


# --- pull mode --------------------------------------------------------------------------
# MODE=pull: the worker asks Shoal for work instead of waiting to be sent it (SHOAL_URL,
# SHOAL_POOL, and SHOAL_API_TOKEN when the API wants a bearer token). Each of
# CONCURRENCY loops runs POST {SHOAL_URL}/dequeue-task -> run -> POST /tasks/{id}/result,
# and while a task runs it POSTs /tasks/{id}/heartbeat every third of the lease, so a task
# longer than the pool's leaseTimeout stays with this live worker. A 204 (nothing to do) or
# an unreachable Shoal backs off exponentially with jitter. SIGTERM or SIGINT stops taking
# tasks; each loop finishes and reports the task it holds, then the process exits 0. A
# result that cannot be delivered is given up after a few tries: the lease then expires
# and Shoal runs the task again (at-least-once), so the worker never blocks forever.

# How many times a result is offered before the worker gives up on it.
REPORT_ATTEMPTS = 5


class ShoalUnreachable(Exception):
    """No HTTP answer from ``SHOAL_URL`` (refused, reset, timed out)."""


@dataclass(frozen=True)
class PullConfig:
    shoal_url: str
    pool: str
    worker_id: str
    concurrency: int
    work_seconds: float
    lease_s: float | None  # asked of Shoal per lease; None takes the pool's leaseTimeout
    idle_initial_s: float
    idle_max_s: float
    request_timeout_s: float
    api_token: str | None = None  # sent as a bearer token when Shoal's API asks for one

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str]) -> PullConfig:
        base = Config.from_env(env)
        url = env.get("SHOAL_URL", "").strip().rstrip("/")
        if not url:
            raise ConfigError(
                "MODE=pull needs SHOAL_URL, the Shoal API to take tasks from "
                "(or leave MODE unset to run in push mode)"
            )
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"SHOAL_URL={url!r} must be an http(s) URL with a host")
        lease_s = _env_float(env, "LEASE_SECONDS", 0.0)
        idle_initial_s = _env_float(env, "PULL_IDLE_SECONDS", 0.2)
        idle_max_s = _env_float(env, "PULL_IDLE_MAX_SECONDS", 2.0)
        if lease_s < 0 or idle_initial_s <= 0 or idle_max_s < idle_initial_s:
            raise ConfigError(
                "LEASE_SECONDS must not be negative; PULL_IDLE_SECONDS must be positive "
                "and at most PULL_IDLE_MAX_SECONDS"
            )
        return cls(
            shoal_url=url,
            pool=env.get("SHOAL_POOL") or "default",
            worker_id=base.worker_id,
            concurrency=base.concurrency,
            work_seconds=base.work_seconds,
            lease_s=lease_s or None,
            idle_initial_s=idle_initial_s,
            idle_max_s=idle_max_s,
            request_timeout_s=_env_float(env, "PULL_REQUEST_TIMEOUT_SECONDS", 10.0),
            api_token=env.get("SHOAL_API_TOKEN") or None,
        )


def next_idle_s(previous_s: float, *, initial_s: float, max_s: float) -> float:
    """The wait after an empty or failed dequeue: doubles from ``initial_s`` up to ``max_s``."""
    if previous_s <= 0:
        return initial_s
    return min(max_s, previous_s * 2)


class ShoalClient:
    """The few JSON calls a pull worker makes; stdlib only, and never through a proxy."""

    def __init__(self, config: PullConfig) -> None:
        self._config = config
        # NB: an empty ProxyHandler, so http_proxy in the environment never reroutes the calls.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if self._config.api_token:
            headers["Authorization"] = f"Bearer {self._config.api_token}"
        request = urllib.request.Request(
            self._config.shoal_url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers=headers,
        )
        try:
            with self._opener.open(request, timeout=self._config.request_timeout_s) as response:
                return response.status, _json_or_none(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _json_or_none(exc.read())
        except (urllib.error.URLError, OSError) as exc:
            raise ShoalUnreachable(f"{self._config.shoal_url}{path}: {exc}") from exc


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


class PullWorker:
    """The pull loops of one worker process; ``stop`` ends them between tasks."""

    def __init__(self, config: PullConfig, *, client: ShoalClient | None = None) -> None:
        self.config = config
        self.client = client or ShoalClient(config)
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.processed = 0
        self.failed = 0

    def run_loop(self) -> None:
        idle_s = 0.0
        while not self.stop.is_set():
            try:
                task = self._dequeue()
            except ShoalUnreachable as exc:
                idle_s = self._idle(idle_s)
                logger.warning("cannot reach Shoal, retrying in %.2fs: %s", idle_s, exc)
                self.stop.wait(idle_s * (0.5 + random.random() / 2))
                continue
            if task is None:
                idle_s = self._idle(idle_s)
                self.stop.wait(idle_s * (0.5 + random.random() / 2))
                continue
            idle_s = 0.0
            # NB: a task leased while stop was being set is still run and reported.
            self.run_task(task)

    def _idle(self, previous_s: float) -> float:
        return next_idle_s(
            previous_s, initial_s=self.config.idle_initial_s, max_s=self.config.idle_max_s
        )

    def _dequeue(self) -> dict[str, Any] | None:
        body: dict[str, Any] = {"pool": self.config.pool, "worker": self.config.worker_id}
        if self.config.lease_s is not None:
            body["lease_s"] = self.config.lease_s
        status, doc = self.client.post("/dequeue-task", body)
        if status == 200 and isinstance(doc, dict) and isinstance(doc.get("id"), str):
            return doc
        if status != 204:
            # A refusal (unknown pool, bad body) will not heal by itself, but the worker
            # stays up so that a fixed manifest is picked up; the back-off keeps it quiet.
            error = doc.get("error") if isinstance(doc, dict) else doc
            logger.warning("dequeue answered %d: %s", status, error)
        return None

    def run_task(self, doc: dict[str, Any]) -> None:
        """Runs one leased task with heartbeats, then reports its outcome."""
        task_id = str(doc["id"])
        finished_running = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat,
            args=(task_id, self._heartbeat_every_s(doc), finished_running),
            name=f"heartbeat-{task_id}",
            daemon=True,
        )
        beat.start()
        try:
            report = self._execute(doc)
        finally:
            finished_running.set()
            beat.join()
        ok = report.get("error") is None
        with self._lock:
            if ok:
                self.processed += 1
            else:
                self.failed += 1
        self._report(task_id, report)

    def _heartbeat_every_s(self, doc: dict[str, Any]) -> float:
        expires_at = doc.get("leaseExpiresAt")
        if self.config.lease_s is not None:
            lease_s = self.config.lease_s
        elif isinstance(expires_at, int | float):
            # Shoal's clock and ours are the same host's here; a skew only shifts the beat.
            lease_s = expires_at - time.time()
        else:
            lease_s = 30.0
        return max(0.1, lease_s / 3)

    def _execute(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The result body for ``/tasks/{id}/result``: the same shape push mode answers."""
        raw = json.dumps(
            {"id": doc["id"], "payload": doc.get("payload"), "work_seconds": doc.get("workSeconds")}
        ).encode()
        try:
            task = parse_task(raw, default_work_s=self.config.work_seconds)
        except BadRequest as exc:
            return {"worker": self.config.worker_id, "error": str(exc), "permanent": True}
        if isinstance(task.payload, dict) and isinstance(task.payload.get("fail"), str):
            logger.info("task %s failed on request: %s", task.task_id, task.payload["fail"])
            error = task.payload["fail"]
            return {"worker": self.config.worker_id, "error": error, "permanent": True}
        started = time.time()
        time.sleep(task.work_s)
        finished = time.time()
        result = {
            "id": task.task_id,
            "worker": self.config.worker_id,
            "result": {"echo": task.payload},
            "startedAt": _iso(started),
            "finishedAt": _iso(finished),
            "durationS": round(finished - started, 6),
        }
        return {"worker": self.config.worker_id, "result": result}

    def _heartbeat(self, task_id: str, every_s: float, finished_running: threading.Event) -> None:
        body: dict[str, Any] = {"worker": self.config.worker_id}
        if self.config.lease_s is not None:
            body["lease_s"] = self.config.lease_s
        while not finished_running.wait(every_s):
            try:
                status, doc = self.client.post(f"/tasks/{task_id}/heartbeat", body)
            except ShoalUnreachable as exc:
                logger.warning("heartbeat for task %s failed, trying again: %s", task_id, exc)
                continue
            if status == 409 or status == 404:
                # The lease moved on (it expired, or the task was redriven): Shoal runs the
                # task elsewhere and will refuse our result; finishing is harmless.
                error = doc.get("error") if isinstance(doc, dict) else doc
                logger.warning("lost the lease of task %s: %s", task_id, error)
                return

    def _report(self, task_id: str, body: dict[str, Any]) -> None:
        wait_s = 0.0
        for attempt in range(1, REPORT_ATTEMPTS + 1):
            try:
                status, doc = self.client.post(f"/tasks/{task_id}/result", body)
            except ShoalUnreachable as exc:
                status, doc = 0, str(exc)
            if 200 <= status < 300:
                return
            if status in (404, 409):
                error = doc.get("error") if isinstance(doc, dict) else doc
                logger.warning("result of task %s refused (%d): %s", task_id, status, error)
                return
            wait_s = self._idle(wait_s)
            logger.warning(
                "result of task %s not delivered (attempt %d of %d, status %s)",
                task_id,
                attempt,
                REPORT_ATTEMPTS,
                status or "unreachable",
            )
            if attempt < REPORT_ATTEMPTS:
                time.sleep(wait_s)
        logger.error("gave up reporting task %s; its lease will expire and it runs again", task_id)


def serve_pull(config: PullConfig) -> int:
    """Runs the pull loops until SIGTERM or SIGINT, lets them finish, returns the exit code."""
    worker = PullWorker(config)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if not worker.stop.is_set():
            logger.info("got %s: finishing the task(s) in hand", signal.Signals(signum).name)
        worker.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    loops = [
        threading.Thread(target=worker.run_loop, name=f"pull-{n}", daemon=True)
        for n in range(config.concurrency)
    ]
    for loop in loops:
        loop.start()
    logger.info(
        "worker %s pulling from %s pool %s (concurrency %d)",
        config.worker_id,
        config.shoal_url,
        config.pool,
        config.concurrency,
    )
    # Joined with a timeout so that the main thread keeps running the signal handlers.
    while any(loop.is_alive() for loop in loops):
        for loop in loops:
            loop.join(timeout=0.2)
    logger.info("stopped: %d processed, %d failed; exiting", worker.processed, worker.failed)
    return 0


def main() -> int:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        config = Config.from_env(os.environ)
        pull_config = PullConfig.from_env(os.environ) if os.environ.get("MODE") == "pull" else None
    except ConfigError as exc:
        logger.error("bad configuration: %s", exc)
        return EXIT_BAD_CONFIG
    if pull_config is not None:
        return serve_pull(pull_config)
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
