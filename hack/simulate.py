#!/usr/bin/env python3
"""Replays a load through Shoal's autoscaler and the anchors', on a virtual clock.

Usage (see ``docs/autoscaling.md`` for the benchmark table and the command behind it):

    python hack/simulate.py --trace ../shared/traces/azure2019-ramp.csv --compress 60 --json
    python hack/simulate.py --pattern spike --duration-s 600 --rate 5 --png spike.png
    python hack/simulate.py --table ../shared/traces      # every trace, as a Markdown table

Shoal runs through ``controller.autoscaler.decide`` itself (the very code the reconciler
calls) with a policy from a ``WorkerPool`` manifest; the spawn pacing and the idle-first
scale-in of the reconciler are modelled here. The anchors live in ``hack/baselines.py`` and
the pool mechanics in ``hack/simcore.py``. Every policy sees the same arrivals and the same
service time per task. Windows, start-up time and intervals stay in real seconds whatever
``--compress`` is: only the trace's clock is compressed, for every policy alike.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from baselines import Hpa, HpaSettings, Keda, KedaSettings, Kpa, KpaSettings, Static
from simcore import Pool, Task, Worker, percentile

from controller.autoscaler import History, PoolMetrics, decide
from controller.policy import PoolSpec, parse_pools

# The manifest Shoal runs with in the benchmark; ``replicas.max`` and ``concurrency`` are
# set from --max and --concurrency so that every policy has the same bounds.
BENCHMARK_MANIFEST = """\
apiVersion: shoal/v1
kind: WorkerPool
metadata:
  name: bench
spec:
  replicas: {min: 0, max: 40}
  scaling:
    evaluationInterval: 1s
    targets: {backlogPerReplica: 1, tolerance: 0.2}
    scaleUp: {stabilizationWindow: 0s, maxStep: 4, period: 15s}
    scaleDown: {stabilizationWindow: 30s, period: 15s}
    spawn: {maxInFlight: 16, minInterval: 0s}
    scaleToZero: {after: 30s}
    panic: {enabled: true, window: 6s, threshold: 2}
    predictive: {enabled: true, horizon: auto}
"""

POLICY_NAMES = ("shoal", "hpa", "keda", "kpa", "static")


# -- the load ------------------------------------------------------------------------


def read_trace(path: Path, *, first_minute: int = 1, last_minute: int = 1440) -> list[int]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = [(int(row["minute"]), int(row["invocations"])) for row in csv.DictReader(handle)]
    return [n for minute, n in rows if first_minute <= minute <= last_minute]


def trace_arrivals(
    counts: list[int], *, minute_s: float, scale: float, rng: random.Random
) -> list[float]:
    """Each minute's count (scaled with stochastic rounding) spread uniformly at random."""
    times: list[float] = []
    for index, count in enumerate(counts):
        scaled = count * scale
        n = int(scaled) + (1 if rng.random() < scaled - int(scaled) else 0)
        start = index * minute_s
        times.extend(sorted(start + rng.random() * minute_s for _ in range(n)))
    return times


def pattern_rate(pattern: str, t_s: float, *, rate: float, duration_s: float) -> float:
    """Arrivals per second of a synthetic load at ``t_s``."""
    if pattern == "step":
        return rate * (4.0 if duration_s / 3 <= t_s < 2 * duration_s / 3 else 1.0)
    if pattern == "spike":
        period_s = duration_s / 4
        return rate * (10.0 if (t_s % period_s) < 0.05 * period_s else 1.0)
    if pattern == "sine":
        return rate * (1.0 + 0.9 * math.sin(2 * math.pi * t_s / (duration_s / 2)))
    raise ValueError(f"unknown pattern {pattern!r}")


def pattern_arrivals(
    pattern: str, *, rate: float, duration_s: float, rng: random.Random
) -> list[float]:
    """A non-homogeneous Poisson process, by thinning."""
    peak = rate * 10.0
    times, t_s = [], 0.0
    while True:
        t_s += rng.expovariate(peak)
        if t_s >= duration_s:
            return times
        if rng.random() * peak < pattern_rate(pattern, t_s, rate=rate, duration_s=duration_s):
            times.append(t_s)


