"""The simulator (``hack/simulate.py``): short runs, JSON shape and invariants.

Each run takes well under a second of CPU; the benchmark table itself is made by the
command in ``docs/autoscaling.md``, not here.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HACK_DIR = ROOT / "hack"
TRACES = ROOT.parent / "shared" / "traces"
if str(HACK_DIR) not in sys.path:
    sys.path.insert(0, str(HACK_DIR))

import baselines  # noqa: E402
import simcore  # noqa: E402
import simulate  # noqa: E402

POLICY_FIELDS = {
    "worker_seconds",
    "p50_wait_s",
    "p95_wait_s",
    "p99_wait_s",
    "scaling_actions",
    "max_replicas",
}


def small_setup(*, end_s: float, max_replicas: int = 8) -> simulate.Setup:
    return simulate.Setup(
        concurrency=1,
        max_replicas=max_replicas,
        startup_s=2.0,
        spawn_call_s=0.5,
        utilization=0.7,
        end_s=end_s,
    )


def run_pattern(pattern: str, *, seed: int = 3) -> dict[str, dict[str, Any]]:
    rng = random.Random(seed)
    arrivals = simulate.pattern_arrivals(pattern, rate=2.0, duration_s=240.0, rng=rng)
    services = simulate.service_times(len(arrivals), mean_s=1.0, dist="lognormal", rng=rng)
    results, _ = simulate.simulate(
        arrivals=arrivals,
        services=services,
        setup=small_setup(end_s=240.0),
        manifest_text=simulate.BENCHMARK_MANIFEST,
    )
    return results


@pytest.mark.parametrize("pattern", ["step", "spike", "sine"])
def test_simulate_serves_every_task_under_every_policy(pattern: str) -> None:
    results = run_pattern(pattern)

    assert set(results) == {"shoal", "hpa", "keda", "kpa", "static"}
    for name, figures in results.items():
        assert figures["tasks"] > 0
        assert figures["completed"] == figures["tasks"], name
        assert 0 <= figures["p50_wait_s"] <= figures["p95_wait_s"] <= figures["p99_wait_s"]
        assert 0 < figures["max_replicas"] <= 8, name


@pytest.mark.parametrize("pattern", ["step", "spike", "sine"])
def test_simulate_static_pool_costs_most_and_never_scales(pattern: str) -> None:
    results = run_pattern(pattern)

    static = results["static"]
    assert static["scaling_actions"] == 0
    assert static["max_replicas"] == 8
    for name in ("shoal", "hpa", "keda", "kpa"):
        assert static["worker_seconds"] >= results[name]["worker_seconds"], name
        assert static["p95_wait_s"] <= results[name]["p95_wait_s"] + 1e-9, name


def test_simulate_is_reproducible_with_a_seed() -> None:
    assert run_pattern("spike", seed=5) == run_pattern("spike", seed=5)


def test_simulate_json_has_the_documented_shape(tmp_path: Path) -> None:
    trace = tmp_path / "tiny.csv"
    trace.write_text(
        "minute,invocations\n" + "".join(f"{m},{(m % 5) * 20}\n" for m in range(1, 31))
    )
    completed = subprocess.run(
        [
            sys.executable,
            str(HACK_DIR / "simulate.py"),
            "--trace",
            str(trace),
            "--compress",
            "10",
            "--max",
            "6",
            "--warmup-s",
            "30",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    report = json.loads(completed.stdout)
    assert set(report["policies"]) == {"shoal", "hpa", "keda", "kpa", "static"}
    for figures in report["policies"].values():
        assert POLICY_FIELDS <= set(figures)
    assert report["load"]["warmup_s"] == 30.0
    assert report["load"]["tasks"] == report["policies"]["static"]["tasks"]
    assert {"cheapest_anchor", "worker_seconds_ratio", "met"} <= set(report["verdict"])


def test_simulate_replays_a_real_trace_window() -> None:
    if not TRACES.is_dir():
        # CI always has shared/ beside the checkout; elsewhere it may be missing.
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but the shared traces are missing at {TRACES}")
        pytest.skip("the shared traces are not beside the repo")
    counts = simulate.read_trace(TRACES / "azure2019-bursty.csv", first_minute=543, last_minute=554)

    assert len(counts) == 12
    assert max(counts) == 6172


def test_pool_drains_busy_worker_before_stopping_it() -> None:
    """A draining worker finishes its task; only then does its life (and cost) end."""
    pool = simcore.Pool(concurrency=1, startup_s=1.0)
    worker = pool.start_worker(0.0, ready=True)
    task = simcore.Task(arrived_s=0.0, service_s=5.0)

    class Once:
        name = "once"

        def tick(self, pool: simcore.Pool, now_s: float) -> float | None:
            pool.drain(worker, now_s, timeout_s=60.0)
            return None

        def on_arrival(self, pool: simcore.Pool, now_s: float) -> None:
            return None

    end_s = pool.run(Once(), tasks=[task], first_tick_s=1.0, end_s=1.0)

    assert pool.completed == 1
    assert pool.figures.killed_tasks == 0
    assert worker.stopped_s == pytest.approx(5.0)
    assert pool.worker_seconds(end_s) == pytest.approx(5.0)


def test_k8s_resize_kills_a_busy_pod_after_its_grace_period() -> None:
    """Kubernetes cannot pick an idle pod: the newest goes, busy or not."""
    pool = simcore.Pool(concurrency=1, startup_s=1.0)
    busy = pool.start_worker(0.0, ready=True)  # first in line: it gets the task
    older = pool.start_worker(0.0, ready=True)
    older.ready_s = -10.0  # so the busy one is the newest ready pod
    long_task = simcore.Task(arrived_s=0.0, service_s=100.0)

    class ShrinkOnce:
        name = "shrink"

        def tick(self, pool: simcore.Pool, now_s: float) -> float | None:
            simcore.k8s_resize(pool, 1, now_s, grace_s=30.0)
            return None

        def on_arrival(self, pool: simcore.Pool, now_s: float) -> None:
            return None

    pool.run(ShrinkOnce(), tasks=[long_task], first_tick_s=1.0, end_s=1.0)

    assert busy.stopped_s == pytest.approx(31.0)
    assert pool.figures.killed_tasks == 1
    assert long_task.retries == 1
    assert pool.completed == 1
    assert older.stopped_s is None


def test_hpa_core_follows_the_documented_formula() -> None:
    """desired = ceil(current x metric / target), within the 10% tolerance keep current."""
    settings = baselines.HpaSettings(max_replicas=50)
    core = baselines.HpaCore(settings, metric=("average", 2.0))
    pool = simcore.Pool(concurrency=1, startup_s=1.0)
    pool.queue.extend(simcore.Task(arrived_s=0.0, service_s=1.0) for _ in range(30))

    assert core.desired(pool, 0.0, current=5) == 10  # 30/2 = 15, but +max(4, 100%) per 15 s
    assert core.desired(pool, 15.1, current=10) == 15
    pool.queue.extend(simcore.Task(arrived_s=0.0, service_s=1.0) for _ in range(2))
    assert core.desired(pool, 30.2, current=15) == 15  # 32 / (2 x 15) within tolerance
