"""The policy store: the current and last good ``WorkerPool`` objects.

It loads the manifests, watches them for edits and swaps in a new policy only
when the whole set validates. A bad edit keeps the last good policy running;
the problem is logged once and kept in ``error`` for status pages until a good
edit clears it. The store never talks to Docker; the reconciler reads it.

The watch polls file metadata (mtime, size) every ``poll_interval_s``: the
standard library has no portable inotify, and a manifest change only has to
land within one evaluation interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from controller.aio import cancel_and_wait
from controller.errors import PolicyError
from controller.policy import WorkerPool, load_pools

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreError:
    source: str
    problems: tuple[str, ...]
    at: float  # unix time

    def to_json(self) -> dict[str, object]:
        return {"source": self.source, "problems": list(self.problems), "at": self.at}


class PolicyStore:
    def __init__(
        self,
        path: Path,
        *,
        poll_interval_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.poll_interval_s = poll_interval_s
        self._clock = clock
        self._pools: dict[str, WorkerPool] = {}
        self._fingerprint: tuple[tuple[str, float, int], ...] = ()
        self.error: StoreError | None = None
        self.generation = 0  # grows with every accepted change
        self._listeners: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def pools(self) -> dict[str, WorkerPool]:
        return dict(self._pools)

    def get(self, name: str) -> WorkerPool | None:
        return self._pools.get(name)

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def load(self) -> None:
        """Loads the manifests once. Raises ``PolicyError`` if the first load fails."""
        self._fingerprint = self._stat()
        pools = load_pools(self.path)
        self._accept(pools)

    def reload(self) -> bool:
        """Re-reads the manifests; returns True when a new policy was accepted."""
        try:
            pools = load_pools(self.path)
        except PolicyError as exc:
            problems = tuple(exc.problems)
            if self.error is None or self.error.problems != problems:
                logger.error(
                    "manifest refused, keeping the last good policy: %s: %s",
                    exc.source,
                    "; ".join(problems),
                )
            self.error = StoreError(source=exc.source, problems=problems, at=self._clock())
            self._notify()
            return False
        if self.error is not None:
            logger.info("manifest accepted again; error cleared")
            self.error = None
        if {p.name: p for p in pools} == self._pools:
            self._notify()
            return False
        self._accept(pools)
        return True

    async def run(self) -> None:
        """Polls the manifests until cancelled."""
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                fingerprint = await asyncio.to_thread(self._stat)
                if fingerprint != self._fingerprint:
                    self._fingerprint = fingerprint
                    self.reload()
            except Exception:
                # NB: the watch must outlive one bad read, or later edits are ignored.
                logger.exception("reading the manifests failed unexpectedly")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="policy-watch")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])

    def _accept(self, pools: list[WorkerPool]) -> None:
        before = set(self._pools)
        self._pools = {p.name: p for p in pools}
        self.generation += 1
        logger.info(
            "policy loaded from %s: pools %s (generation %d)",
            self.path,
            ", ".join(sorted(self._pools)) or "none",
            self.generation,
            extra={"added": sorted(set(self._pools) - before)},
        )
        self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    def _stat(self) -> tuple[tuple[str, float, int], ...]:
        paths = sorted(self.path.iterdir()) if self.path.is_dir() else [self.path]
        entries = []
        for p in paths:
            if p.suffix not in {".yaml", ".yml"}:
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            entries.append((str(p), st.st_mtime, st.st_size))
        return tuple(entries)
