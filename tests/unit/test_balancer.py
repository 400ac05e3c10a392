"""Backend choice and pool routing: pure tables, no sockets."""

from __future__ import annotations

import collections
import random

import pytest

from api.balancer import (
    Backend,
    LeastConnections,
    PowerOfTwo,
    RoundRobin,
    make_strategy,
    route_of,
)


def backends(n: int, pool: str = "default") -> list[Backend]:
    return [
        Backend(worker_id=f"w{i}", name=f"worker-{i}", pool=pool, host="127.0.0.1", port=9000 + i)
        for i in range(n)
    ]


def test_least_connections_picks_the_least_loaded_worker() -> None:
    strategy = LeastConnections()
    pool = backends(3)
    load = {"w0": 4, "w1": 1, "w2": 3}
    picks = {strategy.pick(pool, load).worker_id for _ in range(10)}  # type: ignore[union-attr]
    assert picks == {"w1"}


def test_least_connections_spreads_ties_evenly() -> None:
    strategy = LeastConnections()
    pool = backends(4)
    counts = collections.Counter(strategy.pick(pool, {}).worker_id for _ in range(400))  # type: ignore[union-attr]
    assert set(counts) == {"w0", "w1", "w2", "w3"}
    assert max(counts.values()) - min(counts.values()) <= 1


def test_least_connections_balances_as_requests_pile_up() -> None:
    """Requests that never finish end up spread one apart at most."""
    strategy = LeastConnections()
    pool = backends(3)
    load: dict[str, int] = {}
    for _ in range(30):
        chosen = strategy.pick(pool, load)
        assert chosen is not None
        load[chosen.worker_id] = load.get(chosen.worker_id, 0) + 1
    assert sorted(load.values()) == [10, 10, 10]


def test_round_robin_visits_each_worker_in_turn() -> None:
    strategy = RoundRobin()
    pool = backends(3)
    picks = [strategy.pick(pool, {"w0": 99}).worker_id for _ in range(6)]  # type: ignore[union-attr]
    assert picks == ["w0", "w1", "w2", "w0", "w1", "w2"]


def test_power_of_two_prefers_the_less_loaded_of_its_two_draws() -> None:
    strategy = PowerOfTwo(rng=random.Random(7))
    pool = backends(2)
    load = {"w0": 5, "w1": 0}
    assert all(strategy.pick(pool, load).worker_id == "w1" for _ in range(50))  # type: ignore[union-attr]


def test_power_of_two_never_picks_the_busiest_of_three() -> None:
    strategy = PowerOfTwo(rng=random.Random(1))
    pool = backends(3)
    load = {"w0": 0, "w1": 1, "w2": 9}
    counts = collections.Counter(strategy.pick(pool, load).worker_id for _ in range(300))  # type: ignore[union-attr]
    assert counts["w2"] == 0
    assert counts["w0"] > counts["w1"] > 0


@pytest.mark.parametrize(
    "name", ["least-connections", "round-robin", "power-of-two"], ids=lambda n: n
)
def test_strategy_skips_excluded_workers(name: str) -> None:
    strategy = make_strategy(name, rng=random.Random(3))
    pool = backends(3)
    picks = {
        strategy.pick(pool, {}, exclude={"w0", "w2"}).worker_id  # type: ignore[union-attr]
        for _ in range(20)
    }
    assert picks == {"w1"}


@pytest.mark.parametrize(
    "name", ["least-connections", "round-robin", "power-of-two"], ids=lambda n: n
)
def test_strategy_returns_none_when_nothing_is_left(name: str) -> None:
    strategy = make_strategy(name)
    assert strategy.pick([], {}) is None
    assert strategy.pick(backends(1), {}, exclude={"w0"}) is None


def test_make_strategy_refuses_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown balancer strategy 'random'"):
        make_strategy("random")


@pytest.mark.parametrize(
    ("path", "header", "pool", "forwarded"),
    [
        (b"/process-task", None, "default", b"/process-task"),
        (b"/pools/gpu/process-task", None, "gpu", b"/process-task"),
        (b"/pools/gpu", None, "gpu", b"/"),
        (b"/pools/gpu/", None, "gpu", b"/"),
        (b"/pools/gpu?x=1", None, "gpu", b"/?x=1"),
        (b"/pools/gpu/a/b?x=1", None, "gpu", b"/a/b?x=1"),
        (b"/healthz", b"batch", "batch", b"/healthz"),
        (b"/pools/gpu/x", b"batch", "gpu", b"/x"),
        (b"/pools//x", None, "default", b"/pools//x"),
        (b"/poolsx/y", None, "default", b"/poolsx/y"),
    ],
    ids=[
        "default",
        "prefix",
        "prefix-only",
        "prefix-slash",
        "prefix-query",
        "deep-path",
        "header",
        "prefix-wins-over-header",
        "empty-name-is-no-prefix",
        "lookalike-prefix",
    ],
)
def test_route_of_finds_pool_and_forwarded_path(
    path: bytes, header: bytes | None, pool: str, forwarded: bytes
) -> None:
    assert route_of(path, header) == (pool, forwarded)
