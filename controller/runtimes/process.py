"""The process runtime: workers as local subprocesses, for machines without a Docker engine.

It owns the worker subprocesses it spawned and nothing else: each runs ``workerimg/worker.py``
on a free 127.0.0.1 port with the same environment contract as the container, and is reported
with the same ``ObservedWorker`` shape (``proc-<pid>`` ids, synthesized labels). There is no
isolation and no resource limit: ``spec.image``, memory, cpus and pids are ignored. It is the
fallback ``--runtime auto`` picks when no engine answers, and a quick runtime for tests.

Children never outlive the runtime: ``close()`` kills what is left, and an ``atexit`` hook
does the same if the process ends without closing it.
"""

from __future__ import annotations

import asyncio
import atexit
import builtins
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from controller import logfields
from controller.errors import StartFailed
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

logger = logging.getLogger(__name__)

DEFAULT_WORKER_SCRIPT = Path(__file__).resolve().parents[2] / "workerimg" / "worker.py"
# worker.py exits with this code when its port was taken; another port is tried then.
EXIT_BIND_FAILED = 3
PORT_ATTEMPTS = 3
# worker.py logs this once its socket is bound and serving.
READY_MARKER = " listening on "


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out on ``host``; free now, not promised later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class _Child:
    proc: asyncio.subprocess.Process
    observed: ObservedWorker
    # Done when the process has exited and been reaped; its result is the exit code.
    exited: asyncio.Task[int]
    relay: asyncio.Task[None] | None = None
    registered: bool = False
    # Set when the worker logs that it is listening (see READY_MARKER).
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    log_tail: list[str] = field(default_factory=list)


