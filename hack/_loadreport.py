"""What a load test run recorded, the figures drawn from it, and how they are shown.

Owns the run's record types (one frozen snapshot per task, per metrics sample, per
scaling event and per chaos kill), the summary that ``hack/loadtest.py --json`` prints,
the plain-text report and the self-contained HTML report (inline SVG, no network).
It does no I/O besides returning strings: the load generator gathers the records and
decides where the text goes. Not part of the ``shoal`` package; scripts only.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

FINAL_STATES = frozenset({"succeeded", "failed", "dead", "cancelled"})


@dataclass(frozen=True)
class TaskRecord:
    """One scheduled task, as far as the load generator knows it.

    Client times (``sent_at``) and server times (``created_at`` and on) are unix
    seconds; both clocks are the same host's, since only loopback is targeted by default.
    """

    seq: int
    scheduled_s: float
    sent_at: float | None = None
    task_id: str | None = None
    rejected: str | None = None
    state: str | None = None
    attempts: int = 0
    worker: str | None = None
    workers: tuple[str, ...] = ()
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    gone: bool = False

    @property
    def accepted(self) -> bool:
        return self.task_id is not None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES and not self.gone

    @property
    def ran_twice(self) -> bool:
        # A lease handed back unused (the worker answered 429) names a worker in
        # the history without running the task there; only spent attempts count.
        return self.attempts > 1

    @property
    def wait_s(self) -> float | None:
        if self.created_at is None or self.started_at is None:
            return None
        return self.started_at - self.created_at

    @property
    def e2e_s(self) -> float | None:
        if not self.final or self.created_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.created_at


@dataclass(frozen=True)
class MetricSample:
    at: float
    replicas: int
    queue_length: int | None = None
    active_tasks: int | None = None
    pool_desired: int | None = None


@dataclass(frozen=True)
class ScalingEvent:
    at: float
    pool: str
    from_replicas: int | None
    to_replicas: int | None
    reason: str


@dataclass(frozen=True)
class KillEvent:
    at: float
    container_id: str


@dataclass(frozen=True)
class RunResult:
    """Everything one run gathered; ``started_at``/``ended_at`` are unix seconds."""

    url: str
    pool: str
    description: str
    started_at: float
    ended_at: float
    tasks: tuple[TaskRecord, ...]
    samples: tuple[MetricSample, ...] = ()
    events: tuple[ScalingEvent, ...] = ()
    kills: tuple[KillEvent, ...] = ()
    counters: dict[str, int] = field(default_factory=dict)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolating linearly between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def summarize(result: RunResult) -> dict[str, object]:
    """The run's figures: the object behind ``--json`` and the head of both reports.

    ``submitted`` counts tasks the API accepted (202). ``lost`` counts accepted tasks
    that are not final at the end or came back 404. Latencies use the server's clock:
    wait = startedAt - createdAt (first lease), e2e = finishedAt - createdAt over final
    tasks. Throughput is completed tasks per second from first createdAt to last
    finishedAt.
    """
    tasks = result.tasks
    accepted = [t for t in tasks if t.accepted]
    by_state = {
        state: sum(1 for t in accepted if t.final and t.state == state) for state in FINAL_STATES
    }
    waits = [w for t in accepted if (w := t.wait_s) is not None]
    e2es = [e for t in accepted if (e := t.e2e_s) is not None]
    lags = [t.sent_at - (result.started_at + t.scheduled_s) for t in tasks if t.sent_at is not None]

    finished = [t.finished_at for t in accepted if t.final and t.finished_at is not None]
    created = [t.created_at for t in accepted if t.created_at is not None]
    throughput = None
    if finished and created and max(finished) > min(created):
        throughput = len(finished) / (max(finished) - min(created))
    sent = [t.sent_at for t in tasks if t.sent_at is not None]
    offered = None
    if len(sent) > 1 and max(sent) > min(sent):
        offered = (len(sent) - 1) / (max(sent) - min(sent))

    summary: dict[str, object] = {
        "scheduled": len(tasks),
        "submitted": len(accepted),
        "rejected": sum(1 for t in tasks if t.rejected is not None),
        "succeeded": by_state["succeeded"],
        "failed": by_state["failed"],
        "dead": by_state["dead"],
        "cancelled": by_state["cancelled"],
        "lost": sum(1 for t in accepted if not t.final),
        "ran_twice": sum(1 for t in accepted if t.ran_twice),
        "max_replicas": max((s.replicas for s in result.samples), default=0),
        "throughput_per_s": _rounded(throughput),
        "offered_rate_per_s": _rounded(offered),
        "duration_s": _rounded(result.ended_at - result.started_at),
        "send_lag_p99_s": _rounded(percentile(lags, 99)),
        "scaling_events": len(result.events),
        "kills": len(result.kills),
    }
    for q in (50, 95, 99):
        summary[f"p{q}_wait_s"] = _rounded(percentile(waits, q))
        summary[f"p{q}_e2e_s"] = _rounded(percentile(e2es, q))
    summary.update(result.counters)
    return summary


def _fmt(value: object, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}{unit}"
    return f"{value}{unit}"


def render_text(result: RunResult, summary: dict[str, object]) -> str:
    """A short human report for stdout."""
    s = summary
    lines = [
        f"shoal load test: {result.description}",
        f"  target        {result.url} pool={result.pool}",
        f"  tasks         scheduled={s['scheduled']} submitted={s['submitted']} "
        f"rejected={s['rejected']}",
        f"  outcome       succeeded={s['succeeded']} failed={s['failed']} dead={s['dead']} "
        f"cancelled={s['cancelled']} lost={s['lost']} ran_twice={s['ran_twice']}",
        f"  throughput    {_fmt(s['throughput_per_s'])}/s completed, "
        f"{_fmt(s['offered_rate_per_s'])}/s offered, over {_fmt(s['duration_s'], ' s')}",
        f"  queue wait    p50={_fmt(s['p50_wait_s'], 's')} p95={_fmt(s['p95_wait_s'], 's')} "
        f"p99={_fmt(s['p99_wait_s'], 's')}",
        f"  end-to-end    p50={_fmt(s['p50_e2e_s'], 's')} p95={_fmt(s['p95_e2e_s'], 's')} "
        f"p99={_fmt(s['p99_e2e_s'], 's')}",
        f"  replicas      max={s['max_replicas']} scaling_events={s['scaling_events']} "
        f"kills={s['kills']}",
        f"  client        send_lag_p99={_fmt(s['send_lag_p99_s'], 's')}",
    ]
    return "\n".join(lines)


# --- HTML report -------------------------------------------------------------------------

_WIDTH, _HEIGHT = 760, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 16, 40, 34
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")

Series = tuple[str, Sequence[tuple[float, float]]]


def _nice_step(span: float, n_ticks: int = 5) -> float:
    raw = max(span, 1e-9) / n_ticks
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def _ticks(top: float) -> list[float]:
    step = _nice_step(top)
    return [i * step for i in range(int(top / step + 1e-9) + 1)]


def svg_chart(
    title: str,
    series: Sequence[Series],
    *,
    x_max: float,
    y_unit: str = "",
    markers: Iterable[tuple[float, str, str]] = (),
    step: bool = False,
) -> str:
    """A line chart as an inline ``<svg>``; x is seconds since the start of the run.

    ``markers`` are vertical lines ``(x, tooltip, colour)``; ``step`` draws the series
    as a staircase, which suits replica counts.
    """
    x_max = max(x_max, 1e-6)
    y_top = max((y for _, points in series for _, y in points), default=0.0)
    y_ticks = _ticks(y_top if y_top > 0 else 1.0)
    y_max = y_ticks[-1] if y_ticks[-1] >= y_top else y_top
    plot_w = _WIDTH - _LEFT - _RIGHT
    plot_h = _HEIGHT - _TOP - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + plot_w * x / x_max

    def py(y: float) -> float:
        return _TOP + plot_h * (1 - y / y_max)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{_LEFT}" y="16" class="t">{html.escape(title)}</text>',
    ]
    for tick in y_ticks:
        parts.append(
            f'<line x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{py(tick):.1f}" '
            f'y2="{py(tick):.1f}" class="g"/>'
            f'<text x="{_LEFT - 6}" y="{py(tick) + 4:.1f}" text-anchor="end">'
            f"{tick:g}{html.escape(y_unit)}</text>"
        )
    for tick in _ticks(x_max):
        parts.append(
            f'<text x="{px(tick):.1f}" y="{_HEIGHT - _BOTTOM + 16}" text-anchor="middle">'
            f"{tick:g}s</text>"
        )
    for x, tip, colour in markers:
        parts.append(
            f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{_TOP}" y2="{_TOP + plot_h}" '
            f'stroke="{colour}" stroke-dasharray="3,3"><title>{html.escape(tip)}</title></line>'
        )
    for index, (name, points) in enumerate(series):
        colour = _COLORS[index % len(_COLORS)]
        coords: list[str] = []
        previous_y: float | None = None
        for x, y in points:
            if step and previous_y is not None:
                coords.append(f"{px(x):.1f},{py(previous_y):.1f}")
            coords.append(f"{px(x):.1f},{py(y):.1f}")
            previous_y = y
        if coords:
            parts.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" '
                f'points="{" ".join(coords)}"/>'
            )
        # Legends sit in one row under the title, one 110-pixel slot per series.
        legend_x = _LEFT + index * 110
        parts.append(
            f'<rect x="{legend_x}" y="23" width="10" height="10" fill="{colour}"/>'
            f'<text x="{legend_x + 14}" y="32">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _bins(values: Iterable[tuple[float, float]], *, width_s: float) -> dict[int, list[float]]:
    binned: dict[int, list[float]] = {}
    for x, y in values:
        binned.setdefault(int(x // width_s), []).append(y)
    return binned


def _rate_series(
    times: Iterable[float], *, width_s: float, n_bins: int
) -> list[tuple[float, float]]:
    counts = [0] * n_bins
    for t in times:
        index = int(t // width_s)
        if 0 <= index < n_bins:
            counts[index] += 1
    return [((i + 0.5) * width_s, c / width_s) for i, c in enumerate(counts)]


def _latency_series(
    pairs: Sequence[tuple[float, float]], *, width_s: float, q: float
) -> list[tuple[float, float]]:
    binned = _bins(pairs, width_s=width_s)
    return [((i + 0.5) * width_s, percentile(ys, q) or 0.0) for i, ys in sorted(binned.items())]


def render_html(result: RunResult, summary: dict[str, object]) -> str:
    """A self-contained HTML page: figures, charts over time and the scaling events."""
    t0 = result.started_at
    span_s = max(result.ended_at - t0, 0.1)
    # About 60 points per chart keeps the page small; bins under a second are mostly
    # noise unless the whole run is that short.
    width_s = max(span_s / 60, min(1.0, span_s / 10))
    n_bins = int(span_s // width_s) + 1
    accepted = [t for t in result.tasks if t.accepted]

    sent = [t.sent_at - t0 for t in result.tasks if t.sent_at is not None]
    done = [t.finished_at - t0 for t in accepted if t.final and t.finished_at is not None]
    throughput = svg_chart(
        "Throughput (tasks per second)",
        [
            ("sent", _rate_series(sent, width_s=width_s, n_bins=n_bins)),
            ("completed", _rate_series(done, width_s=width_s, n_bins=n_bins)),
        ],
        x_max=span_s,
        y_unit="/s",
    )

    waits = [
        (t.created_at - t0, w) for t in accepted if (w := t.wait_s) is not None and t.created_at
    ]
    e2es = [(t.created_at - t0, e) for t in accepted if (e := t.e2e_s) is not None and t.created_at]
    latency = svg_chart(
        "Latency by enqueue time (seconds)",
        [
            ("wait p50", _latency_series(waits, width_s=width_s, q=50)),
            ("wait p95", _latency_series(waits, width_s=width_s, q=95)),
            ("e2e p50", _latency_series(e2es, width_s=width_s, q=50)),
            ("e2e p95", _latency_series(e2es, width_s=width_s, q=95)),
        ],
        x_max=span_s,
        y_unit="s",
    )

    markers = [
        (e.at - t0, f"{e.from_replicas} -> {e.to_replicas}: {e.reason}", "#888")
        for e in result.events
    ] + [(k.at - t0, f"killed {k.container_id[:12]}", "#d62728") for k in result.kills]
    replica_series: list[Series] = [("replicas", [(s.at - t0, s.replicas) for s in result.samples])]
    desired = [
        (s.at - t0, float(s.pool_desired)) for s in result.samples if s.pool_desired is not None
    ]
    if desired:
        replica_series.append(("desired (pool)", desired))
    replicas = svg_chart("Replicas", replica_series, x_max=span_s, markers=markers, step=True)
    backlog = svg_chart(
        "Backlog",
        [
            ("queued", [(s.at - t0, s.queue_length or 0) for s in result.samples]),
            ("active", [(s.at - t0, s.active_tasks or 0) for s in result.samples]),
        ],
        x_max=span_s,
    )

    figure_rows = "".join(
        f"<tr><th>{html.escape(key)}</th><td>{html.escape(_fmt(value))}</td></tr>"
        for key, value in summary.items()
    )
    event_rows = (
        "".join(
            f"<tr><td>{e.at - t0:.1f}s</td><td>{html.escape(e.pool)}</td>"
            f"<td>{e.from_replicas} &rarr; {e.to_replicas}</td>"
            f"<td>{html.escape(e.reason)}</td></tr>"
            for e in result.events
        )
        or '<tr><td colspan="4">none during the run</td></tr>'
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Shoal load test: {html.escape(result.description)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #222; max-width: 800px; }}
table {{ border-collapse: collapse; margin: 8px 0 20px; }}
th, td {{ text-align: left; padding: 2px 12px 2px 0; border-bottom: 1px solid #eee; }}
svg {{ display: block; margin: 12px 0; font-size: 11px; }}
svg .t {{ font-weight: 600; font-size: 13px; }}
svg .g {{ stroke: #eee; }}
</style></head><body>
<h1>Shoal load test</h1>
<p>{html.escape(result.description)}<br>target {html.escape(result.url)}, pool
{html.escape(result.pool)}, {span_s:.1f} s; charts in bins of {width_s:.2f} s.</p>
<h2>Figures</h2><table>{figure_rows}</table>
<h2>Over time</h2>
{throughput}
{latency}
{replicas}
{backlog}
<h2>Scaling events</h2>
<table><tr><th>time</th><th>pool</th><th>replicas</th><th>reason</th></tr>{event_rows}</table>
</body></html>
"""
