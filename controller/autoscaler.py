"""The autoscaler: how many workers a pool should have, and why.

This module owns one pure function, ``decide``. The pool's policy, a frozen snapshot of its
metrics and the ``History`` returned by the previous call go in; the desired number of
replicas, a human-readable reason and the next ``History`` come out. It does no I/O, reads
no clock (``PoolMetrics.now_s`` is injected) and keeps nothing between calls, so the same
inputs always give the same ``Decision``.

It deliberately does not choose which workers to stop, nor when to spawn: the reconciler
turns ``desired`` into a plan (idle workers are drained first) and paces the spawns.
``hack/simulate.py`` replays traces through this very function.

The rules, in the order they apply (``docs/autoscaling.md`` explains each one):

1. per-metric recommendations (backlog per replica, utilization; HPA's tolerance), the
   busy floor ``ceil(in_flight / concurrency)`` and, when enabled, the Little's-law
   forecast; the raw recommendation is their maximum;
2. panic (Knative): demand at ``threshold`` x the current replicas scales up at once and
   forbids scale-down until the trigger has been absent for ``panic.window``;
3. otherwise HPA's stabilization windows and per-period rate limits (``maxStep``); scale-down
   also takes at most one step per ``scaleDown.period``, so a pool shrinks in few steps;
4. scale to zero only after ``scaleToZero.after`` without work; a queued task wakes a pool
   at zero at once; finally the clamp to ``[min, max]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from controller.policy import PoolSpec

# Without a measured start-up time, forecasts look this far ahead.
FALLBACK_HORIZON_S = 5.0

# Holt's smoother gains for a 1 s sample; other sample spacings are adjusted so that
# the smoothing per second of trace stays the same.
_LEVEL_GAIN = 0.3
_TREND_GAIN = 0.1

# Forecast load (in workers) below which the forecast asks for no replica at all.
_FORECAST_FLOOR = 0.5

# Guards ceil() against 6.000000001 from float division.
_EPSILON = 1e-9


@dataclass(frozen=True)
class PoolMetrics:
    """What the reconciler observed about one pool at ``now_s`` (monotonic seconds)."""

    now_s: float
    queued: int
    in_flight: int
    ready: int
    starting: int
    draining: int
    concurrency: int
    arrivals_total: int
    service_time_s: float | None = None
    startup_s: float | None = None
    # Synchronous requests (through the balancer) arrived lately: the pool is not idle
    # even when none is in flight at this instant.
    sync_active: bool = False


@dataclass(frozen=True)
class RateSmoother:
    """Holt's double exponential smoothing of the arrival rate (level and trend)."""

    level_per_s: float
    trend_per_s2: float
    last_t_s: float
    last_total: int
    n_samples: int

    @staticmethod
    def start(*, now_s: float, arrivals_total: int) -> RateSmoother:
        return RateSmoother(0.0, 0.0, now_s, arrivals_total, 0)

    def observe(self, *, now_s: float, arrivals_total: int) -> RateSmoother:
        """Folds in the arrivals since the last sample; a clock that did not move is a no-op.

        A counter that went backwards (a queue reset) restarts the smoother.
        """
        dt_s = now_s - self.last_t_s
        if dt_s <= 0:
            return self
        if arrivals_total < self.last_total:
            return RateSmoother.start(now_s=now_s, arrivals_total=arrivals_total)
        rate = (arrivals_total - self.last_total) / dt_s
        if self.n_samples == 0:
            return RateSmoother(rate, 0.0, now_s, arrivals_total, 1)

        level_gain = 1.0 - (1.0 - _LEVEL_GAIN) ** dt_s
        trend_gain = 1.0 - (1.0 - _TREND_GAIN) ** dt_s
        predicted = self.level_per_s + self.trend_per_s2 * dt_s
        level = level_gain * rate + (1.0 - level_gain) * predicted
        slope = (level - self.level_per_s) / dt_s
        trend = trend_gain * slope + (1.0 - trend_gain) * self.trend_per_s2
        return RateSmoother(level, trend, now_s, arrivals_total, self.n_samples + 1)

    def forecast_per_s(self, *, horizon_s: float) -> float:
        return max(0.0, self.level_per_s + self.trend_per_s2 * horizon_s)