class ProcessRuntime:
    """Runs each worker as a ``python worker.py`` subprocess bound to 127.0.0.1."""

    name = "process"

    def __init__(
        self,
        *,
        instance: str = "default",
        worker_script: Path = DEFAULT_WORKER_SCRIPT,
        python: str = sys.executable,
        start_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.instance = instance
        self._worker_script = worker_script
        self._python = python
        self._start_timeout_s = start_timeout_s
        self._clock = clock
        self._children: dict[WorkerId, _Child] = {}
        self._subscribers: set[asyncio.Queue[RuntimeEvent | None]] = set()
        self._starting: set[str] = set()
        self._closed = False

    # -- the Runtime protocol -------------------------------------------------------------

    async def start(self, spec: WorkerSpec) -> ObservedWorker:
        if self._closed:
            raise StartFailed("the process runtime is closed")
        names = {c.observed.name for c in self._children.values()} | self._starting
        if spec.name in names:
            raise StartFailed(f"cannot start {spec.name}: the name is already in use")
        self._starting.add(spec.name)
        try:
            return await self._start(spec)
        finally:
            self._starting.discard(spec.name)

    async def _start(self, spec: WorkerSpec) -> ObservedWorker:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = free_port()
            child = await self._spawn(spec, port=port)
            try:
                exit_code = await self._await_listening(child, port=port)
            except BaseException:
                # Cancelled or timed out: the half-started child must not linger.
                await self._terminate(child, grace_s=0.0)
                raise
            if exit_code is None:
                break
            # Reaps it and lets the log relay read its last words.
            await self._terminate(child, grace_s=0.0)
            if exit_code != EXIT_BIND_FAILED or attempt == PORT_ATTEMPTS:
                tail = " | ".join(child.log_tail[-3:])
                raise StartFailed(
                    f"{spec.name} exited at once with code {exit_code}"
                    + (f": {tail}" if tail else "")
                )
            logger.debug("port %d was taken before %s bound it; trying another", port, spec.name)

        worker_id = child.observed.worker_id
        child.observed = replace(
            child.observed, engine_state="running", host_port=port, started_at=self._clock()
        )
        child.registered = True
        self._children[worker_id] = child
        logger.info(
            "started worker %s (%s) on 127.0.0.1:%d for pool %s",
            worker_id,
            spec.name,
            port,
            spec.pool,
            extra={
                logfields.WORKER_ID: worker_id,
                logfields.CONTAINER_NAME: spec.name,
                logfields.HOST_PORT: port,
                logfields.POOL: spec.pool,
            },
        )
        self._publish(RuntimeEvent(worker_id=worker_id, action="start"))
        return child.observed

    async def stop(self, worker_id: WorkerId, *, grace_s: float) -> None:
        # Taken out of the table first, so that its exit reads as a stop and not a crash.
        child = self._children.pop(worker_id, None)
        if child is None:
            return
        await self._terminate(child, grace_s=grace_s)
        logger.info(
            "stopped worker %s (%s) on 127.0.0.1:%s",
            worker_id,
            child.observed.name,
            child.observed.host_port,
            extra={
                logfields.WORKER_ID: worker_id,
                logfields.CONTAINER_NAME: child.observed.name,
                logfields.HOST_PORT: child.observed.host_port,
                logfields.POOL: child.observed.pool,
            },
        )
        self._publish(RuntimeEvent(worker_id=worker_id, action="destroy"))

    async def list(self) -> builtins.list[ObservedWorker]:
        return [child.observed for child in self._children.values()]

    async def events(self) -> AsyncIterator[RuntimeEvent]:
        if self._closed:
            return
        queue: asyncio.Queue[RuntimeEvent | None] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._subscribers.discard(queue)

    async def close(self) -> None:
        """Kills every child still running and ends the event streams."""
        self._closed = True
        children = builtins.list(self._children.values())
        self._children.clear()
        await asyncio.gather(*(self._terminate(c, grace_s=0.0) for c in children))
        for queue in builtins.list(self._subscribers):
            queue.put_nowait(None)

    # -- plumbing ---------------------------------------------------------------------------

    async def _spawn(self, spec: WorkerSpec, *, port: int) -> _Child:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            **spec.env,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "CONCURRENCY": str(spec.concurrency),
            "SHOAL_WORKER_ID": spec.name,
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                self._python,
                str(self._worker_script),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                # Own session: a Ctrl-C meant for the controller must not reach its workers,
                # which the controller drains itself.
                start_new_session=True,
            )
        except OSError as exc:
            raise StartFailed(f"cannot run {self._python} {self._worker_script}: {exc}") from exc
        labels: Mapping[str, str] = {
            **spec.labels,
            LABEL_MANAGED: "true",
            LABEL_POOL: spec.pool,
            LABEL_TEMPLATE_HASH: spec.template_hash,
            LABEL_INSTANCE: self.instance,
        }
        observed = ObservedWorker(
            worker_id=WorkerId(f"proc-{proc.pid}"),
            name=spec.name,
            pool=spec.pool,
            template_hash=spec.template_hash,
            engine_state="created",
            labels=labels,
        )
        _pids.add(proc.pid)
        child = _Child(
            proc=proc,
            observed=observed,
            exited=asyncio.create_task(proc.wait(), name=f"wait-{observed.worker_id}"),
        )
        child.exited.add_done_callback(lambda _task: self._on_exit(child))
        child.relay = asyncio.create_task(self._relay_logs(child), name=f"logs-{proc.pid}")
        return child

    async def _await_listening(self, child: _Child, *, port: int) -> int | None:
        """Waits until the child says it listens; returns its exit code if it died first.

        NB: the worker's own log line is the signal, not a successful connect: the port may
        have been taken by someone else meanwhile, who would accept the connection too.
        """
        listening = asyncio.create_task(child.listening.wait())
        try:
            done, _ = await asyncio.wait(
                {listening, child.exited},
                timeout=self._start_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            listening.cancel()
        if child.exited in done:
            return child.exited.result()
        if not done:
            raise StartFailed(
                f"{child.observed.name} did not listen on port {port} "
                f"within {self._start_timeout_s}s"
            )
        return None

    async def _relay_logs(self, child: _Child) -> None:
        assert child.proc.stderr is not None
        async for raw in child.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            child.log_tail = [*child.log_tail[-9:], line]
            if READY_MARKER in line:
                child.listening.set()
            logger.debug(
                "%s: %s",
                child.observed.name,
                line,
                extra={logfields.WORKER_ID: child.observed.worker_id},
            )

    def _on_exit(self, child: _Child) -> None:
        _pids.discard(child.proc.pid)
        if not child.registered or child.exited.cancelled():
            return
        worker_id = child.observed.worker_id
        # A stopped worker has left the table already; one still in it has crashed.
        if self._children.get(worker_id) is child:
            exit_code = child.exited.result()
            child.observed = replace(child.observed, engine_state="exited", exit_code=exit_code)
            logger.info(
                "worker %s (%s) exited with code %d",
                worker_id,
                child.observed.name,
                exit_code,
                extra={logfields.WORKER_ID: worker_id, logfields.POOL: child.observed.pool},
            )
        self._publish(RuntimeEvent(worker_id=worker_id, action="die"))

    async def _terminate(self, child: _Child, *, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; returns once the child is reaped."""
        if not child.exited.done() and grace_s > 0:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
            await asyncio.wait({child.exited}, timeout=grace_s)
        if not child.exited.done():
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
        await asyncio.shield(child.exited)
        if child.relay is not None:
            await child.relay

    def _publish(self, event: RuntimeEvent) -> None:
        for queue in self._subscribers:
            queue.put_nowait(event)


# Last line of defence: children of runtimes nobody closed are killed when Python exits.
_pids: set[int] = set()


@atexit.register
def _kill_leftovers() -> None:
    for pid in builtins.list(_pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