def service_times(n: int, *, mean_s: float, dist: str, rng: random.Random) -> list[float]:
    if dist == "fixed":
        return [mean_s] * n
    if dist == "exp":
        return [rng.expovariate(1.0 / mean_s) for _ in range(n)]
    sigma = 0.5
    mu = math.log(mean_s) - sigma * sigma / 2
    return [rng.lognormvariate(mu, sigma) for _ in range(n)]


# -- Shoal, as the reconciler drives it ----------------------------------------------


class ShoalController:
    """``decide`` every evaluation interval, plus the reconciler's plan in miniature.

    Spawns: at most one per pass, at most ``spawn.maxInFlight`` ``docker run`` calls at
    once (each takes ``spawn_call_s``), at least ``spawn.minInterval`` apart. Scale-in:
    idle before busy, starting before ready, newest first; a busy victim drains.
    """

    name = "shoal"

    def __init__(self, spec: PoolSpec, *, spawn_call_s: float) -> None:
        self.spec = spec
        self.spawn_call_s = spawn_call_s
        self.history = History.empty()
        self.last_spawn_s = -math.inf
        self.calls: deque[float] = deque()
        self.panic_s = 0.0
        self._last_pass_s: float | None = None

    def start(self, pool: Pool) -> None:
        for _ in range(self.spec.replicas.min):
            pool.start_worker(0.0, ready=True)
        pool.set_desired(self.spec.replicas.min)

    def tick(self, pool: Pool, now_s: float) -> float | None:
        wants_spawn = self._pass(pool, now_s)
        next_s = now_s + self.spec.scaling.evaluation_interval
        if wants_spawn:
            spawn = self.spec.scaling.spawn
            earliest = max(self.last_spawn_s + spawn.min_interval, now_s + 0.05)
            if len(self.calls) >= spawn.max_in_flight:
                earliest = max(earliest, self.calls[0])
            next_s = min(next_s, earliest)
        return next_s

    def on_arrival(self, pool: Pool, now_s: float) -> None:
        # The reconciler is woken by an enqueue into an empty pool.
        if not pool.active():
            self._pass(pool, now_s)

    def _pass(self, pool: Pool, now_s: float) -> bool:
        while self.calls and self.calls[0] <= now_s:
            self.calls.popleft()
        metrics = PoolMetrics(
            now_s=now_s,
            queued=len(pool.queue),
            in_flight=pool.in_flight,
            ready=pool.count("ready"),
            starting=pool.count("starting"),
            draining=pool.count("draining"),
            concurrency=pool.concurrency,
            arrivals_total=pool.arrivals_total,
            service_time_s=pool.service_mean_s,
            startup_s=pool.startup_s if pool.service_mean_s is not None else None,
        )
        decision = decide(self.spec, metrics, self.history)
        self.history = decision.history
        if decision.panic and self._last_pass_s is not None:
            self.panic_s += now_s - self._last_pass_s
        self._last_pass_s = now_s
        pool.set_desired(decision.desired)

        active = pool.active()
        if decision.desired < len(active):
            for worker in sorted(active, key=_victim_order)[: len(active) - decision.desired]:
                pool.drain(worker, now_s, timeout_s=self.spec.scaling.scale_down.drain_timeout)
            return False
        if decision.desired > len(active):
            spawn = self.spec.scaling.spawn
            if (
                len(self.calls) < spawn.max_in_flight
                and now_s - self.last_spawn_s >= spawn.min_interval
            ):
                pool.start_worker(now_s)
                self.last_spawn_s = now_s
                self.calls.append(now_s + self.spawn_call_s)
            return decision.desired > len(pool.active())
        return False


def _victim_order(worker: Worker) -> tuple[bool, bool, float]:
    return (bool(worker.running), worker.state == "ready", -worker.created_s)


# -- one run -------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    concurrency: int
    max_replicas: int
    startup_s: float
    spawn_call_s: float
    utilization: float
    end_s: float
    measure_from_s: float = 0.0


