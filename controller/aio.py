"""Small asyncio helpers shared by the controller's loops."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def wait_event(event: asyncio.Event, *, timeout_s: float) -> bool:
    """Waits for ``event`` up to ``timeout_s``; True if it was set.

    NB: ``asyncio.wait_for`` on Python 3.11 can swallow a cancellation that
    arrives while the inner wait completes (CPython gh-86296), which leaves a
    loop that was asked to stop running forever. ``asyncio.timeout`` does not.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancels ``tasks`` and waits until each has ended, whatever it raised.

    The common tail of every component's ``stop()``: its loops must be gone
    before the next component stops, or a late tick touches a closed resource.
    """
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    if running:
        await asyncio.gather(*running, return_exceptions=True)
