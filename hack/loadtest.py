#!/usr/bin/env python3
"""Drive load at a Shoal API and report what came of it.

Owns the command line, the open-loop submitter, the poller that follows every accepted
task until it is final, the ``/metrics.json`` sampler and the optional chaos mode that
kills busy worker containers. The arrival schedule (a fixed rate, a load pattern or a
replayed per-minute trace) is built by ``_loadschedule.py``, and figures and reports live
in ``_loadreport.py``, both beside it.
Users, e2e tests and CI call it; the ``shoal`` package never imports it.

Every loop is bounded in count and in time, and only the ``--url`` given is contacted;
a non-loopback host is refused unless ``--allow-remote`` is passed.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import random
import sys
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from _loadreport import (  # noqa: E402
    KillEvent,
    MetricSample,
    RunResult,
    ScalingEvent,
    TaskRecord,
    render_html,
    render_text,
    summarize,
)

# NB: the schedule's names are re-exported; tests and callers reach them through this module.
from _loadschedule import (  # noqa: E402
    PATTERNS,
    UsageError,
    build_schedule,
)
from _loadschedule import rate_function as rate_function  # noqa: E402
from _loadschedule import rate_schedule as rate_schedule  # noqa: E402
from _loadschedule import read_trace as read_trace  # noqa: E402
from _loadschedule import trace_schedule as trace_schedule  # noqa: E402

logger = logging.getLogger("loadtest")

MANAGED_LABEL = "shoal.managed=true"


@dataclass(frozen=True)
class LoadConfig:
    url: str
    pool: str = "default"
    tasks: int | None = None
    rate: float = 10.0
    work_seconds: float | None = None
    pattern: str = "constant"
    peak_rate: float | None = None
    change_at_s: float | None = None
    spike_for_s: float = 5.0
    period_s: float = 30.0
    trace: Path | None = None
    compress: float = 60.0
    scale: float = 1.0
    start_minute: int = 1
    minutes: int | None = None
    arrival: str = "even"
    seed: int = 0
    timeout_s: float = 120.0
    poll_interval_s: float = 0.5
    metrics_interval_s: float = 0.5
    concurrency: int = 32
    submit_attempts: int = 5
    max_tasks: int = 200_000
    json_out: bool = False
    progress: bool | None = None
    report: Path | None = None
    kill_every_s: float | None = None
    kill_for_s: float = 60.0
    allow_remote: bool = False


# --- command line ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loadtest.py",
        description="Send tasks to a Shoal API and report throughput, latency and scaling.",
    )
    add = p.add_argument
    add("--url", default="http://127.0.0.1:8700", help="Shoal API base URL")
    add("--pool", default="default")
    add("--tasks", type=int, help="tasks to send (default 100; with --trace, a cap)")
    add("--rate", type=float, default=10.0, help="tasks per second (base rate of a pattern)")
    add("--work-seconds", type=float, help="work_seconds sent with every task")
    add("--pattern", choices=PATTERNS, default="constant")
    add("--peak-rate", type=float, help="step/spike/sine: the high rate (default 3x --rate)")
    add("--change-at", type=float, help="step/spike: seconds in (default: a third of the run)")
    add("--spike-for", type=float, default=5.0, help="spike: how long the peak lasts, seconds")
    add("--period", type=float, default=30.0, help="sine: period in seconds")
    add("--trace", type=Path, help="replay a minute,invocations CSV instead of --rate")
    add("--compress", type=float, default=60.0, help="trace: N=60 plays one minute per second")
    add("--scale", type=float, default=1.0, help="trace: multiply counts (fractions allowed)")
    add("--start-minute", type=int, default=1, help="trace: first minute to replay (1-based)")
    add("--minutes", type=int, help="trace: how many minutes to replay (default: to the end)")
    add("--arrival", choices=("even", "poisson"), default="even", help="spacing of arrivals")
    add("--seed", type=int, default=0, help="seed for arrivals, scaling and chaos choices")
    add("--timeout", type=float, default=120.0, help="seconds to wait after the last send")
    add("--poll-interval", type=float, default=0.5, help="seconds between polls of one task")
    add("--metrics-interval", type=float, default=0.5, help="seconds between /metrics.json")
    add("--concurrency", type=int, default=32, help="HTTP requests in flight for polling")
    add("--submit-attempts", type=int, default=5, help="tries per task on 503 or refusal")
    add("--max-tasks", type=int, default=200_000, help="refuse schedules larger than this")
    add("--json", action="store_true", help="print the summary as JSON on the last line")
    add("--progress", action=argparse.BooleanOptionalAction, default=None,
        help="progress on stderr (default: when stderr is a terminal)")  # fmt: skip
    add("--report", type=Path, help="write a self-contained HTML report here")
    add("--kill-workers-every", type=float, help="chaos: kill a busy worker every S seconds")
    add("--kill-for", type=float, default=60.0, help="chaos: stop killing after S seconds")
    add("--allow-remote", action="store_true", help="allow a non-loopback --url")
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: Sequence[str]) -> LoadConfig:
    """Parses and checks the command line; raises ``UsageError`` for refused requests."""
    a = _parser().parse_args(list(argv))
    parts = urlsplit(a.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url must be an http(s) URL, got {a.url!r}")
    if not a.allow_remote and not _is_loopback(parts.hostname):
        raise UsageError(
            f"refusing non-loopback host {parts.hostname!r}; pass --allow-remote to target it"
        )
    positive = {
        "--rate": a.rate,
        "--compress": a.compress,
        "--timeout": a.timeout,
        "--poll-interval": a.poll_interval,
        "--metrics-interval": a.metrics_interval,
        "--period": a.period,
        "--spike-for": a.spike_for,
        "--kill-for": a.kill_for,
    }
    for flag, value in positive.items():
        if not value > 0:
            raise UsageError(f"{flag} must be positive")
    if a.scale < 0 or (a.tasks is not None and a.tasks < 0) or a.concurrency < 1:
        raise UsageError("--scale and --tasks must not be negative, --concurrency at least 1")
    if a.kill_workers_every is not None and not a.kill_workers_every > 0:
        raise UsageError("--kill-workers-every must be positive")
    if a.peak_rate is not None and not a.peak_rate > 0:
        raise UsageError("--peak-rate must be positive")
    if a.trace is not None and a.pattern != "constant":
        raise UsageError("--pattern applies to --rate runs, not to --trace replays")
    return LoadConfig(
        url=a.url.rstrip("/"),
        pool=a.pool,
        tasks=a.tasks,
        rate=a.rate,
        work_seconds=a.work_seconds,
        pattern=a.pattern,
        peak_rate=a.peak_rate,
        change_at_s=a.change_at,
        spike_for_s=a.spike_for,
        period_s=a.period,
        trace=a.trace,
        compress=a.compress,
        scale=a.scale,
        start_minute=a.start_minute,
        minutes=a.minutes,
        arrival=a.arrival,
        seed=a.seed,
        timeout_s=a.timeout,
        poll_interval_s=a.poll_interval,
        metrics_interval_s=a.metrics_interval,
        concurrency=a.concurrency,
        submit_attempts=max(1, a.submit_attempts),
        max_tasks=a.max_tasks,
        json_out=a.json,
        progress=a.progress,
        report=a.report,
        kill_every_s=a.kill_workers_every,
        kill_for_s=a.kill_for,
        allow_remote=a.allow_remote,
    )


# --- chaos seam --------------------------------------------------------------------------


class ContainerKiller(Protocol):
    """What chaos mode needs from the engine; blocking calls, run in a thread."""

    def managed_containers(self) -> list[tuple[str, str]]:
        """``(full id, name)`` of running containers labelled ``shoal.managed=true``."""
        ...

    def kill(self, container_id: str) -> None: ...


def _same_container(container_id: str, worker_id: str) -> bool:
    short = min(len(container_id), len(worker_id))
    return short >= 12 and container_id[:short] == worker_id[:short]


class ChaosError(RuntimeError):
    """The engine refused a chaos-mode call; the run carries on without that kill."""


class DockerKiller:
    """The Docker engine behind ``ContainerKiller``; the SDK is imported only here."""

    def __init__(self) -> None:
        try:
            import docker
            import requests
        except ImportError as exc:
            raise ChaosError("chaos mode needs the docker SDK (pip install docker)") from exc
        self._errors: tuple[type[Exception], ...] = (
            docker.errors.DockerException,
            requests.RequestException,
        )
        try:
            self._client = docker.from_env()
            self._client.ping()
        except self._errors as exc:
            raise ChaosError(f"no Docker engine answered: {exc}") from exc

    def managed_containers(self) -> list[tuple[str, str]]:
        try:
            containers = self._client.containers.list(filters={"label": MANAGED_LABEL})
        except self._errors as exc:
            raise ChaosError(f"listing containers failed: {exc}") from exc
        return [(c.id, c.name) for c in containers]

    def kill(self, container_id: str) -> None:
        try:
            container = self._client.containers.get(container_id)
            # NB: checked again at kill time, so a reused or relabelled id is never touched.
            if (container.labels or {}).get("shoal.managed") != "true":
                raise ChaosError(f"container {container_id[:12]} is not Shoal-managed")
            container.kill()
        except self._errors as exc:
            raise ChaosError(f"killing {container_id[:12]} failed: {exc}") from exc


# --- the run -----------------------------------------------------------------------------


def _retry_after_s(value: str | None, *, default_s: float = 1.0) -> float:
    try:
        return max(0.0, float(value)) if value is not None else default_s
    except ValueError:
        # An HTTP-date is allowed by RFC 9110 section 10.2.3; a second is close enough here.
        return default_s


def _optional_float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _worker_name(entry: Any) -> str:
    if isinstance(entry, dict):
        return str(entry.get("id") or entry.get("worker") or entry.get("workerId") or entry)
    return str(entry)


def with_task_body(record: TaskRecord, body: dict[str, Any]) -> TaskRecord:
    """The record updated from a ``GET /tasks/{id}`` (or 202) body; unknown fields ignored."""
    workers = body.get("workers")
    attempts = body.get("attempts")
    state = body.get("state")
    return replace(
        record,
        state=state if isinstance(state, str) else record.state,
        attempts=attempts if isinstance(attempts, int) else record.attempts,
        worker=str(body["worker"]) if body.get("worker") else record.worker,
        workers=(
            tuple(_worker_name(w) for w in workers) if isinstance(workers, list) else record.workers
        ),
        created_at=_optional_float(body.get("createdAt")) or record.created_at,
        started_at=_optional_float(body.get("startedAt")) or record.started_at,
        finished_at=_optional_float(body.get("finishedAt")) or record.finished_at,
    )


class LoadRun:
    """One run: submit on schedule, follow tasks until final, sample metrics, kill workers.

    Submission is open loop: each task is sent at its scheduled offset whether or not
    earlier ones were answered. Polling revisits each unfinished task about every
    ``poll_interval_s`` with at most ``concurrency`` requests in flight. The run ends
    when every accepted task is final, or ``timeout_s`` after the last scheduled send.
    """

    def __init__(
        self,
        config: LoadConfig,
        *,
        offsets: Sequence[float],
        description: str,
        submit_session: aiohttp.ClientSession,
        observe_session: aiohttp.ClientSession,
        killer: ContainerKiller | None = None,
        progress: bool = False,
    ) -> None:
        self._config = config
        self._offsets = list(offsets)
        self._description = description
        self._submit_session = submit_session
        self._observe_session = observe_session
        self._killer = killer
        self._progress = progress
        self._run_id = uuid.uuid4().hex[:12]
        self._records = [TaskRecord(seq=i, scheduled_s=o) for i, o in enumerate(self._offsets)]
        self._pending: deque[int] = deque()
        self._in_poll: set[int] = set()
        self._next_poll_at: dict[int, float] = {}
        self._submit_done = False
        self._finished = asyncio.Event()
        self._stop = asyncio.Event()
        self._work = asyncio.Event()
        self._samples: list[MetricSample] = []
        self._worker_ids: tuple[str, ...] = ()
        self._kills: list[KillEvent] = []
        self._counters = {
            "poll_errors": 0,
            "metrics_errors": 0,
            "submit_retries": 0,
            "kill_skipped": 0,
            "kill_errors": 0,
        }
        schedule_s = self._offsets[-1] if self._offsets else 0.0
        self._span_s = schedule_s + config.timeout_s
        # A count bound beside the time bound: enough polls for every task at every interval.
        self._polls_left = len(self._offsets) * (int(self._span_s / config.poll_interval_s) + 2)
        self._t0 = 0.0
        self._t0_unix = 0.0

    async def run(self) -> RunResult:
        loop = asyncio.get_running_loop()
        self._t0, self._t0_unix = loop.time(), time.time()
        deadline = self._t0 + self._span_s
        background = [asyncio.create_task(self._sample_metrics())]
        if self._progress:
            background.append(asyncio.create_task(self._show_progress()))
        if self._killer is not None and self._config.kill_every_s is not None:
            background.append(asyncio.create_task(self._kill_workers(self._killer)))
        pollers = [asyncio.create_task(self._poll_loop()) for _ in range(self._config.concurrency)]
        try:
            await self._submit_all()
            self._submit_done = True
            self._check_finished()
            try:
                await asyncio.wait_for(self._finished.wait(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                logger.warning("timed out with %d tasks not final", len(self._pending))
        finally:
            for task in pollers:
                task.cancel()
            await asyncio.gather(*pollers, return_exceptions=True)

        await self._final_sweep()
        ended_at = time.time()
        self._stop.set()
        await asyncio.gather(*background, return_exceptions=True)
        return RunResult(
            url=self._config.url,
            pool=self._config.pool,
            description=self._description,
            started_at=self._t0_unix,
            ended_at=ended_at,
            tasks=tuple(self._records),
            samples=tuple(self._samples),
            events=tuple(await self._fetch_events()),
            kills=tuple(self._kills),
            counters=dict(self._counters),
        )

    # submitting

    async def _submit_all(self) -> None:
        loop = asyncio.get_running_loop()
        in_flight: set[asyncio.Task[None]] = set()
        for seq, offset in enumerate(self._offsets):
            delay = self._t0 + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif seq % 64 == 0:
                # Behind schedule: still let earlier sends and the pollers make progress.
                await asyncio.sleep(0)
            task = asyncio.create_task(self._submit(seq))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.gather(*in_flight)

    async def _submit(self, seq: int) -> None:
        body: dict[str, Any] = {
            "pool": self._config.pool,
            "payload": {"loadtest": self._run_id, "seq": seq},
        }
        if self._config.work_seconds is not None:
            body["work_seconds"] = self._config.work_seconds
        self._records[seq] = replace(self._records[seq], sent_at=time.time())
        reason = "not sent"
        for attempt in range(1, self._config.submit_attempts + 1):
            try:
                async with self._submit_session.post(
                    f"{self._config.url}/enqueue-task", json=body
                ) as resp:
                    data = await _json_or_empty(resp)
                    if 200 <= resp.status < 300 and isinstance(data.get("id"), str):
                        self._accept(seq, data)
                        return
                    if resp.status not in (429, 503):
                        self._reject(seq, f"http {resp.status}: {data.get('error', '')}".strip())
                        return
                    reason = f"http {resp.status}"
                    delay_s = _retry_after_s(resp.headers.get("Retry-After"))
            except aiohttp.ClientConnectorError:
                # Nothing reached the server, so a retry cannot enqueue the task twice.
                reason, delay_s = "connection refused", 0.2 * 2**attempt
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._reject(seq, f"transport: {type(exc).__name__}")
                return
            if attempt < self._config.submit_attempts:
                self._counters["submit_retries"] += 1
                await asyncio.sleep(min(delay_s, 5.0))
        self._reject(seq, reason)

    def _accept(self, seq: int, body: dict[str, Any]) -> None:
        record = with_task_body(replace(self._records[seq], task_id=str(body["id"])), body)
        self._records[seq] = record
        if record.final:
            return
        self._next_poll_at[seq] = asyncio.get_running_loop().time() + self._config.poll_interval_s
        self._pending.append(seq)
        self._work.set()

    def _reject(self, seq: int, reason: str) -> None:
        self._records[seq] = replace(self._records[seq], rejected=reason)
        logger.debug("task %d rejected: %s", seq, reason)

    # following tasks

    def _check_finished(self) -> None:
        if self._submit_done and not self._pending and not self._in_poll:
            self._finished.set()

    async def _poll_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._finished.is_set() and self._polls_left > 0:
            if not self._pending:
                self._work.clear()
                try:
                    await asyncio.wait_for(self._work.wait(), 0.2)
                except TimeoutError:
                    pass
                continue
            wait_s = self._next_poll_at[self._pending[0]] - loop.time()
            if wait_s > 0:
                await asyncio.sleep(min(wait_s, 0.2))
                continue

            seq = self._pending.popleft()
            self._in_poll.add(seq)
            self._polls_left -= 1
            try:
                await self._poll(seq)
            finally:
                # NB: runs on cancellation too, so a task being polled is never dropped.
                self._in_poll.discard(seq)
                if not self._done(seq):
                    self._next_poll_at[seq] = loop.time() + self._config.poll_interval_s
                    self._pending.append(seq)
                self._check_finished()

    def _done(self, seq: int) -> bool:
        record = self._records[seq]
        return record.final or record.gone

    async def _poll(self, seq: int) -> None:
        record = self._records[seq]
        url = f"{self._config.url}/tasks/{record.task_id}"
        try:
            async with self._observe_session.get(url) as resp:
                if resp.status == 404:
                    self._records[seq] = replace(record, gone=True)
                    logger.warning("task %s came back 404", record.task_id)
                    return
                body = await _json_or_empty(resp)
                if resp.status != 200 or not body:
                    self._counters["poll_errors"] += 1
                    return
        except (aiohttp.ClientError, TimeoutError):
            self._counters["poll_errors"] += 1
            return
        self._records[seq] = with_task_body(record, body)

    async def _final_sweep(self) -> None:
        """One last look at tasks still unfinished, so a late finish is not called lost."""
        left = list(self._pending)
        if not left:
            return
        semaphore = asyncio.Semaphore(self._config.concurrency)

        async def look(seq: int) -> None:
            async with semaphore:
                await self._poll(seq)

        try:
            await asyncio.wait_for(asyncio.gather(*(look(s) for s in left)), 15.0)
        except TimeoutError:
            logger.warning("final sweep timed out")

    # observing the system

    async def _sample_metrics(self) -> None:
        max_samples = int(self._span_s / self._config.metrics_interval_s) + 60
        for _ in range(max_samples):
            await self._sample_once()
            try:
                await asyncio.wait_for(self._stop.wait(), self._config.metrics_interval_s)
                return
            except TimeoutError:
                pass

    async def _sample_once(self) -> None:
        try:
            async with self._observe_session.get(f"{self._config.url}/metrics.json") as resp:
                body = await _json_or_empty(resp)
        except (aiohttp.ClientError, TimeoutError):
            body = {}
        replicas = body.get("replicas")
        if not isinstance(replicas, int):
            if self._counters["metrics_errors"] == 0:
                logger.warning("/metrics.json gave no replica count; still trying")
            self._counters["metrics_errors"] += 1
            return
        pools = body.get("pools")
        pool = pools.get(self._config.pool) if isinstance(pools, dict) else None
        desired = pool.get("desired") if isinstance(pool, dict) else None
        if isinstance(pool, dict):
            # This pool's own workers, not every pool's.
            ready, starting = pool.get("ready"), pool.get("starting")
            if isinstance(ready, int) and isinstance(starting, int):
                replicas = ready + starting
        worker_ids = body.get("workerIds")
        if isinstance(worker_ids, list):
            self._worker_ids = tuple(str(w) for w in worker_ids)
        self._samples.append(
            MetricSample(
                at=time.time(),
                replicas=replicas,
                queue_length=_optional_int(body.get("queueLength")),
                active_tasks=_optional_int(body.get("activeTasks")),
                pool_desired=desired if isinstance(desired, int) else None,
            )
        )

    async def _fetch_events(self) -> list[ScalingEvent]:
        try:
            async with self._observe_session.get(f"{self._config.url}/scaling-events") as resp:
                body = await _json_or_empty(resp)
        except (aiohttp.ClientError, TimeoutError):
            return []
        events = body.get("events")
        found: list[ScalingEvent] = []
        for raw in events if isinstance(events, list) else []:
            if not isinstance(raw, dict) or not isinstance(raw.get("time"), int | float):
                continue
            pool = str(raw.get("pool", self._config.pool))
            # Only this run's window and pool; earlier history belongs to other runs.
            if raw["time"] < self._t0_unix - 1.0 or pool != self._config.pool:
                continue
            found.append(
                ScalingEvent(
                    at=float(raw["time"]),
                    pool=pool,
                    from_replicas=_optional_int(raw.get("from")),
                    to_replicas=_optional_int(raw.get("to")),
                    reason=str(raw.get("reason", "")),
                )
            )
        return found

    async def _show_progress(self) -> None:
        tty = sys.stderr.isatty()
        interval_s = 0.25 if tty else 2.0
        max_updates = int(self._span_s / interval_s) + 120
        loop = asyncio.get_running_loop()
        for _ in range(max_updates):
            final = sum(1 for r in self._records if r.final or r.rejected or r.gone)
            sent = sum(1 for r in self._records if r.sent_at is not None)
            total = max(len(self._records), 1)
            bar = "#" * (24 * final // total)
            replicas = self._samples[-1].replicas if self._samples else "-"
            line = (
                f"[{bar:<24}] sent {sent}/{len(self._records)} done {final} "
                f"replicas {replicas} {loop.time() - self._t0:6.1f}s"
            )
            sys.stderr.write(f"\r{line}" if tty else f"{line}\n")
            sys.stderr.flush()
            try:
                await asyncio.wait_for(self._stop.wait(), interval_s)
                break
            except TimeoutError:
                pass
        if tty:
            sys.stderr.write("\n")

    # chaos

    async def _kill_workers(self, killer: ContainerKiller) -> None:
        every_s = self._config.kill_every_s or 1.0
        rng = random.Random(self._config.seed + 1)
        for _ in range(int(self._config.kill_for_s / every_s)):
            try:
                await asyncio.wait_for(self._finished.wait(), every_s)
                return
            except TimeoutError:
                pass
            await self._kill_one(killer, rng)

    async def _kill_one(self, killer: ContainerKiller, rng: random.Random) -> None:
        """Kills one Shoal-managed container that runs one of this run's tasks, if any."""
        # A task names its worker by container name or id; /metrics.json lists ids.
        busy = {r.worker for r in self._records if r.state == "running" and r.worker}
        try:
            containers = await asyncio.to_thread(killer.managed_containers)
            candidates = sorted(
                container_id
                for container_id, name in containers
                if any(_same_container(container_id, w) for w in self._worker_ids)
                and (name in busy or any(_same_container(container_id, w) for w in busy))
            )
            if not candidates:
                self._counters["kill_skipped"] += 1
                return
            victim = rng.choice(candidates)
            await asyncio.to_thread(killer.kill, victim)
        except ChaosError as exc:
            self._counters["kill_errors"] += 1
            logger.warning("chaos kill failed, carrying on: %s", exc)
            return
        self._kills.append(KillEvent(at=time.time(), container_id=victim))
        logger.info("chaos: killed busy worker %s", victim[:12])


