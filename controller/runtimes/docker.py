"""The Docker runtime: Shoal's workers as containers of the local Docker engine.

It owns every call Shoal makes to the Docker SDK and the translation of its errors into
``RuntimeUnavailable`` and ``StartFailed``. It does not decide how many workers run, nor probe
them over HTTP: the reconciler asks, this module does, and ``list()`` reports what the engine
holds. Ownership is by label; a container without ``shoal.managed=true`` and this runtime's
``shoal.instance`` is never listed, stopped or removed.

The SDK blocks, so every call runs in a bounded thread pool and the event loop never waits on
a socket. Calls that are safe to repeat are retried with backoff on connection errors and
engine 5xx answers; client errors (a name conflict, a missing image) fail at once.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar

import docker  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]
import tenacity

from controller import logfields
from controller.errors import RuntimeUnavailable, ShoalError, StartFailed
from controller.runtimes.base import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_POOL,
    LABEL_TEMPLATE_HASH,
    EngineState,
    ObservedWorker,
    RuntimeEvent,
    WorkerId,
    WorkerSpec,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Not part of the shared label set: lets list() find the worker's port among several bindings.
LABEL_CONTAINER_PORT = "shoal.container-port"

DEFAULT_PIDS_LIMIT = 256
DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024
DEFAULT_CPUS = 1.0
# Workers run as this uid:gid whatever the image's USER says (the worker image's own user).
DEFAULT_WORKER_USER = "10001:10001"
# noexec/nosuid/nodev: the one writable place holds data, never programs or device nodes.
TMPFS_OPTIONS = "rw,noexec,nosuid,nodev,size=16m"
WATCHED_ACTIONS = frozenset({"create", "start", "die", "stop", "kill", "oom", "destroy"})

_ENGINE_STATES: Mapping[str, EngineState] = {
    "created": "created",
    "running": "running",
    "exited": "exited",
    "dead": "exited",
    "removing": "exited",
}


def docker_available(timeout_s: float = 2.0) -> tuple[bool, str]:
    """Pings the engine named by the environment (``DOCKER_HOST``); returns (ok, reason)."""
    unreachable = _unix_socket_error(timeout_s)
    if unreachable is not None:
        return False, f"no Docker engine answered: {unreachable}"
    client = None
    try:
        client = docker.from_env(timeout=timeout_s)
        client.ping()
        version = client.version().get("Version", "?")
        return True, f"Docker engine {version} answered at {client.api.base_url}"
    except (docker.errors.DockerException, OSError) as exc:
        return False, f"no Docker engine answered: {_reason(exc)}"
    finally:
        if client is not None:
            client.close()


def _unix_socket_error(timeout_s: float) -> str | None:
    """Why the engine's Unix socket takes no connection; None when it does or is not used.

    Checked before the SDK is asked: docker 7 leaves its socket open (a ResourceWarning
    at the next garbage collection) when the connect fails.
    """
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not host.startswith("unix://"):
        return None
    path = host.removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
        except OSError as exc:
            return f"cannot connect to {path}: {exc.strerror or exc}"
    return None


def _is_transient(exc: BaseException, *, server_errors: bool = True) -> bool:
    """Worth retrying: the engine was unreachable, or (optionally) answered 5xx."""
    if isinstance(exc, docker.errors.APIError):
        return server_errors and exc.is_server_error()
    # requests' ConnectionError and Timeout are OSErrors; so are socket errors.
    return isinstance(exc, OSError)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__


def _parse_docker_time(value: str | None) -> float | None:
    """Parses Docker's RFC 3339 times (nanoseconds, 'Z'); the zero time means never."""
    if not value or value.startswith("0001-01-01"):
        return None
    head, _, frac = value.rstrip("Z").partition(".")
    offset = ""
    for sign in ("+", "-"):
        if sign in frac:
            frac, _, rest = frac.partition(sign)
            offset = sign + rest
    micro = (frac + "000000")[:6] if frac else "000000"
    try:
        stamp = datetime.fromisoformat(f"{head}.{micro}{offset or '+00:00'}")
    except ValueError:
        return None
    return stamp.timestamp()


