"""Backend choice for the balancer: which live worker gets the next request.

It owns the ``Backend`` snapshot (one routable worker: its pool, address and
port), the three strategies (least-connections, the default; round-robin;
power-of-two-choices) and the pure helpers that turn a request's path or
header into a pool. It does no I/O and keeps no worker state beyond a
strategy's own cursor: the proxy (``api.proxy``) counts requests in flight and
passes them in, and the endpoint client (``api.endpoints``) decides which
workers are routable. That split keeps every choice here testable as a table.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

StrategyName = Literal["least-connections", "round-robin", "power-of-two"]
STRATEGIES: tuple[StrategyName, ...] = ("least-connections", "round-robin", "power-of-two")
DEFAULT_POOL = "default"
POOL_HEADER = "x-shoal-pool"
_POOL_PREFIX = b"/pools/"


@dataclass(frozen=True)
class Backend:
    """One worker that may receive requests now: ready, healthy, with a host port."""

    worker_id: str
    name: str
    pool: str
    host: str
    port: int
    # Requests the worker runs at once (its slots); more get 429 from it.
    concurrency: int = 1

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class Strategy(Protocol):
    name: StrategyName

    def pick(
        self,
        backends: Sequence[Backend],
        load: Mapping[str, int],
        *,
        exclude: Collection[str] = (),
    ) -> Backend | None:
        """Chooses one of ``backends`` not in ``exclude`` (worker ids); None if none is left.

        ``load`` maps worker ids to requests in flight; a missing id counts as 0.
        """
        ...


def _eligible(backends: Sequence[Backend], exclude: Collection[str]) -> Sequence[Backend]:
    if not exclude:
        return backends
    return [b for b in backends if b.worker_id not in exclude]


class LeastConnections:
    """Fewest requests in flight wins; ties rotate, so an idle pool still spreads its load."""

    name: StrategyName = "least-connections"

    def __init__(self) -> None:
        self._turn = 0

    def pick(
        self,
        backends: Sequence[Backend],
        load: Mapping[str, int],
        *,
        exclude: Collection[str] = (),
    ) -> Backend | None:
        candidates = _eligible(backends, exclude)
        n = len(candidates)
        if n == 0:
            return None
        if n == 1:
            return candidates[0]
        self._turn = (self._turn + 1) % n
        best = candidates[self._turn]
        best_load = load.get(best.worker_id, 0)
        # NB: scanning from the rotating start keeps the first minimum fair among equals.
        for offset in range(1, n):
            backend = candidates[(self._turn + offset) % n]
            backend_load = load.get(backend.worker_id, 0)
            if backend_load < best_load:
                best, best_load = backend, backend_load
        return best


class RoundRobin:
    """Each backend in turn, whatever its load."""

    name: StrategyName = "round-robin"

    def __init__(self) -> None:
        self._turn = -1

    def pick(
        self,
        backends: Sequence[Backend],
        load: Mapping[str, int],
        *,
        exclude: Collection[str] = (),
    ) -> Backend | None:
        candidates = _eligible(backends, exclude)
        if not candidates:
            return None
        self._turn = (self._turn + 1) % len(candidates)
        return candidates[self._turn]


class PowerOfTwo:
    """Two backends drawn at random; the less loaded one wins (Mitzenmacher's two choices)."""

    name: StrategyName = "power-of-two"

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(
        self,
        backends: Sequence[Backend],
        load: Mapping[str, int],
        *,
        exclude: Collection[str] = (),
    ) -> Backend | None:
        candidates = _eligible(backends, exclude)
        n = len(candidates)
        if n == 0:
            return None
        if n == 1:
            return candidates[0]
        first, second = self._rng.sample(range(n), 2)
        a, b = candidates[first], candidates[second]
        return b if load.get(b.worker_id, 0) < load.get(a.worker_id, 0) else a


def make_strategy(name: str, *, rng: random.Random | None = None) -> Strategy:
    """Builds a fresh strategy by its manifest name; raises ValueError for an unknown one."""
    if name == "least-connections":
        return LeastConnections()
    if name == "round-robin":
        return RoundRobin()
    if name == "power-of-two":
        return PowerOfTwo(rng=rng)
    raise ValueError(f"unknown balancer strategy {name!r}; use one of {', '.join(STRATEGIES)}")


def route_of(path: bytes, pool_header: bytes | None) -> tuple[str, bytes]:
    """The pool a request is for and the path to forward.

    ``/pools/<name>/rest`` names the pool and is forwarded as ``/rest`` (``/`` when
    nothing is left); otherwise the ``X-Shoal-Pool`` header, else ``default``.
    The query string stays with the forwarded path.
    """
    if path.startswith(_POOL_PREFIX):
        rest = path[len(_POOL_PREFIX) :]
        cut = len(rest)
        for sep in (b"/", b"?"):
            at = rest.find(sep)
            if at != -1 and at < cut:
                cut = at
        name = rest[:cut]
        if name:
            forwarded = rest[cut:]
            if not forwarded.startswith(b"/"):
                forwarded = b"/" + forwarded
            return name.decode("latin-1"), forwarded
    if pool_header:
        return pool_header.decode("latin-1").strip(), path
    return DEFAULT_POOL, path
