"""The arrival schedule of a load test run: when each task is sent, as offsets in seconds.

Owns the load patterns (constant, step, spike, sine) integrated into arrival times, the
replay of a per-minute ``minute,invocations`` trace with stochastic rounding of scaled
counts, and even or Poisson spacing, all reproducible from one seed. It sends nothing and
knows no HTTP: ``hack/loadtest.py`` parses the command line, calls ``build_schedule`` and
submits on the offsets it returns. Not part of the ``shoal`` package; scripts only.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

PATTERNS = ("constant", "step", "spike", "sine")


class UsageError(ValueError):
    """The command line asks for something this tool refuses to do."""


class ScheduleConfig(Protocol):
    """The part of the load test's configuration that shapes its schedule."""

    @property
    def tasks(self) -> int | None: ...
    @property
    def rate(self) -> float: ...
    @property
    def work_seconds(self) -> float | None: ...
    @property
    def pattern(self) -> str: ...
    @property
    def peak_rate(self) -> float | None: ...
    @property
    def change_at_s(self) -> float | None: ...
    @property
    def spike_for_s(self) -> float: ...
    @property
    def period_s(self) -> float: ...
    @property
    def trace(self) -> Path | None: ...
    @property
    def compress(self) -> float: ...
    @property
    def scale(self) -> float: ...
    @property
    def start_minute(self) -> int: ...
    @property
    def minutes(self) -> int | None: ...
    @property
    def arrival(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def max_tasks(self) -> int: ...


def rate_function(config: ScheduleConfig, *, n_tasks: int) -> Callable[[float], float]:
    """Tasks per second at a given second of the run, for ``--pattern``."""
    base = config.rate
    peak = config.peak_rate if config.peak_rate is not None else 3 * base
    # Without an explicit moment, change a third of the way through the constant-rate run.
    change_at = config.change_at_s if config.change_at_s is not None else n_tasks / base / 3
    if config.pattern == "step":
        return lambda t: base if t < change_at else peak
    if config.pattern == "spike":
        end = change_at + config.spike_for_s
        return lambda t: peak if change_at <= t < end else base
    if config.pattern == "sine":
        period = config.period_s
        return lambda t: base + (peak - base) * (1 - math.cos(2 * math.pi * t / period)) / 2
    return lambda t: base


def rate_schedule(
    rate_fn: Callable[[float], float],
    *,
    n_tasks: int,
    arrival: str,
    rng: random.Random,
    step_s: float = 0.01,
    horizon_s: float = 86_400.0,
) -> list[float]:
    """Arrival offsets (seconds) for ``n_tasks`` under a time-varying rate.

    Task i arrives when the integrated rate reaches its target: i for even spacing, or
    a running sum of unit exponentials for Poisson arrivals (time rescaling), so both
    follow the pattern exactly and are reproducible from the seed. The rate is taken as
    constant within each ``step_s``.
    """
    if arrival == "poisson":
        targets: list[float] = []
        total = 0.0
        for _ in range(n_tasks):
            total += rng.expovariate(1.0)
            targets.append(total)
    else:
        targets = [float(i) for i in range(n_tasks)]

    offsets: list[float] = []
    t, integral, index = 0.0, 0.0, 0
    while index < n_tasks and t < horizon_s:
        rate = max(rate_fn(t + step_s / 2), 0.0)
        step_end = integral + rate * step_s
        while index < n_tasks and targets[index] <= step_end:
            offsets.append(t + (targets[index] - integral) / rate if rate > 0 else t)
            index += 1
        t, integral = t + step_s, step_end
    return offsets


def read_trace(path: Path, *, start_minute: int, minutes: int | None) -> list[int]:
    """The invocation counts of a ``minute,invocations`` CSV, for the window asked."""
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or {"minute", "invocations"} - set(reader.fieldnames):
                raise UsageError(f"{path}: expected a 'minute,invocations' header")
            counts = {int(row["minute"]): int(row["invocations"]) for row in reader}
    except OSError as exc:
        raise UsageError(f"cannot read trace {path}: {exc.strerror}") from exc
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{path}: counts must be whole numbers ({exc})") from exc
    last = max(counts, default=0)
    end = last if minutes is None else min(last, start_minute + minutes - 1)
    if start_minute < 1 or start_minute > end:
        raise UsageError(f"{path}: minute window starting at {start_minute} is empty")
    return [counts.get(m, 0) for m in range(start_minute, end + 1)]


def trace_schedule(
    counts: Sequence[int],
    *,
    minute_s: float,
    scale: float,
    arrival: str,
    rng: random.Random,
) -> list[float]:
    """Arrival offsets for a per-minute trace where one trace minute lasts ``minute_s``.

    Counts are scaled with stochastic rounding, so fractions keep their expected total
    and small counts do not vanish. Within a minute, arrivals are evenly spaced or
    uniformly random (the conditional form of a Poisson process).
    """
    offsets: list[float] = []
    for index, count in enumerate(counts):
        wanted = count * scale
        n = int(wanted) + (1 if rng.random() < wanted - int(wanted) else 0)
        start = index * minute_s
        if arrival == "poisson":
            offsets.extend(sorted(start + rng.random() * minute_s for _ in range(n)))
        else:
            offsets.extend(start + (k + 0.5) * minute_s / n for k in range(n))
    return offsets


def build_schedule(config: ScheduleConfig) -> tuple[list[float], str]:
    """The run's arrival offsets and a one-line description of them."""
    rng = random.Random(config.seed)
    if config.trace is not None:
        counts = read_trace(config.trace, start_minute=config.start_minute, minutes=config.minutes)
        minute_s = 60.0 / config.compress
        offsets = trace_schedule(
            counts, minute_s=minute_s, scale=config.scale, arrival=config.arrival, rng=rng
        )
        if config.tasks is not None:
            offsets = offsets[: config.tasks]
        description = (
            f"trace {config.trace.name} minutes {config.start_minute}-"
            f"{config.start_minute + len(counts) - 1}, compress {config.compress:g} "
            f"({minute_s:g} s per minute), scale {config.scale:g}, {config.arrival} arrivals"
        )
    else:
        n_tasks = 100 if config.tasks is None else config.tasks
        if n_tasks > config.max_tasks:
            raise UsageError(f"{n_tasks} tasks exceed --max-tasks {config.max_tasks}")
        rate_fn = rate_function(config, n_tasks=n_tasks)
        offsets = rate_schedule(rate_fn, n_tasks=n_tasks, arrival=config.arrival, rng=rng)
        if len(offsets) < n_tasks:
            raise UsageError(f"{n_tasks} tasks at this rate would take longer than a day")
        description = (
            f"{n_tasks} tasks, {config.pattern} pattern at {config.rate:g}/s, "
            f"{config.arrival} arrivals"
        )
    if len(offsets) > config.max_tasks:
        raise UsageError(f"schedule of {len(offsets)} tasks exceeds --max-tasks {config.max_tasks}")
    if config.work_seconds is not None:
        description += f", work {config.work_seconds:g} s"
    return offsets, description
