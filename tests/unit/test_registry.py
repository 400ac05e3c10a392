"""The registry's versioned watch, as the balancer follows it."""

from __future__ import annotations

import pytest

from controller.registry import Registry, WatchExpired
from controller.runtimes.base import WorkerId


def add(registry: Registry, n: int) -> WorkerId:
    worker_id = WorkerId(f"w{n}")
    registry.add(
        worker_id=worker_id,
        name=f"shoal-default-{n}",
        pool="default",
        template_hash="h",
        host="127.0.0.1",
        host_port=40000 + n,
        concurrency=1,
    )
    return worker_id


async def test_watch_replays_events_after_a_version_in_order() -> None:
    registry = Registry()
    first = add(registry, 1)
    since = registry.resource_version
    registry.mark_ready(first)
    registry.remove(first)

    seen = []
    async for event in registry.watch(since=since):
        seen.append((event.type, event.worker.state))
        if len(seen) == 2:
            break
    assert seen == [("MODIFIED", "ready"), ("DELETED", "gone")]


async def test_a_watcher_that_falls_behind_the_history_must_relist() -> None:
    registry = Registry()
    worker = add(registry, 1)
    watch = registry.watch(since=registry.resource_version)
    registry.mark_ready(worker)
    assert (await anext(watch)).type == "MODIFIED"

    # More changes than the registry keeps, while this watcher does not read.
    for _ in range(5000):
        registry.acquire_slot(worker)
        registry.release_slot(worker, processed=True)

    with pytest.raises(WatchExpired):
        await anext(watch)