@dataclass(frozen=True)
class History:
    """Everything ``decide`` remembers; returned anew by each call, never mutated.

    ``recommendations`` are the raw (unstabilized) recommendations and ``before`` the
    desired value in force when each call began, both as ``(t_s, replicas)`` pairs, pruned
    to the longest window or period of the policy.
    """

    recommendations: tuple[tuple[float, int], ...] = ()
    before: tuple[tuple[float, int], ...] = ()
    last_desired: int | None = None
    last_busy_s: float | None = None
    panic_until_s: float | None = None
    last_scale_down_s: float | None = None
    smoother: RateSmoother | None = None

    @staticmethod
    def empty() -> History:
        return History()


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    panic: bool
    forecast_rate_per_s: float | None
    forecast_replicas: int | None
    history: History
    # Per-metric recommendations before stabilization, e.g. (("backlog", 6), ("busy", 2)).
    recommendations: tuple[tuple[str, int], ...] = field(default=())
    idle_for_s: float = 0.0


def _ceil(value: float) -> int:
    return max(0, math.ceil(value - _EPSILON))


def _metric_recommendations(
    spec: PoolSpec, metrics: PoolMetrics, *, current: int
) -> tuple[list[tuple[str, int]], list[str]]:
    """HPA-style per-metric answers, with their reasons. Tolerance keeps ``current``."""
    targets = spec.scaling.targets
    recs: list[tuple[str, int]] = []
    notes: list[str] = []

    if targets.backlog_per_replica is not None:
        per_replica = targets.backlog_per_replica
        work = metrics.queued + metrics.in_flight
        rec = _ceil(work / per_replica)
        note = f"backlog {work} / {per_replica:g} per replica -> {rec}"
        if current > 0 and abs(work / (current * per_replica) - 1.0) <= targets.tolerance:
            rec = current
            note = f"backlog {work} / {per_replica:g} per replica within tolerance -> {rec}"
        recs.append(("backlog", rec))
        notes.append(note)

    if targets.utilization is not None:
        capacity = metrics.ready * metrics.concurrency
        if capacity > 0:
            ratio = metrics.in_flight / capacity / targets.utilization
            used = metrics.in_flight / capacity
            if abs(ratio - 1.0) <= targets.tolerance:
                rec = current
                note = f"utilization {used:.0%} within tolerance -> {rec}"
            else:
                rec = _ceil(ratio * metrics.ready)
                note = f"utilization {used:.0%} / target {targets.utilization:.0%} -> {rec}"
        else:
            rec = _ceil(metrics.in_flight / (metrics.concurrency * targets.utilization))
            note = f"utilization: no ready worker -> {rec}"
        recs.append(("utilization", rec))
        notes.append(note)

    return recs, notes


def _forecast(
    spec: PoolSpec, metrics: PoolMetrics, smoother: RateSmoother
) -> tuple[float | None, int | None]:
    """The arrival rate over the horizon and the replicas it needs by Little's law."""
    if smoother.n_samples < 2:
        return None, None
    horizon = spec.scaling.predictive.horizon
    if horizon == "auto":
        horizon_s = metrics.startup_s if metrics.startup_s is not None else FALLBACK_HORIZON_S
    else:
        horizon_s = horizon
    rate = smoother.forecast_per_s(horizon_s=horizon_s)
    if metrics.service_time_s is None:
        return rate, None

    # Little's law gives busy slots; the utilization target, when set, adds headroom.
    slots = rate * metrics.service_time_s / (spec.scaling.targets.utilization or 1.0)
    workers = slots / metrics.concurrency
    # NB: a fading rate never reaches zero; less than half a worker's worth of work asks for
    # none, or the forecast alone would keep an idle pool from ever scaling to zero.
    return rate, _ceil(workers) if workers >= _FORECAST_FLOOR else 0


