"""Prometheus exposition of Shoal at ``GET /metrics``, through prometheus-client.

It owns one custom collector that reads the controller's state at scrape time: queue
counts per pool and state, task outcomes, the queue-wait and run-time histograms the
dispatcher keeps, workers by state, desired replicas, scaling events, the reconcile-pass
histogram, and tasks in flight per worker. Nothing is copied into prometheus-client's global
registry: each scrape builds a fresh registry around one consistent read, so the figures
agree with the JSON views (``/metrics.json``, ``/queue-length``, ``/containers-status``),
which read the same sources.

It does not compute anything the controller does not already know, and it keeps only one
piece of state between scrapes: the running total of scaling events, because the controller
keeps only the latest of them. ``api.app`` calls ``setup``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from api.keys import CONTROLLER
from controller.manager import Controller
from controller.poolstate import ScalingEvent
from controller.queues.base import TASK_STATES, QueueCounts
from controller.registry import WorkerRecord
from controller.telemetry import DurationHistogram, HistogramSnapshot

logger = logging.getLogger(__name__)

WORKER_STATES = ("starting", "ready", "draining")
# The classic text format, which every Prometheus scrapes; our names need none of 1.0's escaping.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ScalingEventTotals:
    """Counts scaling events per pool across scrapes.

    NB: the reconciler keeps only its latest events (a bounded deque), so this walks back
    from the newest to the last one it counted. More events than the deque holds between
    two scrapes would be undercounted; at one event per evaluation interval that takes
    longer than any scrape interval.
    """

    def __init__(self) -> None:
        self._totals: collections.Counter[str] = collections.Counter()
        self._last: ScalingEvent | None = None

    def update(self, events: Iterable[ScalingEvent]) -> Mapping[str, int]:
        fresh: list[ScalingEvent] = []
        for event in reversed(list(events)):
            if event is self._last:
                break
            fresh.append(event)
        if fresh:
            self._last = fresh[0]
        for event in fresh:
            self._totals[event.pool] += 1
        return dict(self._totals)


SCALING_TOTALS = web.AppKey("scaling_event_totals", ScalingEventTotals)


@dataclass(frozen=True)
class Reading:
    """One consistent read of everything a scrape shows (taken between two awaits)."""

    pools: tuple[str, ...]
    counts: Mapping[str, QueueCounts]
    workers: tuple[WorkerRecord, ...]
    desired: Mapping[str, int]
    replicas: Mapping[str, tuple[int, int]]
    spawns_in_flight: Mapping[str, int]
    outcomes: Mapping[str, int]
    scaling_events: Mapping[str, int]
    queue_wait: DurationHistogram | None
    run_time: DurationHistogram | None
    reconcile: DurationHistogram
    policy_error: bool


async def read(controller: Controller, totals: ScalingEventTotals) -> Reading:
    names = tuple(sorted(controller.store.pools))
    counts = await asyncio.gather(*(controller.queue.counts(n) for n in names))
    # Everything below is synchronous, so it is one instant of the event loop.
    reconciler = controller.reconciler
    desired: dict[str, int] = {}
    replicas: dict[str, tuple[int, int]] = {}
    spawns: dict[str, int] = {}
    for name in names:
        state = reconciler.pools.get(name)
        if state is not None and state.desired is not None:
            desired[name] = state.desired
        spawns[name] = len(state.pending_spawns) if state is not None else 0
        pool = controller.store.get(name)
        if pool is not None:
            replicas[name] = (pool.spec.replicas.min, pool.spec.replicas.max)
    dispatcher = controller.dispatcher
    return Reading(
        pools=names,
        counts=dict(zip(names, counts, strict=True)),
        workers=tuple(controller.registry.list()),
        desired=desired,
        replicas=replicas,
        spawns_in_flight=spawns,
        outcomes=dict(controller.outcomes),
        scaling_events=totals.update(reconciler.events),
        queue_wait=dispatcher.timings.queue_wait if dispatcher is not None else None,
        run_time=dispatcher.timings.run_time if dispatcher is not None else None,
        reconcile=reconciler.pass_timings,
        policy_error=controller.store.error is not None,
    )


def _histogram(
    name: str, documentation: str, source: DurationHistogram | None, *, label: str | None
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=[label] if label else [])
    if source is None:
        return family
    for value in source.labels() if label else [""]:
        snap: HistogramSnapshot = source.snapshot(value)
        buckets = [
            ("+Inf" if bound == float("inf") else repr(bound), float(count))
            for bound, count in zip(snap.bounds, snap.cumulative, strict=True)
        ]
        family.add_metric([value] if label else [], buckets, snap.sum_s)
    return family


class ShoalCollector(Collector):
    """Turns one ``Reading`` into metric families."""

    def __init__(self, reading: Reading) -> None:
        self._r = reading

    def collect(self) -> Iterator[Metric]:
        yield from self._queue_families()
        yield from self._task_families()
        yield from self._worker_families()
        yield from self._scaling_families()

    def _queue_families(self) -> Iterator[Metric]:
        r = self._r
        length = GaugeMetricFamily(
            "shoal_queue_length", "Tasks waiting in the queue (state queued).", labels=["pool"]
        )
        ready = GaugeMetricFamily(
            "shoal_queue_ready",
            "Queued tasks that may be leased now (not in retry back-off).",
            labels=["pool"],
        )
        tasks = GaugeMetricFamily(
            "shoal_tasks", "Tasks the queue holds, by pool and state.", labels=["pool", "state"]
        )
        for pool in r.pools:
            counts = r.counts[pool]
            length.add_metric([pool], counts.queued)
            ready.add_metric([pool], counts.ready)
            for state in TASK_STATES:
                tasks.add_metric([pool, state], getattr(counts, state))
        yield from (length, ready, tasks)

    def _task_families(self) -> Iterator[Metric]:
        r = self._r
        outcomes = CounterMetricFamily(
            "shoal_task_outcomes",
            "Delivery attempts by outcome (succeeded, retry, dead, failed, released, ...).",
            labels=["outcome"],
        )
        for outcome, count in sorted(r.outcomes.items()):
            outcomes.add_metric([outcome], count)
        yield outcomes
        yield _histogram(
            "shoal_task_queue_wait_seconds",
            "Time from enqueue to first lease, of tasks that succeeded.",
            r.queue_wait,
            label="pool",
        )
        yield _histogram(
            "shoal_task_run_seconds",
            "Run time the worker reported, of tasks that succeeded.",
            r.run_time,
            label="pool",
        )

    def _worker_families(self) -> Iterator[Metric]:
        r = self._r
        by_state = GaugeMetricFamily(
            "shoal_workers", "Known workers by pool and state.", labels=["pool", "state"]
        )
        tally: collections.Counter[tuple[str, str]] = collections.Counter(
            (w.pool, w.state) for w in r.workers
        )
        pools = sorted(set(r.pools) | {w.pool for w in r.workers})
        for pool in pools:
            for state in WORKER_STATES:
                by_state.add_metric([pool, state], tally.get((pool, state), 0))
        in_flight = GaugeMetricFamily(
            "shoal_worker_in_flight",
            "Tasks in flight on each worker.",
            labels=["pool", "worker", "container_id"],
        )
        capacity = GaugeMetricFamily(
            "shoal_worker_concurrency",
            "Tasks each worker runs at once.",
            labels=["pool", "worker", "container_id"],
        )
        processed = CounterMetricFamily(
            "shoal_worker_processed",
            "Tasks each worker finished successfully.",
            labels=["pool", "worker", "container_id"],
        )
        failed = CounterMetricFamily(
            "shoal_worker_failed",
            "Delivery attempts that failed on each worker.",
            labels=["pool", "worker", "container_id"],
        )
        for worker in r.workers:
            labels = [worker.pool, worker.name, worker.short_id]
            in_flight.add_metric(labels, worker.in_flight)
            capacity.add_metric(labels, worker.concurrency)
            processed.add_metric(labels, worker.processed)
            failed.add_metric(labels, worker.failed)
        yield from (by_state, in_flight, capacity, processed, failed)

    def _scaling_families(self) -> Iterator[Metric]:
        r = self._r
        desired = GaugeMetricFamily(
            "shoal_desired_replicas", "Workers the autoscaler wants per pool.", labels=["pool"]
        )
        for pool, value in sorted(r.desired.items()):
            desired.add_metric([pool], value)
        bounds = GaugeMetricFamily(
            "shoal_replicas_bound",
            "The declared replica bounds per pool.",
            labels=["pool", "bound"],
        )
        for pool, (low, high) in sorted(r.replicas.items()):
            bounds.add_metric([pool, "min"], low)
            bounds.add_metric([pool, "max"], high)
        spawns = GaugeMetricFamily(
            "shoal_spawns_in_flight", "Worker starts under way per pool.", labels=["pool"]
        )
        for pool, value in sorted(r.spawns_in_flight.items()):
            spawns.add_metric([pool], value)
        events = CounterMetricFamily(
            "shoal_scaling_events",
            "Changes of the desired replica count per pool.",
            labels=["pool"],
        )
        for pool, count in sorted(r.scaling_events.items()):
            events.add_metric([pool], count)
        policy = GaugeMetricFamily(
            "shoal_policy_error", "1 while the manifests hold an error Shoal refused, else 0."
        )
        policy.add_metric([], 1 if r.policy_error else 0)
        yield from (desired, bounds, spawns, events, policy)
        yield _histogram(
            "shoal_reconcile_duration_seconds",
            "Duration of reconcile passes.",
            r.reconcile,
            label=None,
        )


async def render(controller: Controller, totals: ScalingEventTotals) -> bytes:
    """The Prometheus text exposition of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ShoalCollector(await read(controller, totals)))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return generate_latest(registry)


async def metrics(request: web.Request) -> web.Response:
    body = await render(request.app[CONTROLLER], request.app[SCALING_TOTALS])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def setup(app: web.Application) -> None:
    """Serves ``GET /metrics``; call once per application."""
    app[SCALING_TOTALS] = ScalingEventTotals()
    app.router.add_get("/metrics", metrics)
