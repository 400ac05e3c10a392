"""Re-implementations of the anchors for the simulator: Kubernetes HPA, KEDA, Knative KPA.

Each one follows its project's documented defaults (the numbers are in ``*Settings``), written
afresh for ``hack/simulate.py``; none of this is imported by the controller. They scale the
simulated pool the way a Deployment does (``simcore.k8s_resize``): pods are created in
parallel, and a pod chosen for removal leaves the endpoints at once and gets its termination
grace period, whether or not it is busy.

Which metric each anchor watches, and why, is in ``docs/autoscaling.md``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from simcore import Pool, k8s_resize

_EPSILON = 1e-9


def _ceil(value: float) -> int:
    return max(0, math.ceil(value - _EPSILON))


@dataclass(frozen=True)
class HpaSettings:
    """autoscaling/v2 defaults: 15 s sync, 10% tolerance, 300 s scale-down window,
    scale-up by max(4 pods, 100%) per 15 s, scale-down by 100% per 15 s."""

    max_replicas: int
    min_replicas: int = 1
    sync_s: float = 15.0
    tolerance: float = 0.1
    down_window_s: float = 300.0
    up_pods: int = 4
    up_percent: float = 100.0
    up_period_s: float = 15.0
    down_percent: float = 100.0
    down_period_s: float = 15.0
    grace_s: float = 30.0  # the pod's terminationGracePeriodSeconds
    # metrics-server reports CPU averaged over its resolution window (15 s by default).
    metric_window_s: float = 15.0


class HpaCore:
    """The replica arithmetic of the HPA controller, for one target.

    ``metric`` is either ``("utilization", target)`` (a resource metric: average in-flight
    over capacity of the ready pods) or ``("average", target)`` (an external metric such as
    a queue length, with an ``AverageValue`` target).
    """

    def __init__(self, settings: HpaSettings, *, metric: tuple[str, float]) -> None:
        self.settings = settings
        self.metric = metric
        self.recommendations: deque[tuple[float, int]] = deque()
        self.events: deque[tuple[float, int]] = deque()
        self.in_flight_samples: deque[tuple[float, int]] = deque()

    def sample(self, pool: Pool, now_s: float) -> None:
        """Once a second: what a resource metrics pipeline would average."""
        self.in_flight_samples.append((now_s, pool.in_flight))
        while self.in_flight_samples[0][0] <= now_s - self.settings.metric_window_s:
            self.in_flight_samples.popleft()

    def _in_flight(self, pool: Pool) -> float:
        if not self.in_flight_samples:
            return float(pool.in_flight)
        return sum(v for _, v in self.in_flight_samples) / len(self.in_flight_samples)

    def reset(self) -> None:
        self.recommendations.clear()
        self.events.clear()

    def _proposal(self, pool: Pool, current: int) -> int:
        tolerance = self.settings.tolerance
        kind, target = self.metric
        if kind == "average":
            usage = len(pool.queue) + pool.in_flight
            if current > 0 and abs(usage / (target * current) - 1.0) <= tolerance:
                return current
            return _ceil(usage / target)

        # Resource metric: only ready pods report; while scaling up, pods that are not
        # ready yet count as using nothing (the HPA's unready-pod rule).
        ready = pool.count("ready")
        if ready == 0:
            return current
        in_flight = self._in_flight(pool)
        capacity = ready * pool.concurrency
        ratio = in_flight / capacity / target
        if abs(ratio - 1.0) <= tolerance:
            return current
        unready = len(pool.active()) - ready
        if ratio > 1.0 and unready > 0:
            ratio = in_flight / ((ready + unready) * pool.concurrency) / target
            if ratio <= 1.0 or abs(ratio - 1.0) <= tolerance:
                return current
            return _ceil(ratio * (ready + unready))
        return _ceil(ratio * ready)

    def desired(self, pool: Pool, now_s: float, *, current: int) -> int:
        s = self.settings
        proposal = self._proposal(pool, current)

        # Scale-down stabilization: the highest recommendation of the last window.
        self.recommendations.append((now_s, proposal))
        while self.recommendations and self.recommendations[0][0] <= now_s - s.down_window_s:
            self.recommendations.popleft()
        down_limit = max(value for _, value in self.recommendations)
        stabilized = min(max(current, proposal), down_limit)

        # Rate limits measured from the replicas at the start of the period.
        while self.events and self.events[0][0] <= now_s - max(s.up_period_s, s.down_period_s):
            self.events.popleft()
        added = sum(d for t, d in self.events if d > 0 and t > now_s - s.up_period_s)
        removed = -sum(d for t, d in self.events if d < 0 and t > now_s - s.down_period_s)
        if stabilized > current:
            start = current - added
            upper = max(start + s.up_pods, math.ceil(start * (1 + s.up_percent / 100)))
            stabilized = min(stabilized, upper)
        elif stabilized < current:
            start = current + removed
            lower = math.ceil(start * (1 - s.down_percent / 100))
            stabilized = max(stabilized, lower)
        desired = min(max(stabilized, s.min_replicas), s.max_replicas)
        if desired != current:
            self.events.append((now_s, desired - current))
        return desired


class Hpa:
    """A Deployment under an HPA on in-flight utilization (as CPU would be)."""

    name = "hpa"

    def __init__(self, settings: HpaSettings, *, utilization: float) -> None:
        self.settings = settings
        self.core = HpaCore(settings, metric=("utilization", utilization))
        self.next_sync_s = 0.0

    def start(self, pool: Pool) -> None:
        for _ in range(self.settings.min_replicas):
            pool.start_worker(0.0, ready=True)
        pool.set_desired(self.settings.min_replicas)

    def tick(self, pool: Pool, now_s: float) -> float | None:
        self.core.sample(pool, now_s)
        if now_s >= self.next_sync_s - _EPSILON:
            self.next_sync_s = now_s + self.settings.sync_s
            desired = self.core.desired(pool, now_s, current=pool.desired or 0)
            pool.set_desired(desired)
            k8s_resize(pool, desired, now_s, grace_s=self.settings.grace_s)
        return now_s + 1.0

    def on_arrival(self, pool: Pool, now_s: float) -> None:
        return None


@dataclass(frozen=True)
class KedaSettings:
    """ScaledObject defaults: 30 s polling, 300 s cooldown, min 0; then an HPA."""

    polling_s: float = 30.0
    cooldown_s: float = 300.0
    activation_threshold: float = 0.0


class Keda:
    """A ScaledObject on the queue length (queued + in flight, averaged per replica)."""

    name = "keda"

    def __init__(
        self, settings: KedaSettings, hpa: HpaSettings, *, target_per_replica: float
    ) -> None:
        self.settings = settings
        self.hpa_settings = hpa
        self.core = HpaCore(hpa, metric=("average", target_per_replica))
        self.last_active_s: float | None = None
        self.next_poll_s = 0.0

    def start(self, pool: Pool) -> None:
        pool.set_desired(0)

    def tick(self, pool: Pool, now_s: float) -> float | None:
        current = pool.desired or 0
        backlog = len(pool.queue) + pool.in_flight

        # The operator's own loop: activation (0 -> 1) and the cooldown back to zero.
        if now_s >= self.next_poll_s - _EPSILON:
            self.next_poll_s = now_s + self.settings.polling_s
            if backlog > self.settings.activation_threshold:
                self.last_active_s = now_s
                if current == 0:
                    current = max(1, self.hpa_settings.min_replicas)
                    self.core.reset()
            elif current > 0 and self.last_active_s is not None:
                if now_s - self.last_active_s >= self.settings.cooldown_s:
                    current = 0

        # The HPA it owns runs on its own 15 s sync while the target is active.
        if current > 0:
            current = self.core.desired(pool, now_s, current=current)
        pool.set_desired(current)
        k8s_resize(pool, current, now_s, grace_s=self.hpa_settings.grace_s)
        return now_s + min(self.hpa_settings.sync_s, self.settings.polling_s)

    def on_arrival(self, pool: Pool, now_s: float) -> None:
        return None


@dataclass(frozen=True)
class KpaSettings:
    """Knative Serving defaults: 60 s stable and 6 s panic windows, panic at 200%, 70%
    target utilization of the container concurrency, 2 s tick, scale-up rate 1000x,
    scale-down rate 2x, scale to zero, and the revision's 300 s timeout as grace."""

    max_replicas: int
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    utilization: float = 0.7
    tick_s: float = 2.0
    max_up_rate: float = 1000.0
    max_down_rate: float = 2.0
    grace_s: float = 300.0