def _in_window(
    samples: tuple[tuple[float, int], ...], *, now_s: float, window_s: float
) -> list[int]:
    return [value for t_s, value in samples if t_s > now_s - window_s]


def _stabilize(
    spec: PoolSpec,
    *,
    recommendations: tuple[tuple[float, int], ...],
    raw: int,
    prev: int,
    now_s: float,
) -> tuple[int, str | None]:
    """HPA: move toward ``raw`` only as far as every recommendation in the windows agrees."""
    up_window_s = spec.scaling.scale_up.stabilization_window
    down_window_s = spec.scaling.scale_down.stabilization_window
    up_floor = min(_in_window(recommendations, now_s=now_s, window_s=up_window_s), default=raw)
    down_ceiling = max(
        _in_window(recommendations, now_s=now_s, window_s=down_window_s), default=raw
    )
    up_floor, down_ceiling = min(up_floor, raw), max(down_ceiling, raw)
    result = prev
    if result < up_floor:
        result = up_floor
    if result > down_ceiling:
        result = down_ceiling
    if result == raw:
        return result, None
    if result < raw:
        return result, f"held at {result} by the {up_window_s:g}s scale-up window"
    return result, f"held at {result} by the {down_window_s:g}s scale-down window"


def _rate_limit(
    spec: PoolSpec,
    *,
    before: tuple[tuple[float, int], ...],
    value: int,
    prev: int,
    now_s: float,
    last_scale_down_s: float | None,
) -> tuple[int, str | None]:
    """At most ``maxStep`` replicas more (or fewer) than at any point of the last period.

    ``before`` holds, per earlier call, the desired value in force when it began (HPA:
    the replicas at the start of the period, less the ones added within it).
    """
    up = spec.scaling.scale_up
    if value > prev:
        base = min([prev, *_in_window(before, now_s=now_s, window_s=up.period)])
        upper = base + up.max_step
        if value > upper:
            return upper, f"capped by maxStep {up.max_step} per {up.period:g}s -> {upper}"
        return value, None

    down = spec.scaling.scale_down
    # Without maxStep, the period still paces scale-down: one step per period, each straight
    # to what the window allows, rather than a new step each time an old peak leaves it.
    if value < prev and last_scale_down_s is not None:
        wait_s = last_scale_down_s + down.period - now_s
        if wait_s > 0:
            return prev, f"next scale-down in {wait_s:.0f}s (one per {down.period:g}s)"
    if value < prev and down.max_step is not None:
        base = max([prev, *_in_window(before, now_s=now_s, window_s=down.period)])
        lower = base - down.max_step
        if value < lower:
            return lower, (
                f"scale-down capped by maxStep {down.max_step} per {down.period:g}s -> {lower}"
            )
    return value, None


def _retention_s(spec: PoolSpec) -> float:
    scaling = spec.scaling
    return max(
        scaling.scale_up.stabilization_window,
        scaling.scale_down.stabilization_window,
        scaling.scale_up.period,
        scaling.scale_down.period,
        scaling.panic.window,
    )