def _optional_int(value: Any) -> int | None:
    return value if isinstance(value, int) else None


async def _json_or_empty(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        data = await resp.json(content_type=None)
    except (ValueError, aiohttp.ClientPayloadError):
        return {}
    return data if isinstance(data, dict) else {}


# --- entry points ------------------------------------------------------------------------


def _failed(summary: dict[str, Any]) -> bool:
    if summary["lost"] or summary["failed"] or summary["dead"]:
        return True
    # Nothing accepted at all means the target never took the load; that is no pass.
    return bool(summary["scheduled"]) and not summary["submitted"]


async def main_async(argv: Sequence[str], *, killer: ContainerKiller | None = None) -> int:
    """Runs one load test from a command line and returns the process exit code.

    0: every accepted task succeeded (or was cancelled); 1: a task was lost, failed or
    dead, or none was accepted; 2: the command line was refused. ``killer`` replaces
    the Docker engine in chaos mode (tests pass a fake).
    """
    try:
        config = parse_args(argv)
        offsets, description = build_schedule(config)
        if config.kill_every_s is not None and killer is None:
            killer = DockerKiller()
    except (UsageError, ChaosError) as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2

    progress = config.progress if config.progress is not None else sys.stderr.isatty()
    timeout = aiohttp.ClientTimeout(total=10.0)
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100), timeout=timeout
        ) as submit_session,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=config.concurrency + 2), timeout=timeout
        ) as observe_session,
    ):
        result = await LoadRun(
            config,
            offsets=offsets,
            description=description,
            submit_session=submit_session,
            observe_session=observe_session,
            killer=killer,
            progress=progress,
        ).run()

    summary = summarize(result)
    print(render_text(result, summary))
    if config.report is not None:
        try:
            config.report.write_text(render_html(result, summary), encoding="utf-8")
            print(f"  report        {config.report}")
        except OSError as exc:
            # The figures below are still worth having; only the page is missing.
            logger.error("could not write %s: %s", config.report, exc.strerror)
    if config.json_out:
        print(json.dumps(summary, sort_keys=True))
    return 1 if _failed(summary) else 0


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="loadtest: %(levelname)s %(message)s")
    try:
        return asyncio.run(main_async(sys.argv[1:]))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
