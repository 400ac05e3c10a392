"""Tracing and timing for Shoal: the OpenTelemetry set-up and the W3C trace context helpers.

It owns three things. ``setup_tracing`` builds a tracer provider from the standard ``OTEL_*``
variables (``OTEL_TRACES_EXPORTER`` = ``none`` by default, ``console``, or ``otlp`` when
``opentelemetry-exporter-otlp`` is installed; ``OTEL_SDK_DISABLED``, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_TRACES_SAMPLER`` as the SDK reads them). ``tracer`` is the
module-level tracer every Shoal module starts spans with; it follows whatever provider was
installed last, so tests can swap in an in-memory exporter. ``DurationHistogram`` keeps the
run-time, queue-wait and reconcile-pass histograms that ``api.prometheus`` reads at scrape time.

A task's trace: ``enqueue`` (API) -> ``queue wait`` and ``dispatch`` (dispatcher, a client span
that sends ``traceparent`` to the worker) -> ``worker``. NB: the worker is stdlib-only and
exports nothing; the ``worker`` span is made here, on the controller side, from the start and
finish times the worker reports in its result, as a child of the dispatch span. The worker's
echo of the ``traceparent`` it received is kept on that span as proof of propagation.

It does not decide what to trace; the API, dispatcher and reconciler call it.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

logger = logging.getLogger(__name__)

TRACER_NAME = "shoal"
_PROPAGATOR = TraceContextTextMapPropagator()
_FALSE = ("", "0", "false", "no", "off")

# The provider Shoal's tracer uses; None means OpenTelemetry's global one.
_installed: trace.TracerProvider | None = None
_cached: tuple[trace.TracerProvider, trace.Tracer] | None = None


def install(provider: trace.TracerProvider | None) -> None:
    """Makes ``tracer`` start its spans on ``provider`` (None: the global provider)."""
    global _installed, _cached
    _installed = provider
    _cached = None


def _current_tracer() -> trace.Tracer:
    global _cached
    provider = _installed if _installed is not None else trace.get_tracer_provider()
    if _cached is None or _cached[0] is not provider:
        _cached = (provider, provider.get_tracer(TRACER_NAME))
    return _cached[1]


class _ShoalTracer:
    """Delegates to the installed provider's tracer, looked up at each call."""

    def start_as_current_span(
        self,
        name: str,
        *,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> AbstractContextManager[Span]:
        return _current_tracer().start_as_current_span(
            name, context=context, kind=kind, attributes=attributes
        )

    def start_span(
        self,
        name: str,
        *,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, AttributeValue] | None = None,
        start_time: int | None = None,
    ) -> Span:
        return _current_tracer().start_span(
            name, context=context, kind=kind, attributes=attributes, start_time=start_time
        )


tracer = _ShoalTracer()


# -- set-up from the environment ----------------------------------------------------------


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter | None:
    if name == "console":
        # The SDK's default binds the stdout of import time; this one follows redirection.
        return ConsoleSpanExporter(out=sys.stdout)
    if name == "otlp":
        protocol = env.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
        )
        try:
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                    OTLPSpanExporter,
                )
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
                    OTLPSpanExporter,
                )
        except ImportError:
            logger.warning(
                "OTEL_TRACES_EXPORTER=otlp, but opentelemetry-exporter-otlp is not installed; "
                "spans are not exported"
            )
            return None
        exporter: SpanExporter = OTLPSpanExporter()
        return exporter
    logger.warning("OTEL_TRACES_EXPORTER names %r, which Shoal does not know; ignored", name)
    return None


def setup_tracing(env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """Builds and installs a provider from ``OTEL_*`` variables; the caller shuts it down.

    With no exporter the provider still makes trace ids, so log lines and workers see the
    same ids a collector would. ``OTEL_SDK_DISABLED=true`` returns None and traces nothing.
    """
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() not in _FALSE:
        install(None)
        return None
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or "shoal"})
    provider = TracerProvider(resource=resource)
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "none").split(",")]
    exporting = []
    for name in names:
        if name in ("", "none"):
            continue
        exporter = _exporter(name, env)
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
            exporting.append(name)
    install(provider)
    if exporting:
        logger.info("tracing: exporting spans to %s", ", ".join(exporting))
    return provider


# -- W3C trace context ---------------------------------------------------------------------


def extract(traceparent: str | None) -> Context:
    """The context a ``traceparent`` header carries; empty when it is missing or malformed."""
    if not traceparent:
        return Context()
    return _PROPAGATOR.extract({"traceparent": traceparent})


def traceparent_of(span: Span) -> str | None:
    """The ``traceparent`` header naming ``span`` as parent, or None for an invalid span."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def current_traceparent() -> str | None:
    return traceparent_of(trace.get_current_span())


def span_ids(traceparent: str | None) -> tuple[str, str] | None:
    """(trace id, span id) as lower-case hex from a valid ``traceparent``, else None."""
    context = trace.get_current_span(extract(traceparent)).get_span_context()
    if not context.is_valid:
        return None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


def current_trace_id() -> str | None:
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


def unix_ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def record_span(
    name: str,
    *,
    parent: Context,
    start_s: float,
    end_s: float,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, AttributeValue] | None = None,
) -> Span:
    """Records a span after the fact, from unix start and end times (both in seconds)."""
    span = tracer.start_span(
        name, context=parent, kind=kind, attributes=attributes, start_time=unix_ns(start_s)
    )
    span.end(end_time=unix_ns(max(start_s, end_s)))
    return span


# -- histograms read at scrape time --------------------------------------------------------

DEFAULT_BUCKETS_S: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)


@dataclass(frozen=True)
class HistogramSnapshot:
    """Cumulative counts per upper bound (the last bound is +Inf), their sum and total."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    sum_s: float
    count: int

    def to_json(self) -> dict[str, Any]:
        return {
            "buckets": {
                _bound_text(b): c for b, c in zip(self.bounds, self.cumulative, strict=True)
            },
            "sumS": self.sum_s,
            "count": self.count,
        }


def _bound_text(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


@dataclass
class _Series:
    counts: list[int]
    sum_s: float = 0.0


@dataclass
class DurationHistogram:
    """Durations in seconds by label value (a pool name, or "" for none).

    Plain Python and event-loop only: the dispatcher and reconciler observe, the
    Prometheus collector and ``/metrics.json`` read snapshots.
    """

    buckets_s: Sequence[float] = DEFAULT_BUCKETS_S
    _series: dict[str, _Series] = field(default_factory=dict)

    def observe(self, value_s: float, *, label: str = "") -> None:
        if not math.isfinite(value_s):
            return
        value_s = max(0.0, value_s)
        series = self._series.get(label)
        if series is None:
            series = self._series[label] = _Series(counts=[0] * (len(self.buckets_s) + 1))
        series.counts[bisect.bisect_left(self.buckets_s, value_s)] += 1
        series.sum_s += value_s

    def labels(self) -> Iterator[str]:
        return iter(sorted(self._series))

    def snapshot(self, label: str = "") -> HistogramSnapshot:
        series = self._series.get(label) or _Series(counts=[0] * (len(self.buckets_s) + 1))
        cumulative: list[int] = []
        running = 0
        for count in series.counts:
            running += count
            cumulative.append(running)
        return HistogramSnapshot(
            bounds=(*self.buckets_s, math.inf),
            cumulative=tuple(cumulative),
            sum_s=series.sum_s,
            count=running,
        )