def shoal_spec(manifest_text: str, *, setup: Setup) -> PoolSpec:
    (pool,) = parse_pools(manifest_text, source="benchmark manifest")
    data = pool.spec.model_dump(by_alias=True)
    data["replicas"]["max"] = setup.max_replicas
    data["replicas"]["min"] = min(data["replicas"]["min"], setup.max_replicas)
    data["template"]["concurrency"] = setup.concurrency
    return PoolSpec.model_validate(data)


def make_controllers(spec: PoolSpec, setup: Setup) -> dict[str, Any]:
    hpa = HpaSettings(max_replicas=setup.max_replicas)
    # KEDA gets the same per-replica backlog target as Shoal, so only the machinery differs.
    per_replica = spec.scaling.targets.backlog_per_replica or 1.0
    return {
        "shoal": ShoalController(spec, spawn_call_s=setup.spawn_call_s),
        "hpa": Hpa(hpa, utilization=setup.utilization),
        "keda": Keda(KedaSettings(), hpa, target_per_replica=per_replica),
        "kpa": Kpa(KpaSettings(max_replicas=setup.max_replicas, utilization=setup.utilization)),
        "static": Static(replicas=setup.max_replicas),
    }


def run_policy(
    controller: Any, *, arrivals: list[float], services: list[float], setup: Setup
) -> tuple[dict[str, Any], Pool]:
    pool = Pool(
        concurrency=setup.concurrency,
        startup_s=setup.startup_s,
        measure_from_s=setup.measure_from_s,
    )
    controller.start(pool)
    tasks = [Task(arrived_s=a, service_s=s) for a, s in zip(arrivals, services, strict=True)]
    end_s = pool.run(controller, tasks=tasks, first_tick_s=0.0, end_s=setup.end_s)
    waits = sorted(task.wait_s for task in tasks if task.arrived_s >= setup.measure_from_s)
    worker_s = pool.worker_seconds(end_s)
    figures = pool.figures
    result = {
        "tasks": len(waits),
        "completed": pool.completed,
        "worker_seconds": round(worker_s, 1),
        "p50_wait_s": round(percentile(waits, 0.50), 3),
        "p95_wait_s": round(percentile(waits, 0.95), 3),
        "p99_wait_s": round(percentile(waits, 0.99), 3),
        "mean_wait_s": round(sum(waits) / len(waits), 3) if waits else 0.0,
        "scaling_actions": figures.scaling_actions,
        "scale_ups": figures.scale_ups,
        "max_replicas": figures.max_replicas,
        "killed_tasks": figures.killed_tasks,
        "end_s": round(end_s, 1),
    }
    if isinstance(controller, ShoalController):
        result["panic_s"] = round(controller.panic_s, 1)
    return result, pool


def simulate(
    *,
    arrivals: list[float],
    services: list[float],
    setup: Setup,
    manifest_text: str,
    policies: tuple[str, ...] = POLICY_NAMES,
) -> tuple[dict[str, dict[str, Any]], dict[str, Pool]]:
    spec = shoal_spec(manifest_text, setup=setup)
    controllers = make_controllers(spec, setup)
    results, pools = {}, {}
    for name in policies:
        results[name], pools[name] = run_policy(
            controllers[name], arrivals=arrivals, services=services, setup=setup
        )
    return results, pools


# -- verdict, output -----------------------------------------------------------------


