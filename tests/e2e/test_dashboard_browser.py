"""The dashboard in a real browser against Shoal on real Docker (issue 7, part 3).

The page must load, show the worker container this test caused (an enqueue scales the pool up
from zero), show the queue length change within 2 s of the enqueues, and show the scaling
event. A screenshot is saved under the test's tmp path, and also at ``SHOAL_DASHBOARD_SHOT``
when that is set (how ``docs/dashboard.png`` is made).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import RunningShoal

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

N_TASKS = 4


async def test_dashboard_shows_workers_queue_and_scaling_live(
    browser: Any, shoal: RunningShoal, docker_client: Any, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    page = await browser.new_page(viewport={"width": 1440, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda msg: (
            problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None
        ),
    )

    await page.goto(shoal.url + "/")
    await expect(page.get_by_role("heading", level=1)).to_contain_text("Shoal")
    await expect(page.get_by_test_id("conn-status")).to_have_attribute("data-state", "live")
    queue_length = page.get_by_test_id("queue-length")
    await expect(queue_length).to_have_text("0")
    await expect(page.locator("#containers tbody tr")).to_have_count(0)

    loop = asyncio.get_running_loop()
    enqueued_at = loop.time()
    for n in range(N_TASKS):
        await shoal.enqueue("web", {"n": n})
    await expect(queue_length).not_to_have_text("0", timeout=2000)
    print(f"queue length shown {loop.time() - enqueued_at:.2f} s after the enqueues")

    # The enqueue scaled the pool up from zero: the event and a container appear.
    scale_up = page.locator("#events tbody tr").filter(has_text=re.compile(r"▲ 0 → [1-9]"))
    await expect(scale_up).to_have_count(1, timeout=20000)
    await expect(scale_up).to_contain_text("web")
    rows = page.locator("#containers tbody tr")
    await expect(rows.first).to_be_visible(timeout=60000)
    shown_id = await rows.first.get_attribute("data-id")
    ours = {
        c.id[:12]: c
        for c in docker_client.containers.list(
            filters={"label": f"shoal.instance={shoal.instance}"}
        )
    }
    assert shown_id in ours, f"dashboard shows {shown_id}, our containers are {sorted(ours)}"
    ports = ours[shown_id].attrs["NetworkSettings"]["Ports"]
    host_ports = {b["HostPort"] for bindings in ports.values() if bindings for b in bindings}
    await expect(rows.first.locator("td").nth(3)).to_have_text(sorted(host_ports)[0])

    # Work gets done: the worker goes ready and the per-container chart counts its tasks.
    await expect(rows.first.locator(".badge")).to_have_text("ready", timeout=60000)
    await expect(page.locator("#stat-processed")).not_to_have_text("0", timeout=60000)
    processed_chart = page.locator("#chart-processed")
    await expect(processed_chart).to_have_attribute("aria-label", re.compile(r"[0-9a-f]{12} [1-9]"))
    await expect(processed_chart).to_have_attribute("aria-label", re.compile(rf"{shown_id} \d"))
    await expect(page.locator("#chart-replicas")).to_have_attribute(
        "aria-label", re.compile(r"[1-9]\d* scaling events in view")
    )

    shot = tmp_path / "dashboard.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if target := os.environ.get("SHOAL_DASHBOARD_SHOT"):
        shutil.copyfile(shot, target)
    print(f"screenshot: {shot}")
    assert problems == []