def decide(spec: PoolSpec, metrics: PoolMetrics, history: History) -> Decision:
    """Desired replicas for one pool, with the reason and the history to pass next time.

    NB: pure and deterministic. ``desired`` always lies in ``[min, max]`` and, within that,
    never below ``ceil(in_flight / concurrency)``: a plan never needs to stop a busy worker.
    """
    scaling = spec.scaling
    now_s = metrics.now_s
    current = metrics.ready + metrics.starting
    prev = history.last_desired if history.last_desired is not None else current
    lowest, highest = spec.replicas.min, spec.replicas.max
    busy = _ceil(metrics.in_flight / metrics.concurrency)

    # Step 1: the raw recommendation, the maximum over every enabled signal.
    recs, notes = _metric_recommendations(spec, metrics, current=current)
    recs.append(("busy", busy))
    if history.smoother is None:
        smoother = RateSmoother.start(now_s=now_s, arrivals_total=metrics.arrivals_total)
    else:
        smoother = history.smoother.observe(now_s=now_s, arrivals_total=metrics.arrivals_total)
    forecast_rate, forecast_replicas = _forecast(spec, metrics, smoother)
    if scaling.predictive.enabled and forecast_replicas is not None:
        recs.append(("forecast", forecast_replicas))
        notes.append(f"forecast {forecast_rate:.2f}/s -> {forecast_replicas}")
    # A recommendation above max would only make panic and the windows hold on to nothing.
    demand = raw = max(value for _, value in recs)
    if raw > highest:
        notes.append(f"clamped to [{lowest}, {highest}] -> {highest}")
        raw = highest
    if busy > 0 and all(value < busy for name, value in recs if name != "busy"):
        notes.append(f"{metrics.in_flight} in flight keep {busy} workers busy")

    retention_s = _retention_s(spec)
    kept = [(t, v) for t, v in history.recommendations if t > now_s - retention_s]
    if history.last_desired is None and raw < current:
        # A first decision over workers already there (adopted after a restart) counts
        # them as a recommendation, as HPA does, so the scale-down window applies to them.
        kept.append((now_s, current))
    recommendations = (*kept, (now_s, raw))
    before = tuple((t, v) for t, v in history.before if t > now_s - retention_s)

    # Step 2: panic, Knative's answer to bursts: up at once, never down while it lasts.
    # NB: the trigger reads the demand before the clamp, or a burst past max would never panic.
    threshold = scaling.panic.threshold
    triggered = scaling.panic.enabled and raw > current and demand >= threshold * current
    panic_until_s = history.panic_until_s
    if triggered:
        panic_until_s = now_s + scaling.panic.window
    panic = scaling.panic.enabled and panic_until_s is not None and now_s < panic_until_s
    if not panic:
        panic_until_s = None

    if panic:
        desired = max(raw, prev)
        if desired > raw:
            notes.append(f"panic: holding {desired}, no scale-down")
        elif triggered:
            notes.append(f"panic: demand {demand} >= {threshold:g} x {current}")
    else:
        # Step 3: stabilization windows, then per-period rate limits.
        desired, note = _stabilize(
            spec, recommendations=recommendations, raw=raw, prev=prev, now_s=now_s
        )
        if note:
            notes.append(note)
        desired, note = _rate_limit(
            spec,
            before=before,
            value=desired,
            prev=prev,
            now_s=now_s,
            last_scale_down_s=history.last_scale_down_s,
        )
        if note:
            notes.append(note)

    # Step 4: scale to zero only after an idle period; the first task wakes the pool.
    idle = metrics.queued == 0 and metrics.in_flight == 0 and not metrics.sync_active
    last_busy_s = history.last_busy_s if history.last_busy_s is not None else now_s
    if not idle:
        last_busy_s = now_s
    idle_for_s = max(0.0, now_s - last_busy_s)
    if lowest == 0 and desired == 0 and prev > 0 and idle_for_s < scaling.scale_to_zero.after:
        desired = 1
        notes.append(
            f"idle {idle_for_s:g}s of {scaling.scale_to_zero.after:g}s before scaling to zero"
        )
    if desired == 0 and metrics.queued > 0:
        desired = 1
        notes.append("a queued task wakes the pool")

    if desired < busy:
        desired = busy
    clamped = min(max(desired, lowest), highest)
    if clamped != desired:
        notes.append(f"clamped to [{lowest}, {highest}] -> {clamped}")
    desired = clamped

    new_history = replace(
        history,
        recommendations=recommendations,
        before=(*before, (now_s, prev)),
        last_desired=desired,
        last_busy_s=last_busy_s,
        panic_until_s=panic_until_s,
        last_scale_down_s=now_s if desired < prev else history.last_scale_down_s,
        smoother=smoother,
    )
    return Decision(
        desired=desired,
        reason="; ".join(notes) if notes else f"no enabled signal -> {desired}",
        panic=panic,
        forecast_rate_per_s=forecast_rate,
        forecast_replicas=forecast_replicas,
        history=new_history,
        recommendations=tuple(recs),
        idle_for_s=idle_for_s,
    )