def _host_port(attrs: Mapping[str, Any], container_port: int | None) -> int | None:
    """The 127.0.0.1 host port Docker bound for the worker's port, if any yet."""
    ports = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
    keys = [f"{container_port}/tcp"] if container_port else sorted(ports)
    for key in keys:
        for binding in ports.get(key) or []:
            host_port = binding.get("HostPort")
            if host_port and binding.get("HostIp") in ("127.0.0.1", "", None):
                return int(host_port)
    return None


class _EventWatcher:
    """Reads the engine's event stream in a thread and hands hints to the event loop."""

    def __init__(
        self,
        runtime: DockerRuntime,
        *,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[RuntimeEvent | None],
        since: str,
    ) -> None:
        self._runtime = runtime
        self._since = since
        self._loop = loop
        self._queue = queue
        self._stopping = threading.Event()
        self._stream_lock = threading.Lock()
        self._stream: Any = None
        self._thread = threading.Thread(target=self._run, name="shoal-docker-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._stream_lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            # NB: closing the socket is the only way to unblock the reading thread.
            try:
                stream.close()
            except Exception:  # the stream may already be gone; nothing to clean then
                logger.debug("closing the event stream failed", exc_info=True)

    def _hand_over(self, item: RuntimeEvent | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            # The loop is closed: nobody is listening any more.
            self._stopping.set()

    def _run(self) -> None:
        since = self._since
        backoff_s = 0.2
        try:
            while not self._stopping.is_set():
                try:
                    since = self._follow(since)
                    backoff_s = 0.2
                except Exception as exc:
                    if self._stopping.is_set():
                        break
                    logger.warning(
                        "docker event stream lost (%s); reconnecting in %.1fs",
                        _reason(exc),
                        backoff_s,
                        extra={logfields.REASON: _reason(exc)},
                    )
                if self._stopping.wait(backoff_s):
                    break
                backoff_s = min(backoff_s * 2, 5.0)
        finally:
            self._hand_over(None)

    def _follow(self, since: str) -> str:
        """Follows one connection to its end; returns where the next one should resume."""
        client = self._runtime._client_sync()
        stream = client.events(
            decode=True,
            since=since,
            filters={
                "type": "container",
                "label": self._runtime._label_filters(),
                "event": [*sorted(WATCHED_ACTIONS), "health_status"],
            },
        )
        with self._stream_lock:
            if self._stopping.is_set():
                stream.close()
                return since
            self._stream = stream
        for raw in stream:
            time_ns = raw.get("timeNano")
            if isinstance(time_ns, int):
                # Resuming one nanosecond later replays what a reconnect missed, not more.
                since = f"{(time_ns + 1) // 10**9}.{(time_ns + 1) % 10**9:09d}"
            event = self._runtime._to_event(raw)
            if event is not None:
                self._hand_over(event)
        return since


class DockerRuntime:
    """Starts, stops and lists Shoal's worker containers on one Docker engine.

    ``instance`` separates several Shoal installations (or test runs) sharing an engine:
    each one sees only containers labelled with its own instance. ``client`` is created
    from the environment on first use unless given; an injected client is not closed.
    """

    name = "docker"

    def __init__(
        self,
        *,
        instance: str = "default",
        client: docker.DockerClient | None = None,
        max_concurrency: int = 4,
        extra_labels: Mapping[str, str] | None = None,
        start_timeout_s: float = 10.0,
        retry_attempts: int = 4,
        worker_user: str = DEFAULT_WORKER_USER,
    ) -> None:
        if worker_user.split(":", 1)[0] in ("", "0", "root"):
            raise ValueError(f"workers never run as root; worker_user={worker_user!r}")
        self.instance = instance
        self.worker_user = worker_user
        self._client = client
        self._owns_client = client is None
        self._client_lock = threading.Lock()
        self._extra_labels = dict(extra_labels or {})
        self._start_timeout_s = start_timeout_s
        self._retry_attempts = retry_attempts
        self._executor = ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix="shoal-docker"
        )
        self._closing = threading.Event()
        self._watchers: set[_EventWatcher] = set()

    @classmethod
    def available(cls, timeout_s: float = 2.0) -> tuple[bool, str]:
        return docker_available(timeout_s)

    # -- the Runtime protocol -------------------------------------------------------------

    async def start(self, spec: WorkerSpec) -> ObservedWorker:
        """Creates and starts the container; returns once Docker has bound its host port.

        NB: cancelling the caller does not stop a start already running in its thread. The
        container then appears in ``list()`` like any other, for the reconciler to keep or
        remove; a start that fails removes its container itself.
        """
        return await self._run(self._start_sync, spec)

    async def stop(self, worker_id: WorkerId, *, grace_s: float) -> None:
        await self._run(self._stop_sync, worker_id, grace_s)

    async def list(self) -> list[ObservedWorker]:
        return await self._run(self._list_sync)

    async def events(self) -> AsyncIterator[RuntimeEvent]:
        """Yields container changes until ``close()``; reconnects to the engine on its own.

        The stream covers everything from the moment it is first awaited. After a reconnect
        the engine replays what happened since the last event seen, so a short outage loses
        no hint (and a duplicate hint is harmless: receivers re-list).
        """
        if self._closing.is_set():
            return
        queue: asyncio.Queue[RuntimeEvent | None] = asyncio.Queue()
        # The engine replays from this instant, however long the thread takes to connect; a
        # second earlier absorbs clock skew with a remote engine (a repeated hint is harmless).
        since = f"{time.time() - 1.0:.9f}"
        watcher = _EventWatcher(self, loop=asyncio.get_running_loop(), queue=queue, since=since)
        self._watchers.add(watcher)
        watcher.start()
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            watcher.stop()
            self._watchers.discard(watcher)

    async def close(self) -> None:
        """Ends event streams, waits for calls in flight, and closes an owned client."""
        self._closing.set()
        for watcher in list(self._watchers):
            watcher.stop()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs a blocking call in the pool; SDK errors that escape it mean the engine failed."""
        if self._closing.is_set():
            raise RuntimeUnavailable("the docker runtime is closed")
        try:
            call = self._executor.submit(fn, *args)
        except RuntimeError as exc:
            # close() shut the pool down between the check above and now.
            raise RuntimeUnavailable("the docker runtime is closed") from exc
        try:
            return await asyncio.wrap_future(call)
        except ShoalError:
            raise
        except (docker.errors.DockerException, OSError) as exc:
            raise RuntimeUnavailable(f"docker engine: {_reason(exc)}") from exc

    def _client_sync(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = docker.from_env()
            return self._client

    def _retrying(
        self, fn: Callable[..., T], *args: Any, server_errors: bool = True, **kwargs: Any
    ) -> T:
        """Calls ``fn`` with retries and backoff on transient engine failures."""
        retryer = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self._retry_attempts),
            wait=tenacity.wait_exponential(multiplier=0.1, max=2.0) + tenacity.wait_random(0, 0.1),
            retry=tenacity.retry_if_exception(
                functools.partial(_is_transient, server_errors=server_errors)
            ),
            before_sleep=self._log_retry,
            reraise=True,
        )
        return retryer(fn, *args, **kwargs)

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        name = getattr(state.fn, "__name__", "call")
        logger.warning(
            "docker %s failed (attempt %d of %d): %s",
            name,
            state.attempt_number,
            self._retry_attempts,
            _reason(exc) if exc else "?",
            extra={logfields.ATTEMPT: state.attempt_number, logfields.ACTION: name},
        )

    def _labels_for(self, spec: WorkerSpec) -> dict[str, str]:
        # NB: Shoal's own labels are applied last so that no extra label can disown a worker.
        return {
            **self._extra_labels,
            **spec.labels,
            LABEL_MANAGED: "true",
            LABEL_POOL: spec.pool,
            LABEL_TEMPLATE_HASH: spec.template_hash,
            LABEL_INSTANCE: self.instance,
            LABEL_CONTAINER_PORT: str(spec.port),
        }

    def _label_filters(self) -> builtins.list[str]:
        return [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={self.instance}"]

    def _owns(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return labels.get(LABEL_MANAGED) == "true" and labels.get(LABEL_INSTANCE) == self.instance

    def _to_event(self, raw: Mapping[str, Any]) -> RuntimeEvent | None:
        actor = raw.get("Actor") or {}
        action = str(raw.get("Action") or raw.get("status") or "")
        base_action = action.split(":", 1)[0]
        if raw.get("Type", "container") != "container" or not self._owns(actor.get("Attributes")):
            return None
        if base_action not in WATCHED_ACTIONS and base_action != "health_status":
            return None
        return RuntimeEvent(
            worker_id=WorkerId(str(actor.get("ID") or raw.get("id"))), action=action
        )

    # -- blocking bodies, run in the pool ---------------------------------------------------

    def _start_sync(self, spec: WorkerSpec) -> ObservedWorker:
        client = self._client_sync()
        env = {
            **spec.env,
            "PORT": str(spec.port),
            "CONCURRENCY": str(spec.concurrency),
            "SHOAL_WORKER_ID": spec.name,
        }
        memory_bytes = spec.memory_bytes or DEFAULT_MEMORY_BYTES
        try:
            container = self._retrying(
                client.containers.create,
                spec.image,
                name=spec.name,
                labels=self._labels_for(spec),
                environment=env,
                ports={f"{spec.port}/tcp": ("127.0.0.1", None)},
                user=self.worker_user,
                read_only=True,
                tmpfs={"/tmp": TMPFS_OPTIONS},
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                privileged=False,
                pids_limit=spec.pids or DEFAULT_PIDS_LIMIT,
                mem_limit=memory_bytes,
                # Equal to the memory limit: no swap on top of it.
                memswap_limit=memory_bytes,
                nano_cpus=int((spec.cpus or DEFAULT_CPUS) * 1e9),
                # NB: no volumes and no binds, so never the Docker socket.
                auto_remove=False,
            )
        except docker.errors.ImageNotFound as exc:
            raise StartFailed(
                f"cannot start {spec.name}: image {spec.image} is not present ({_reason(exc)})",
                retry_after_s=30.0,
            ) from exc
        except docker.errors.APIError as exc:
            if exc.is_server_error():
                raise RuntimeUnavailable(f"docker engine: {_reason(exc)}") from exc
            raise StartFailed(f"cannot create {spec.name}: {_reason(exc)}") from exc

        # From here on a container exists: any failure removes it before it is reported.
        try:
            self._retrying(container.start, server_errors=False)
            attrs = self._await_port(container, spec)
        except BaseException as exc:
            self._remove_quietly(container.id)
            if isinstance(exc, StartFailed):
                raise
            raise StartFailed(f"cannot start {spec.name}: {_reason(exc)}") from exc

        worker = self._observe(attrs)
        logger.info(
            "started worker %s (%s) on 127.0.0.1:%s for pool %s",
            worker.short_id,
            worker.name,
            worker.host_port,
            worker.pool,
            extra={
                logfields.CONTAINER_ID: worker.short_id,
                logfields.CONTAINER_NAME: worker.name,
                logfields.HOST_PORT: worker.host_port,
                logfields.POOL: worker.pool,
            },
        )
        return worker

    def _await_port(self, container: Any, spec: WorkerSpec) -> Mapping[str, Any]:
        """Re-inspects a started container until Docker has bound its host port."""
        deadline = time.monotonic() + self._start_timeout_s
        delay_s = 0.02
        while True:
            self._retrying(container.reload)
            attrs: Mapping[str, Any] = container.attrs
            state = attrs.get("State") or {}
            if state.get("Status") in ("exited", "dead"):
                tail = self._log_tail(container)
                raise StartFailed(
                    f"{spec.name} exited at once with code {state.get('ExitCode')}"
                    + (f": {tail}" if tail else "")
                )
            if state.get("Status") == "running" and _host_port(attrs, spec.port):
                return attrs
            if time.monotonic() > deadline:
                raise StartFailed(f"{spec.name} got no host port within {self._start_timeout_s}s")
            if self._closing.wait(delay_s):
                raise StartFailed(f"{spec.name}: the runtime closed while starting it")
            delay_s = min(delay_s * 2, 0.25)

    def _log_tail(self, container: Any) -> str:
        try:
            raw = container.logs(tail=3)
        except (docker.errors.DockerException, OSError):
            return ""
        return " | ".join(raw.decode(errors="replace").strip().splitlines())[-500:]

    def _remove_quietly(self, container_id: str) -> None:
        try:
            self._retrying(self._client_sync().api.remove_container, container_id, force=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, OSError) as exc:
            # The container carries our labels, so the next list() shows it for removal.
            logger.warning(
                "could not remove failed container %s: %s",
                container_id[:12],
                _reason(exc),
                extra={logfields.CONTAINER_ID: container_id[:12]},
            )

    def _stop_sync(self, worker_id: WorkerId, grace_s: float) -> None:
        client = self._client_sync()
        try:
            container = self._retrying(client.containers.get, worker_id)
        except docker.errors.NotFound:
            logger.debug("worker %s is already gone", worker_id[:12])
            return
        if not self._owns(container.labels):
            # NB: the id may come from a stale cache; never touch what is not ours.
            logger.warning(
                "refusing to stop container %s: it is not managed by instance %s",
                container.short_id,
                self.instance,
                extra={logfields.CONTAINER_ID: container.short_id},
            )
            return
        host_port = _host_port(container.attrs, None)
        try:
            # The engine wants whole seconds; rounding up keeps the promised grace.
            self._retrying(container.stop, timeout=math.ceil(max(grace_s, 0.0)))
            self._retrying(container.remove, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            # 409: a removal is already in progress, which is what we asked for.
            if exc.status_code != 409:
                raise
        logger.info(
            "stopped worker %s (%s) on 127.0.0.1:%s",
            container.short_id,
            container.name,
            host_port,
            extra={
                logfields.CONTAINER_ID: container.short_id,
                logfields.CONTAINER_NAME: container.name,
                logfields.HOST_PORT: host_port,
                logfields.POOL: container.labels.get(LABEL_POOL),
            },
        )

    def _list_sync(self) -> builtins.list[ObservedWorker]:
        client = self._client_sync()
        containers = self._retrying(
            client.containers.list,
            all=True,
            filters={"label": self._label_filters()},
            ignore_removed=True,
        )
        # The filter runs in the engine; checking again here keeps the guarantee local.
        return [self._observe(c.attrs) for c in containers if self._owns(c.labels)]

    def _observe(self, attrs: Mapping[str, Any]) -> ObservedWorker:
        labels: Mapping[str, str] = (attrs.get("Config") or {}).get("Labels") or {}
        state = attrs.get("State") or {}
        engine_state = _ENGINE_STATES.get(str(state.get("Status")), "unknown")
        port_label = labels.get(LABEL_CONTAINER_PORT, "")
        return ObservedWorker(
            worker_id=WorkerId(attrs["Id"]),
            name=str(attrs.get("Name", "")).lstrip("/"),
            pool=labels.get(LABEL_POOL, ""),
            template_hash=labels.get(LABEL_TEMPLATE_HASH, ""),
            engine_state=engine_state,
            host_port=_host_port(attrs, int(port_label) if port_label.isdigit() else None),
            started_at=_parse_docker_time(state.get("StartedAt")),
            exit_code=state.get("ExitCode") if engine_state == "exited" else None,
            labels=dict(labels),
        )