class Kpa:
    """The Knative Pod Autoscaler; requests held by the activator count as concurrency."""

    name = "kpa"

    def __init__(self, settings: KpaSettings) -> None:
        self.settings = settings
        self.samples: deque[tuple[float, int]] = deque()
        self.panic_since_s: float | None = None
        self.max_panic_pods = 0
        self.next_tick_s = 0.0

    def start(self, pool: Pool) -> None:
        pool.set_desired(0)

    def _average(self, now_s: float, window_s: float) -> float:
        values = [v for t, v in self.samples if t > now_s - window_s]
        return sum(values) / len(values) if values else 0.0

    def _decide(self, pool: Pool, now_s: float) -> int:
        s = self.settings
        target = pool.concurrency * s.utilization
        current = pool.desired or 0
        ready = max(1, pool.count("ready"))
        stable = _ceil(self._average(now_s, s.stable_window_s) / target)
        panic = _ceil(self._average(now_s, s.panic_window_s) / target)

        if panic / ready >= s.panic_threshold:
            self.panic_since_s = now_s
        elif self.panic_since_s is not None and now_s > self.panic_since_s + s.stable_window_s:
            self.panic_since_s = None
            self.max_panic_pods = 0
        desired = stable
        if self.panic_since_s is not None:
            self.max_panic_pods = max(self.max_panic_pods, panic)
            desired = max(self.max_panic_pods, current)

        upper = math.ceil(s.max_up_rate * ready)
        lower = math.floor(ready / s.max_down_rate)
        desired = min(max(desired, lower), upper)
        return min(desired, s.max_replicas)

    def tick(self, pool: Pool, now_s: float) -> float | None:
        # The autoscaler scrapes every second and decides every tick_s.
        self.samples.append((now_s, len(pool.queue) + pool.in_flight))
        while self.samples and self.samples[0][0] <= now_s - self.settings.stable_window_s:
            self.samples.popleft()
        if now_s >= self.next_tick_s - _EPSILON:
            self.next_tick_s = now_s + self.settings.tick_s
            self._apply(pool, now_s, self._decide(pool, now_s))
        return now_s + 1.0

    def _apply(self, pool: Pool, now_s: float, desired: int) -> None:
        pool.set_desired(desired)
        k8s_resize(pool, desired, now_s, grace_s=self.settings.grace_s)

    def on_arrival(self, pool: Pool, now_s: float) -> None:
        # The activator holds the request and pokes the autoscaler to scale from zero.
        if (pool.desired or 0) == 0:
            self.samples.append((now_s, len(pool.queue) + pool.in_flight))
            self._apply(pool, now_s, max(1, self._decide(pool, now_s)))


class Static:
    """A pool fixed at max, ready from the start: the cost ceiling and the wait floor."""

    name = "static"

    def __init__(self, *, replicas: int) -> None:
        self.replicas = replicas

    def start(self, pool: Pool) -> None:
        for _ in range(self.replicas):
            pool.start_worker(0.0, ready=True)
        pool.set_desired(self.replicas)

    def tick(self, pool: Pool, now_s: float) -> float | None:
        return None

    def on_arrival(self, pool: Pool, now_s: float) -> None:
        return None
