"""Tracing: one task is one trace (enqueue -> dispatch -> worker), set-up from OTEL_*, log fields.

Spans go to the SDK's in-memory exporter. The end-to-end test runs a real worker process
(the process runtime) so that the ``traceparent`` really crosses HTTP and comes back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from api.app import make_app
from controller import logfields, telemetry
from controller.logs import JsonFormatter, TextFormatter, TraceContextFilter
from controller.manager import Controller, ControllerConfig
from controller.queues.base import EnqueueRequest
from controller.queues.memory import MemoryQueue
from controller.reconciler import Reconciler
from controller.registry import Registry
from controller.runtimes.fake import FakeRuntime
from controller.runtimes.process import ProcessRuntime
from controller.store import PolicyStore

POOL = """
apiVersion: shoal/v1
kind: WorkerPool
metadata: {{name: default}}
spec:
  replicas: {{min: {min}, max: 1}}
  template:
    image: shoal/worker:latest
    concurrency: 1
    env: {{WORK_SECONDS: "0"}}
  scaling:
    evaluationInterval: 200ms
    targets: {{backlogPerReplica: 1}}
    spawn: {{maxInFlight: 1, minInterval: 100ms}}
"""


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.install(provider)
    yield exporter
    telemetry.install(None)
    provider.shutdown()


def _hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return trace.format_trace_id(span.context.trace_id)


def _one(found: list[ReadableSpan], name: str) -> ReadableSpan:
    named = [s for s in found if s.name == name]
    assert len(named) == 1, f"expected one {name!r} span, got {[s.name for s in found]}"
    return named[0]


def _parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


@pytest.fixture
async def live_shoal(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], Controller]]:
    """Shoal with one real worker process, ready before the test begins."""
    manifest = tmp_path / "pool.yaml"
    manifest.write_text(POOL.format(min=1))
    controller = Controller(
        config=ControllerConfig(manifests=manifest, relist_interval_s=1.0),
        runtime=ProcessRuntime(instance="telemetry-test"),
        queue=MemoryQueue(),
    )
    async with TestClient(TestServer(make_app(controller))) as client:
        for _ in range(300):  # bounded: about 15 s
            if any(w.routable for w in controller.registry.list()):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the worker process never became ready")
        yield client, controller


async def _until_final(client: TestClient[Any, Any], task_id: str) -> dict[str, Any]:
    for _ in range(300):  # bounded: about 15 s
        task: dict[str, Any] = await (await client.get(f"/tasks/{task_id}")).json()
        if task["state"] in ("succeeded", "failed", "dead"):
            return task
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} did not finish")


async def test_trace_of_one_task_links_enqueue_dispatch_and_worker(
    spans: InMemorySpanExporter, live_shoal: tuple[TestClient[Any, Any], Controller]
) -> None:
    client, controller = live_shoal
    reply = await (await client.post("/enqueue-task", json={"work_seconds": 0.05})).json()
    task = await _until_final(client, reply["id"])
    assert task["state"] == "succeeded"

    enqueue = _one(list(spans.get_finished_spans()), "enqueue")
    trace_id = _hex_trace(enqueue)
    in_trace = [s for s in spans.get_finished_spans() if _hex_trace(s) == trace_id]
    wait = _one(in_trace, "queue wait")
    dispatch = _one(in_trace, "dispatch")
    worker = _one(in_trace, "worker")

    assert enqueue.parent is None and enqueue.kind is SpanKind.SERVER
    assert _parent_id(wait) == _id(enqueue)
    assert _parent_id(dispatch) == _id(enqueue) and dispatch.kind is SpanKind.CLIENT
    assert _parent_id(worker) == _id(dispatch) and worker.kind is SpanKind.SERVER
    assert enqueue.attributes is not None and enqueue.attributes["shoal.task.id"] == reply["id"]
    assert dispatch.attributes is not None
    assert dispatch.attributes["shoal.outcome"] == "succeeded"
    assert dispatch.attributes["http.response.status_code"] == 200

    # The worker saw the dispatch span's own context: propagation, not a guess.
    assert dispatch.context is not None
    flags = f"{dispatch.context.trace_flags:02x}"
    sent = f"00-{trace_id}-{trace.format_span_id(_id(dispatch))}-{flags}"
    assert worker.attributes is not None
    assert worker.attributes["shoal.worker.traceparent"] == sent
    assert worker.attributes["shoal.worker.propagated"] is True
    assert task["result"]["result"]["traceparent"] == sent
    assert worker.start_time is not None and worker.end_time is not None
    assert worker.end_time - worker.start_time >= 40_000_000  # the 0.05 s of work, in ns

    assert controller.dispatcher is not None
    run_time = controller.dispatcher.timings.run_time.snapshot("default")
    assert run_time.count == 1 and run_time.sum_s >= 0.04


async def test_enqueue_continues_the_trace_a_client_sent(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    manifest = tmp_path / "pool.yaml"
    manifest.write_text(POOL.format(min=0))
    controller = Controller(
        config=ControllerConfig(manifests=manifest), runtime=FakeRuntime(), queue=MemoryQueue()
    )
    controller.store.load()
    client_trace, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    app = make_app(controller, manage_controller=False)
    async with TestClient(TestServer(app)) as client:
        reply = await client.post(
            "/enqueue-task",
            json={},
            headers={"traceparent": f"00-{client_trace}-{client_span}-01"},
        )
        task_id = (await reply.json())["id"]
        malformed = await client.post("/enqueue-task", json={}, headers={"traceparent": "00-zz"})
        other_id = (await malformed.json())["id"]

    first, second = (s for s in spans.get_finished_spans() if s.name == "enqueue")
    assert _hex_trace(first) == client_trace
    assert first.parent is not None and first.parent.span_id == int(client_span, 16)
    stored = await controller.queue.get(task_id)
    assert stored is not None
    assert telemetry.span_ids(stored.traceparent) == (
        client_trace,
        trace.format_span_id(_id(first)),
    )
    # A malformed header is ignored: the enqueue starts a trace of its own.
    assert second.parent is None and _hex_trace(second) != client_trace
    other = await controller.queue.get(other_id)
    assert other is not None and telemetry.span_ids(other.traceparent) is not None
    await controller.queue.close()


async def test_reconcile_spans_carry_desired_observed_and_actions(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    manifest = tmp_path / "pool.yaml"
    manifest.write_text(POOL.format(min=0))
    store = PolicyStore(manifest)
    store.load()
    runtime = FakeRuntime()
    queue = MemoryQueue()
    reconciler = Reconciler(
        store=store, registry=Registry(), runtime=runtime, queue=queue, arrivals=lambda _p: 1
    )
    await queue.enqueue(EnqueueRequest(pool="default", payload=None))

    await reconciler.reconcile()
    await asyncio.gather(*list(reconciler._spawning))
    await reconciler.stop_all(grace_s=0.0)

    finished = list(spans.get_finished_spans())
    pool_pass = _one(finished, "reconcile pool")
    attributes = dict(pool_pass.attributes or {})
    [spawned] = runtime.started()
    assert attributes["shoal.desired"] == 1
    assert attributes["shoal.actions"] == (f"spawn {spawned}",)
    assert attributes["shoal.observed.ready"] == 0
    assert _parent_id(pool_pass) == _id(_one(finished, "reconcile"))
    start = _one(finished, "container start")
    assert _parent_id(start) == _id(pool_pass)
    assert start.attributes is not None and start.attributes["shoal.worker.name"] == spawned
    stop = _one(finished, "container stop")
    assert stop.attributes is not None and stop.attributes["shoal.reason"] == "shutdown"
    assert reconciler.pass_timings.snapshot().count == 1
    await queue.close()


def test_setup_tracing_defaults_to_ids_without_export(capsys: pytest.CaptureFixture[str]) -> None:
    provider = telemetry.setup_tracing({})
    try:
        assert provider is not None
        with telemetry.tracer.start_as_current_span("probe"):
            assert telemetry.current_trace_id() is not None
            assert telemetry.span_ids(telemetry.current_traceparent()) is not None
    finally:
        telemetry.install(None)
        if provider is not None:
            provider.shutdown()
    assert capsys.readouterr().out == ""


def test_setup_tracing_console_exporter_writes_spans(capsys: pytest.CaptureFixture[str]) -> None:
    provider = telemetry.setup_tracing(
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "shoal-test"}
    )
    assert provider is not None
    with telemetry.tracer.start_as_current_span("probe"):
        pass
    telemetry.install(None)
    provider.shutdown()
    exported = json.loads(capsys.readouterr().out)
    assert exported["name"] == "probe"
    assert exported["resource"]["attributes"]["service.name"] == "shoal-test"


def test_setup_tracing_disabled_sdk_traces_nothing() -> None:
    assert telemetry.setup_tracing({"OTEL_SDK_DISABLED": "true"}) is None
    with telemetry.tracer.start_as_current_span("probe"):
        assert telemetry.current_trace_id() is None


@pytest.mark.parametrize("name", ["otlp", "zipkin-please"], ids=["otlp-missing", "unknown"])
def test_setup_tracing_warns_about_an_exporter_it_cannot_make(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("opentelemetry.sdk")
    try:
        import opentelemetry.exporter.otlp  # type: ignore[import-not-found]  # noqa: F401

        if name == "otlp":
            pytest.skip("opentelemetry-exporter-otlp is installed here")
    except ImportError:
        pass
    with caplog.at_level(logging.WARNING, logger="controller.telemetry"):
        provider = telemetry.setup_tracing({"OTEL_TRACES_EXPORTER": name})
    telemetry.install(None)
    assert provider is not None
    provider.shutdown()
    assert any(name in r.getMessage() for r in caplog.records)


def test_log_lines_of_a_task_carry_its_id_and_trace_id(spans: InMemorySpanExporter) -> None:
    logger = logging.getLogger("controller.dispatcher")
    with telemetry.tracer.start_as_current_span("dispatch") as span:
        record = logger.makeRecord(
            logger.name,
            logging.INFO,
            __file__,
            1,
            "task %s did not succeed",
            ("t-1",),
            None,
            extra={logfields.TASK_ID: "t-1"},
        )
        assert TraceContextFilter().filter(record)
    trace_id = trace.format_trace_id(span.get_span_context().trace_id)

    text = TextFormatter().format(record)
    assert text.endswith(f"task t-1 did not succeed  task_id=t-1 trace_id={trace_id}")
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["task_id"], entry["trace_id"]) == ("t-1", trace_id)


def test_log_lines_outside_a_span_carry_no_trace_id() -> None:
    record = logging.makeLogRecord({"msg": "policy loaded"})
    TraceContextFilter().filter(record)
    assert not hasattr(record, logfields.TRACE_ID)
    assert "trace_id" not in TextFormatter().format(record)


def test_duration_histogram_counts_each_value_in_its_bucket() -> None:
    histogram = telemetry.DurationHistogram(buckets_s=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0, -3.0, math.nan, math.inf):
        histogram.observe(value, label="a")
    snap = histogram.snapshot("a")
    # 0.1 falls in le=0.1 (upper bounds are inclusive); -3 counts as 0; NaN and inf are dropped.
    assert snap.bounds == (0.1, 1.0, math.inf)
    assert snap.cumulative == (3, 5, 6)
    assert snap.count == 6
    assert snap.sum_s == pytest.approx(0.05 + 0.1 + 0.5 + 1.0 + 7.0)
    assert histogram.snapshot("never").count == 0
    assert list(histogram.labels()) == ["a"]