def verdict(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Issue 3's target: <= 0.8 x the worker-seconds of the cheapest anchor, at a p95 wait
    no worse than that anchor's, and fewer scaling actions than HPA."""
    anchors = [name for name in ("hpa", "keda", "kpa") if name in results]
    if "shoal" not in results or not anchors:
        return {}
    shoal = results["shoal"]
    best = min(anchors, key=lambda name: results[name]["worker_seconds"])
    ratio = shoal["worker_seconds"] / max(results[best]["worker_seconds"], 1e-9)
    out: dict[str, Any] = {
        "cheapest_anchor": best,
        "worker_seconds_ratio": round(ratio, 3),
        "cost_ok": ratio <= 0.8,
        "p95_ok": shoal["p95_wait_s"] <= results[best]["p95_wait_s"],
        "p95_ok_vs_every_anchor": all(
            shoal["p95_wait_s"] <= results[name]["p95_wait_s"] for name in anchors
        ),
    }
    if "hpa" in results:
        out["actions_ok"] = shoal["scaling_actions"] < results["hpa"]["scaling_actions"]
    out["met"] = bool(out["cost_ok"] and out["p95_ok"] and out.get("actions_ok", True))
    return out


def text_report(results: dict[str, dict[str, Any]]) -> str:
    columns = [
        "worker_seconds",
        "p50_wait_s",
        "p95_wait_s",
        "p99_wait_s",
        "scaling_actions",
        "max_replicas",
        "killed_tasks",
    ]
    lines = [f"{'policy':8} " + " ".join(f"{c:>15}" for c in columns)]
    for name, figures in results.items():
        lines.append(f"{name:8} " + " ".join(f"{figures[c]:>15}" for c in columns))
    return "\n".join(lines)


def draw_png(pools: dict[str, Pool], path: Path) -> bool:
    """Replicas and backlog over time, one panel per policy; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(pools), 1, sharex=True, figsize=(10, 2.2 * len(pools)))
    for axis, (name, pool) in zip(list(getattr(axes, "flat", [axes])), pools.items(), strict=False):
        times = [t for t, _, _ in pool.figures.series]
        axis.step(times, [r for _, r, _ in pool.figures.series], where="post", label="replicas")
        axis.plot(times, [q for _, _, q in pool.figures.series], alpha=0.6, label="queued")
        axis.set_ylabel(name)
        axis.legend(loc="upper right", fontsize="small")
    axes_list = list(getattr(axes, "flat", [axes]))
    axes_list[-1].set_xlabel("virtual seconds")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# -- command line --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--trace", type=Path, help="a minute,invocations CSV")
    load.add_argument("--pattern", choices=["step", "spike", "sine"])
    load.add_argument("--table", type=Path, help="a folder of traces: print a Markdown table")
    parser.add_argument("--minutes", default="1-1440", help="trace minutes to replay, A-B")
    parser.add_argument(
        "--warmup-s", type=float, default=600.0, help="replay the trace's end first, unmeasured"
    )
    parser.add_argument("--compress", type=float, default=60.0, help="trace minute = 60/N s")
    parser.add_argument(
        "--scale",
        default="auto",
        help="multiply the trace's counts; 'auto' puts the peak minute at 80%% of max",
    )
    parser.add_argument("--rate", type=float, default=4.0, help="pattern base rate per s")
    parser.add_argument("--duration-s", type=float, default=600.0, help="pattern length")
    parser.add_argument("--startup-s", type=float, default=2.0)
    parser.add_argument("--service-s", type=float, default=1.0, help="mean service time")
    parser.add_argument(
        "--service-dist", choices=["lognormal", "exp", "fixed"], default="lognormal"
    )
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--max", type=int, default=40, dest="max_replicas")
    parser.add_argument("--utilization", type=float, default=0.7, help="HPA and KPA target")
    parser.add_argument("--spawn-call-s", type=float, default=0.5, help="one docker run call")
    parser.add_argument("--manifest", type=Path, help="Shoal's WorkerPool (default: built in)")
    parser.add_argument("--policies", default=",".join(POLICY_NAMES))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--png", type=Path)
    return parser


def load_for(
    args: argparse.Namespace, trace: Path | None
) -> tuple[list[float], float, float, float]:
    """Arrival times, the scale used, the nominal end of the load and where figures start.

    A trace is preceded by its own last minutes, ``--warmup-s`` of replay (the day wraps
    round), so that every policy meets minute 1 as it would after the evening before.
    """
    rng = random.Random(args.seed)
    if trace is None:
        pattern = args.pattern or "step"
        arrivals = pattern_arrivals(pattern, rate=args.rate, duration_s=args.duration_s, rng=rng)
        return arrivals, 1.0, args.duration_s, 0.0
    first, _, last = args.minutes.partition("-")
    counts = read_trace(trace, first_minute=int(first), last_minute=int(last or first))
    minute_s = 60.0 / args.compress
    warmup_minutes = min(1440, math.ceil(args.warmup_s / minute_s))
    warmup = read_trace(trace)[-warmup_minutes:] if warmup_minutes > 0 else []
    if args.scale == "auto":
        peak_per_s = max(max(counts), 1) / minute_s
        slots = 0.8 * args.max_replicas * args.concurrency
        scale = min(1.0, slots / (peak_per_s * args.service_s))
    else:
        scale = float(args.scale)
    arrivals = trace_arrivals(warmup + counts, minute_s=minute_s, scale=scale, rng=rng)
    measure_from_s = len(warmup) * minute_s
    return arrivals, scale, measure_from_s + len(counts) * minute_s, measure_from_s


def run_one(args: argparse.Namespace, trace: Path | None) -> dict[str, Any]:
    arrivals, scale, end_s, measure_from_s = load_for(args, trace)
    services = service_times(
        len(arrivals),
        mean_s=args.service_s,
        dist=args.service_dist,
        rng=random.Random(args.seed + 1),
    )
    setup = Setup(
        concurrency=args.concurrency,
        max_replicas=args.max_replicas,
        startup_s=args.startup_s,
        spawn_call_s=args.spawn_call_s,
        utilization=args.utilization,
        end_s=end_s,
        measure_from_s=measure_from_s,
    )
    manifest = args.manifest.read_text(encoding="utf-8") if args.manifest else BENCHMARK_MANIFEST
    policies = tuple(p for p in args.policies.split(",") if p)
    results, pools = simulate(
        arrivals=arrivals,
        services=services,
        setup=setup,
        manifest_text=manifest,
        policies=policies,
    )
    report: dict[str, Any] = {
        "load": {
            "trace": str(trace) if trace else None,
            "pattern": None if trace else (args.pattern or "step"),
            "compress": args.compress,
            "scale": round(scale, 6),
            "tasks": sum(1 for t in arrivals if t >= measure_from_s),
            "warmup_s": measure_from_s,
            "duration_s": end_s - measure_from_s,
        },
        "policies": results,
        "verdict": verdict(results),
    }
    if args.png and not draw_png(pools, args.png):
        print("matplotlib is not installed: no PNG drawn", file=sys.stderr)
    return report


def markdown_table(reports: list[dict[str, Any]]) -> str:
    lines = [
        "| trace | tasks | policy | worker-s | p50 wait s | p95 wait s | p99 wait s "
        "| actions (ups) | max replicas |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for report in reports:
        name = Path(report["load"]["trace"]).stem.removeprefix("azure2019-")
        for policy, f in report["policies"].items():
            lines.append(
                f"| {name} | {report['load']['tasks']} | {policy} | {f['worker_seconds']:.0f} "
                f"| {f['p50_wait_s']:.2f} | {f['p95_wait_s']:.2f} | {f['p99_wait_s']:.2f} "
                f"| {f['scaling_actions']} ({f['scale_ups']}) | {f['max_replicas']} |"
            )
    lines += [
        "",
        "| trace | cheapest anchor | shoal / it, worker-s | p95 no worse | "
        "p95 no worse than every anchor | fewer actions than HPA | target met |",
        "|---|---|---:|---|---|---|---|",
    ]
    for report in reports:
        name = Path(report["load"]["trace"]).stem.removeprefix("azure2019-")
        v = report["verdict"]
        lines.append(
            f"| {name} | {v['cheapest_anchor']} | {v['worker_seconds_ratio']:.2f} "
            f"| {_yes(v['p95_ok'])} | {_yes(v['p95_ok_vs_every_anchor'])} "
            f"| {_yes(v.get('actions_ok', True))} | {_yes(v['met'])} |"
        )
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table is not None:
        traces = sorted(p for p in args.table.glob("*.csv") if p.name != "index.csv")
        reports = [run_one(args, trace) for trace in traces]
        if args.json:
            print(json.dumps({"reports": reports}, indent=2))
        else:
            print(markdown_table(reports))
        return 0 if all(r["verdict"].get("met") for r in reports) else 1
    report = run_one(args, args.trace)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        load = report["load"]
        print(f"load: {load}")
        print(text_report(report["policies"]))
        print(f"verdict: {report['verdict']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
