"""The reconciler: the only code that starts and stops workers.

One pass, per pool: read the policy, observe (registry, queue counts), decide
(``autoscaler.decide``), plan (``plan.plan``), apply, write status. Passes run
every evaluation interval and whenever something wakes the loop (an enqueue, a
container event, a policy edit, a worker becoming ready); each pass recomputes
everything from what it observes, so a missed wake-up costs latency, never
correctness (level-triggered).

Observation of the engine itself (``relist``) is separate from the pass: it
adopts running containers with our labels, notices dead ones, and drops
registry entries whose container is gone. It runs at start, on every runtime
event and every ``relist_interval_s``.

Side effects are single-flight: at most ``spawn.maxInFlight`` starts per pool,
at least ``spawn.minInterval`` apart, and one stop per worker at a time.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.trace import Span, Status, StatusCode

from controller import logfields, telemetry
from controller.aio import cancel_and_wait, wait_event
from controller.autoscaler import Decision, PoolMetrics, decide
from controller.errors import QueueUnavailable, TransientError
from controller.plan import Action, PlanInput, plan
from controller.policy import WorkerPool
from controller.poolstate import PoolRuntimeState, ScalingEvent, ewma, pool_status
from controller.queues.base import TaskQueue
from controller.registry import Registry, WorkerRecord
from controller.runtimes.base import (
    ObservedWorker,
    Runtime,
    WorkerId,
    WorkerSpec,
)
from controller.store import PolicyStore

logger = logging.getLogger(__name__)

_MAX_EVENTS = 1000
# A crashed worker is replaced at once the first time; repeated crashes within
# this window back off exponentially, up to the cap.
_CRASH_WINDOW_S = 120.0
_BACKOFF_CAP_S = 60.0
_YOUNG_S = 10.0
# A ready worker failing this many probes in a row (2 s apart) is frozen: it is killed.
_STUCK_PROBES = 10
_START_TIMEOUT_S = 60.0


class Reconciler:
    def __init__(
        self,
        *,
        store: PolicyStore,
        registry: Registry,
        runtime: Runtime,
        queue: TaskQueue,
        arrivals: Callable[[str], int],
        relist_interval_s: float = 5.0,
        extra_labels: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._registry = registry
        self._runtime = runtime
        self._queue = queue
        self._arrivals = arrivals
        self.relist_interval_s = relist_interval_s
        self._extra_labels = dict(extra_labels or {})
        self._clock = clock
        self._wall_clock = wall_clock
        self.pools: dict[str, PoolRuntimeState] = {}
        self.events: collections.deque[ScalingEvent] = collections.deque(maxlen=_MAX_EVENTS)
        self._wakeup = asyncio.Event()
        self._relist_wanted = asyncio.Event()
        self._stopping: dict[WorkerId, asyncio.Task[None]] = {}
        # Workers this controller stopped, kept a while so a relist that raced
        # with the stop does not mistake them for crashes.
        self._stopped: dict[WorkerId, float] = {}
        # When each never-started container was first seen.
        self._created_seen: dict[WorkerId, float] = {}
        self._spawning: set[asyncio.Task[None]] = set()
        self._spawn_started: dict[WorkerId, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.passes = 0
        self.last_pass_s = 0.0
        self.pass_timings = telemetry.DurationHistogram()
        self._last_relist = -math.inf

    # -- wiring -------------------------------------------------------------

    def wake(self) -> None:
        self._wakeup.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._loop(), name="reconcile-loop"),
            loop.create_task(self._follow_events(), name="runtime-events"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        if self._spawning:
            # A start in progress finishes (or fails and cleans up) before we return,
            # so shutdown sees every container that was made.
            await asyncio.gather(*self._spawning, return_exceptions=True)

    def on_worker_ready(self, worker: WorkerRecord, probe_startup_s: float) -> None:
        state = self.pools.get(worker.pool)
        if state is None:
            return
        started = self._spawn_started.pop(worker.worker_id, None)
        startup_s = self._clock() - started if started is not None else probe_startup_s
        state.startup_s = ewma(state.startup_s, startup_s)
        state.spawn_failures = 0
        self.wake()

    def request_capacity(self, pool: str, *, hold_s: float = 30.0) -> bool:
        """Asks for at least one worker in ``pool`` for the next ``hold_s`` seconds.

        The balancer calls it when a request arrives for a pool with no ready
        worker (scale from zero). Returns False when the pool is unknown or
        its ``max`` is 0, so the caller can answer 503 at once.
        """
        policy = self._store.get(pool)
        if policy is None or policy.spec.replicas.max == 0:
            return False
        state = self.pools.setdefault(pool, PoolRuntimeState())
        state.demand_until = max(state.demand_until, self._clock() + hold_s)
        self.wake()
        return True

    def report_sync_load(self, pool: str, *, in_flight: int, hold_s: float = 10.0) -> None:
        """The balancer's requests in flight to ``pool`` now; they count as work in flight.

        The autoscaler otherwise sees only the queue, so a pool serving only
        synchronous traffic would never grow. A report lasts ``hold_s`` unless renewed.
        """
        state = self.pools.setdefault(pool, PoolRuntimeState())
        state.sync_in_flight = max(0, in_flight)
        state.sync_until = self._clock() + hold_s
        if in_flight > 0:
            self.wake()

    def on_task_done(self, pool: str, run_s: float) -> None:
        state = self.pools.get(pool)
        if state is not None:
            state.service_time_s = ewma(state.service_time_s, run_s, alpha=0.1)

    # -- observing the engine --------------------------------------------------

    async def relist(self) -> None:
        """Brings the registry in line with the engine: adopt, notice deaths, forget the gone."""
        # NB: a spawn that lands during the list below is not in it; records made
        # after this instant are too new for the list to speak about.
        listed_at = self._wall_clock()
        observed = await self._runtime.list()
        self._last_relist = self._clock()
        pools = self._store.pools
        pending = {name for s in self.pools.values() for name in s.pending_spawns}
        seen: set[WorkerId] = set()

        for worker in observed:
            seen.add(worker.worker_id)
            if worker.name in pending or worker.worker_id in self._stopping:
                continue
            if worker.worker_id in self._stopped:
                # NB: the list may predate our own stop: an exited container we
                # stopped is not a crash.
                continue
            known = self._registry.get(worker.worker_id)
            if worker.engine_state == "running":
                if known is None:
                    self._adopt(worker, pools.get(worker.pool))
                continue
            if worker.engine_state == "created":
                # Created but never started (a start cut short by a crash or a lost
                # reply): harmless for a moment, a leak if it stays.
                first = self._created_seen.setdefault(worker.worker_id, self._clock())
                if self._clock() - first >= _START_TIMEOUT_S:
                    self._stop_in_background(worker.worker_id, name=worker.name, grace_s=0.0)
                continue
            # Exited or unknown, and not something we are stopping: it died on its own.
            self._note_crash(worker, known)

        for gone in set(self._created_seen) - seen:
            del self._created_seen[gone]
        for record in self._registry.list():
            if record.worker_id not in seen and record.worker_id not in self._stopping:
                if record.name in pending or record.created_at >= listed_at:
                    continue
                self._registry.remove(record.worker_id)
                logger.warning(
                    "worker %s vanished from the engine",
                    record.name,
                    extra={logfields.WORKER_ID: record.short_id, logfields.POOL: record.pool},
                )

    def _adopt(self, worker: ObservedWorker, pool: WorkerPool | None) -> None:
        if pool is None:
            # Ours, but its pool is no longer declared: it goes.
            logger.info(
                "stopping worker %s of undeclared pool %r",
                worker.name,
                worker.pool,
                extra={logfields.WORKER_ID: worker.short_id},
            )
            self._stop_in_background(worker.worker_id, name=worker.name, grace_s=10.0)
            return
        self._registry.add(
            worker_id=worker.worker_id,
            name=worker.name,
            pool=worker.pool,
            template_hash=worker.template_hash,
            host=worker.host,
            host_port=worker.host_port,
            concurrency=pool.spec.template.concurrency,
        )
        logger.info(
            "adopted worker %s on 127.0.0.1:%s",
            worker.name,
            worker.host_port,
            extra={
                logfields.POOL: worker.pool,
                logfields.CONTAINER_ID: worker.short_id,
                logfields.HOST_PORT: worker.host_port,
            },
        )

    def _note_crash(self, worker: ObservedWorker, known: WorkerRecord | None) -> None:
        state = self.pools.setdefault(worker.pool, PoolRuntimeState())
        now = self._clock()
        # Only a worker we saw die young (never ready, or within _YOUNG_S of it)
        # points at a crash loop; one killed after doing work is just replaced,
        # and leftovers found exited at start say nothing about the template.
        lived_s = self._wall_clock() - known.ready_at if known and known.ready_at else 0.0
        if known is not None and (known.ready_at is None or lived_s < _YOUNG_S):
            state.crashes.append(now)
        while state.crashes and now - state.crashes[0] > _CRASH_WINDOW_S:
            state.crashes.popleft()
        if len(state.crashes) > 1:
            delay = min(_BACKOFF_CAP_S, 0.5 * 2 ** (len(state.crashes) - 1))
            state.backoff_until = max(state.backoff_until, now + delay)
        logger.warning(
            "worker %s exited on its own (exit code %s); replacing it%s",
            worker.name,
            worker.exit_code,
            f" after {state.backoff_until - now:.1f}s back-off"
            if state.backoff_until > now
            else "",
            extra={logfields.CONTAINER_ID: worker.short_id, logfields.POOL: worker.pool},
        )
        if known is not None:
            self._registry.remove(worker.worker_id)
        self._stop_in_background(worker.worker_id, name=worker.name, grace_s=0.0)

    async def _follow_events(self) -> None:
        while True:
            try:
                async for _event in self._runtime.events():
                    self._relist_wanted.set()
                    self.wake()
            except TransientError as exc:
                logger.warning("runtime event stream broke, reconnecting: %s", exc)
            await asyncio.sleep(1.0)

    # -- the loop --------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                await self.reconcile()
            except TransientError as exc:
                logger.warning("reconcile pass failed, retrying: %s", exc)
                await asyncio.sleep(exc.retry_after_s)
            except Exception:
                # NB: the loop must outlive a bad pass; the traceback is the news here.
                logger.exception("reconcile pass failed unexpectedly")
                await asyncio.sleep(1.0)
            await wait_event(self._wakeup, timeout_s=self._next_wait_s())

    def _next_wait_s(self) -> float:
        now = self._clock()
        waits = [self.relist_interval_s - (now - self._last_relist)]
        for name, pool in self._store.pools.items():
            waits.append(pool.spec.scaling.evaluation_interval)
            state = self.pools.get(name)
            if state is None:
                continue
            interval = pool.spec.scaling.spawn.min_interval
            for deadline in (state.last_spawn_at + interval, state.backoff_until):
                if deadline > now:
                    waits.append(deadline - now)
        return max(0.01, min(waits))

    async def reconcile(self) -> None:
        """One level-triggered pass over every pool. Safe to call at any time."""
        started = self._clock()
        with telemetry.tracer.start_as_current_span("reconcile") as span:
            if (
                self._relist_wanted.is_set()
                or started - self._last_relist >= self.relist_interval_s
            ):
                self._relist_wanted.clear()
                await self.relist()

            pools = self._store.pools
            for name, pool in pools.items():
                with telemetry.tracer.start_as_current_span(
                    "reconcile pool", attributes={"shoal.pool": name}
                ) as pool_span:
                    before = self._action_marks(name)
                    try:
                        await self._reconcile_pool(name, pool)
                    except QueueUnavailable as exc:
                        self.pools.setdefault(name, PoolRuntimeState()).last_error = str(exc)
                        logger.warning("pool %s: queue unavailable: %s", name, exc)
                        pool_span.record_exception(exc)
                    self._describe_pool_pass(pool_span, name, before)

            # Workers of pools that were removed from the manifests drain away.
            for record in self._registry.list():
                if record.pool not in pools and record.state in ("starting", "ready"):
                    self._drain(record, reason="pool removed from manifests")
                elif (
                    record.pool not in pools
                    and record.state == "draining"
                    and record.in_flight == 0
                ):
                    self._stop_in_background(record.worker_id, name=record.name, grace_s=10.0)

            self.passes += 1
            self.last_pass_s = self._clock() - started
            self.pass_timings.observe(self.last_pass_s)
            span.set_attribute("shoal.reconcile.pass", self.passes)
            span.set_attribute("shoal.reconcile.pools", len(pools))

    def _action_marks(self, name: str) -> tuple[set[str], set[str], set[str]]:
        """What a pass of ``name`` may add to: spawns pending, workers draining, stops running."""
        state = self.pools.get(name)
        return (
            set(state.pending_spawns) if state is not None else set(),
            {w.name for w in self._registry.list(name) if w.state == "draining"},
            set(self._stopping),
        )

    def _describe_pool_pass(
        self, span: Span, name: str, before: tuple[set[str], set[str], set[str]]
    ) -> None:
        """Puts desired, observed and the actions this pass took on the pool's span."""
        spawned, drained, stopped = (
            sorted(after - was) for after, was in zip(self._action_marks(name), before, strict=True)
        )
        state = self.pools.get(name)
        observed = collections.Counter(w.state for w in self._registry.list(name))
        actions = [f"spawn {n}" for n in spawned] + [f"drain {n}" for n in drained]
        actions += [f"stop {w[:12]}" for w in stopped]
        span.set_attributes(
            {
                "shoal.desired": state.desired if state and state.desired is not None else -1,
                "shoal.reason": state.decision.reason if state and state.decision else "",
                "shoal.observed.ready": observed.get("ready", 0),
                "shoal.observed.starting": observed.get("starting", 0),
                "shoal.observed.draining": observed.get("draining", 0),
                "shoal.actions": actions,
            }
        )

    async def _reconcile_pool(self, name: str, pool: WorkerPool) -> None:
        state = self.pools.setdefault(name, PoolRuntimeState())
        spec = pool.spec
        now = self._clock()
        counts = await self._queue.counts(name)
        state.counts = counts
        workers = self._replace_stuck(self._registry.list(name), state)
        pending = len(state.pending_spawns)

        metrics = PoolMetrics(
            now_s=now,
            queued=counts.queued,
            in_flight=counts.running + (state.sync_in_flight if now < state.sync_until else 0),
            ready=sum(1 for w in workers if w.state == "ready"),
            starting=sum(1 for w in workers if w.state == "starting") + pending,
            draining=sum(1 for w in workers if w.state == "draining"),
            concurrency=spec.template.concurrency,
            arrivals_total=self._arrivals(name),
            service_time_s=state.service_time_s,
            startup_s=state.startup_s,
            sync_active=now < state.demand_until,
        )
        decision = decide(spec, metrics, state.history)
        if decision.desired == 0 and now < state.demand_until and spec.replicas.max > 0:
            # NB: in the history too, so the next decision scales to zero only after
            # scaleToZero.after, as it would from any other desired 1.
            decision = dataclasses.replace(
                decision,
                desired=1,
                reason="a synchronous request waits for a worker (activator)",
                history=dataclasses.replace(decision.history, last_desired=1),
            )
        state.history = decision.history
        self._record_decision(name, state, decision)

        can_spawn = (
            pending < spec.scaling.spawn.max_in_flight
            and now - state.last_spawn_at >= spec.scaling.spawn.min_interval
            and now >= state.backoff_until
        )
        actions = plan(
            PlanInput(
                desired=decision.desired,
                workers=workers,
                template_hash=spec.template.template_hash(),
                spawns_in_flight=pending,
                can_spawn=can_spawn,
                drain_timeout_s=spec.scaling.scale_down.drain_timeout,
                now=self._wall_clock(),
            )
        )
        for action in actions:
            self._apply(name, pool, state, action)

    def _replace_stuck(
        self, workers: list[WorkerRecord], state: PoolRuntimeState
    ) -> list[WorkerRecord]:
        """Kills workers that are running but useless; returns the others.

        A frozen worker (failing every probe) or one that never became ready
        keeps its container "running", so relist alone would never replace it,
        and a task it holds would never come back. Killing it breaks the open
        delivery, so the task is retried elsewhere.
        """
        now = self._wall_clock()
        kept = []
        for worker in workers:
            if worker.state == "ready" and worker.probe_failures >= _STUCK_PROBES:
                reason = f"failed {worker.probe_failures} health checks in a row"
            elif worker.state == "starting" and now - worker.created_at > _START_TIMEOUT_S:
                reason = f"not ready {_START_TIMEOUT_S:.0f}s after it started"
            else:
                kept.append(worker)
                continue
            if worker.worker_id not in self._stopping:
                logger.warning(
                    "replacing worker %s (%s): %s",
                    worker.name,
                    worker.short_id,
                    reason,
                    extra={
                        logfields.POOL: worker.pool,
                        logfields.CONTAINER_ID: worker.short_id,
                        logfields.CONTAINER_NAME: worker.name,
                        logfields.HOST_PORT: worker.host_port,
                        logfields.REASON: reason,
                    },
                )
                state.crashes.append(self._clock())
                self._stop_in_background(worker.worker_id, name=worker.name, grace_s=0.0)
        return kept

    def _record_decision(self, name: str, state: PoolRuntimeState, decision: Decision) -> None:
        previous = state.desired
        state.decision = decision
        state.decided_at = self._wall_clock()
        if previous == decision.desired:
            return
        state.desired = decision.desired
        event = ScalingEvent(
            time=self._wall_clock(),
            pool=name,
            from_replicas=previous if previous is not None else 0,
            to_replicas=decision.desired,
            reason=decision.reason,
        )
        self.events.append(event)
        logger.info(
            "pool %s: desired %s -> %d: %s",
            name,
            previous,
            decision.desired,
            decision.reason,
            extra={
                logfields.POOL: name,
                logfields.DESIRED: decision.desired,
                logfields.REASON: decision.reason,
            },
        )

    # -- applying ----------------------------------------------------------------

    def _apply(self, name: str, pool: WorkerPool, state: PoolRuntimeState, action: Action) -> None:
        logger.debug("pool %s: %s", name, action.describe(), extra={logfields.ACTION: action.kind})
        if action.kind == "spawn":
            self._spawn(name, pool, state, reason=action.reason)
        elif action.kind == "drain" and action.worker is not None:
            self._drain(action.worker, reason=action.reason)
        elif action.kind == "stop" and action.worker is not None:
            self._stop_in_background(
                action.worker.worker_id,
                name=action.worker.name,
                grace_s=pool.spec.scaling.scale_down.grace_period,
                reason=action.reason,
            )

    def _spawn(self, name: str, pool: WorkerPool, state: PoolRuntimeState, *, reason: str) -> None:
        template = pool.spec.template
        worker_name = f"shoal-{name}-{secrets.token_hex(3)}"
        spec = WorkerSpec(
            pool=name,
            name=worker_name,
            image=template.image,
            port=template.port,
            concurrency=template.concurrency,
            template_hash=template.template_hash(),
            env=dict(template.env),
            memory_bytes=template.resources.memory,
            cpus=template.resources.cpus,
            pids=template.resources.pids,
            labels=self._extra_labels,
        )
        now = self._clock()
        state.pending_spawns[worker_name] = now
        state.last_spawn_at = now
        task = asyncio.get_running_loop().create_task(
            self._run_spawn(state, spec, reason=reason, started=now), name=f"spawn-{worker_name}"
        )
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

    async def _run_spawn(
        self, state: PoolRuntimeState, spec: WorkerSpec, *, reason: str, started: float
    ) -> None:
        with telemetry.tracer.start_as_current_span(
            "container start",
            attributes={
                "shoal.pool": spec.pool,
                "shoal.worker.name": spec.name,
                "container.image.name": spec.image,
                "shoal.reason": reason,
            },
        ) as span:
            try:
                observed = await self._runtime.start(spec)
            except TransientError as exc:
                state.spawn_failures += 1
                delay = min(_BACKOFF_CAP_S, 0.5 * 2 ** (state.spawn_failures - 1))
                state.backoff_until = self._clock() + delay
                state.last_error = f"start of {spec.name} failed: {exc}"
                logger.warning(
                    "start of worker %s failed (attempt %d), next try in %.1fs: %s",
                    spec.name,
                    state.spawn_failures,
                    delay,
                    exc,
                    extra={logfields.POOL: spec.pool, logfields.ATTEMPT: state.spawn_failures},
                )
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                return
            finally:
                state.pending_spawns.pop(spec.name, None)
                self.wake()

            state.last_error = None
            span.set_attribute("container.id", observed.worker_id)
            span.set_attribute("shoal.host_port", observed.host_port or 0)
            self._spawn_started[observed.worker_id] = started
            self._registry.add(
                worker_id=observed.worker_id,
                name=observed.name,
                pool=spec.pool,
                template_hash=spec.template_hash,
                host=observed.host,
                host_port=observed.host_port,
                concurrency=spec.concurrency,
            )
            logger.info(
                "started worker %s (%s) on 127.0.0.1:%s: %s",
                observed.name,
                observed.short_id,
                observed.host_port,
                reason,
                extra={
                    logfields.POOL: spec.pool,
                    logfields.CONTAINER_ID: observed.short_id,
                    logfields.CONTAINER_NAME: observed.name,
                    logfields.HOST_PORT: observed.host_port,
                    logfields.REASON: reason,
                },
            )

    def _drain(self, worker: WorkerRecord, *, reason: str) -> None:
        if self._registry.mark_draining(worker.worker_id) is None:
            return
        logger.info(
            "draining worker %s (%s) on 127.0.0.1:%s with %d task(s) in flight: %s",
            worker.name,
            worker.short_id,
            worker.host_port,
            worker.in_flight,
            reason,
            extra={
                logfields.POOL: worker.pool,
                logfields.CONTAINER_ID: worker.short_id,
                logfields.CONTAINER_NAME: worker.name,
                logfields.HOST_PORT: worker.host_port,
                logfields.REASON: reason,
            },
        )
        self.wake()

    def _stop_in_background(
        self, worker_id: WorkerId, *, name: str, grace_s: float, reason: str = ""
    ) -> None:
        if worker_id in self._stopping:
            return
        task = asyncio.get_running_loop().create_task(
            self._run_stop(worker_id, name=name, grace_s=grace_s, reason=reason),
            name=f"stop-{name}",
        )
        self._stopping[worker_id] = task

    async def _run_stop(
        self, worker_id: WorkerId, *, name: str, grace_s: float, reason: str
    ) -> None:
        with telemetry.tracer.start_as_current_span(
            "container stop",
            attributes={
                "container.id": worker_id,
                "shoal.worker.name": name,
                "shoal.reason": reason,
                "shoal.grace_s": grace_s,
            },
        ) as span:
            record = self._registry.get(worker_id)
            try:
                # NB: the worker leaves routing before its container is stopped.
                if record is not None and record.state != "draining":
                    self._registry.mark_draining(worker_id)
                await self._runtime.stop(worker_id, grace_s=grace_s)
                self._registry.remove(worker_id)
                if reason:
                    port = record.host_port if record else None
                    logger.info(
                        "stopped worker %s (%s)%s: %s",
                        name,
                        worker_id[:12],
                        f" on 127.0.0.1:{port}" if port else "",
                        reason,
                        extra={
                            logfields.CONTAINER_ID: worker_id[:12],
                            logfields.CONTAINER_NAME: name,
                            logfields.HOST_PORT: record.host_port if record else None,
                            logfields.REASON: reason,
                        },
                    )
            except TransientError as exc:
                logger.warning("stop of worker %s failed, will retry: %s", name, exc)
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
            else:
                # Only a stop that worked hides the container from relist.
                self._stopped[worker_id] = self._clock()
            finally:
                self._stopping.pop(worker_id, None)
                now = self._clock()
                for stale in [w for w, t in self._stopped.items() if now - t > 300.0]:
                    del self._stopped[stale]
                self.wake()

    async def stop_all(self, *, grace_s: float) -> int:
        """Stops every worker this controller owns (shutdown without --keep-workers)."""
        observed = await self._runtime.list()
        for worker in observed:
            self._stop_in_background(
                worker.worker_id, name=worker.name, grace_s=grace_s, reason="shutdown"
            )
        if self._stopping:
            await asyncio.gather(*self._stopping.values(), return_exceptions=True)
        return len(observed)

    def status(self, name: str) -> dict[str, Any]:
        return pool_status(
            name,
            pool=self._store.get(name),
            state=self.pools.get(name, PoolRuntimeState()),
            workers=self._registry.list(name),
            now=self._clock(),
        )
