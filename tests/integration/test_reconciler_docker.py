"""The reconciler on a real Docker engine: busy-aware scale-in, adoption after a crash,
live policy edits, rollouts and several pools."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.integration.shoal_harness import ShoalProcess, http_json, pool_manifest, running_shoal

pytestmark = [pytest.mark.docker, pytest.mark.timeout(240)]


def containers(client: docker.DockerClient, instance: str) -> list[Any]:
    return client.containers.list(
        all=True, filters={"label": ["shoal.managed=true", f"shoal.instance={instance}"]}
    )


def wait_until(predicate: Any, *, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


async def test_scale_in_spares_the_busy_worker_until_its_task_is_done(
    tmp_path: Path, docker_client: docker.DockerClient, worker_image: str, instance_label: str
) -> None:
    since = time.time()
    manifest = pool_manifest(
        max_replicas=2, work_seconds=1, scale_down_window="1s", scale_to_zero_after="1s"
    )
    async with running_shoal(tmp_path, manifest, instance=instance_label) as shoal:
        long_id = await shoal.enqueue(payload="long", work_seconds=20)
        short_id = await shoal.enqueue(payload="short", work_seconds=1)

        async def long_task_running() -> Any:
            task = await shoal.get(f"/tasks/{long_id}")
            return task if task["state"] == "running" else None

        running = await shoal.wait_for(long_task_running, timeout_s=30, what="the long task")

        async def scaled_in_to_one() -> bool:
            events = (await shoal.get("/scaling-events"))["events"]
            return any(e["from"] == 2 and e["to"] == 1 for e in events)

        await shoal.wait_for(scaled_in_to_one, timeout_s=30, what="a scale-in to 1")

        async def long_task_done() -> Any:
            task = await shoal.get(f"/tasks/{long_id}")
            return task if task["state"] in ("succeeded", "failed", "dead") else None

        done = await shoal.wait_for(long_task_done, timeout_s=60, what="the long task to end")

        async def pool_empty() -> bool:
            return not (await shoal.get("/metrics.json"))["workerIds"]

        await shoal.wait_for(pool_empty, timeout_s=30, what="scale to zero")
        short = await shoal.get(f"/tasks/{short_id}")

    assert done["state"] == "succeeded"
    assert done["attempts"] == 1 and done["workers"] == [running["worker"]], done
    assert short["state"] == "succeeded" and short["attempts"] == 1, short

    # The long task's container died only after the task finished.
    deaths = {
        event["Actor"]["Attributes"]["name"]: event["time"]
        for event in docker_client.events(
            since=int(since),
            until=int(time.time()) + 1,
            filters={"label": f"shoal.instance={instance_label}", "event": "die"},
            decode=True,
        )
    }
    assert running["worker"] in deaths
    assert deaths[running["worker"]] >= int(done["finishedAt"])


def test_controller_killed_with_sigkill_adopts_its_workers_on_restart(
    tmp_path: Path, docker_client: docker.DockerClient, worker_image: str, instance_label: str
) -> None:
    manifests = tmp_path / "pool.yaml"
    manifests.write_text(
        pool_manifest(max_replicas=3, work_seconds=3, scale_down_window="5s").replace(
            "leaseTimeout: 20s", "leaseTimeout: 4s"
        )
    )
    state = tmp_path / "state"
    shoal = ShoalProcess(manifests=manifests, state_dir=state, instance=instance_label).start()
    ids = []
    try:
        for i in range(12):
            status, reply = http_json("POST", shoal.url + "/enqueue-task", {"payload": i})
            assert status == 202, reply
            ids.append(reply["id"])

        def three_ready() -> bool:
            _, metrics = http_json("GET", shoal.url + "/metrics.json")
            return sum(w["state"] == "ready" for w in metrics["workers"]) == 3

        wait_until(three_ready, timeout_s=30, what="three ready workers")
        shoal.kill()
        before = sorted(c.id for c in containers(docker_client, instance_label))
        assert len(before) == 3

        shoal.start()
        _, adopted = http_json("GET", shoal.url + "/containers-status")
        assert sorted(c["workerId"] for c in adopted["containers"]) == before
        # Several passes later still no extra container: the adopted ones count.
        time.sleep(2.0)
        assert sorted(c.id for c in containers(docker_client, instance_label)) == before

        def all_succeeded() -> bool:
            states = [http_json("GET", f"{shoal.url}/tasks/{i}")[1]["state"] for i in ids]
            assert not {"failed", "dead"} & set(states), states
            return all(s == "succeeded" for s in states)

        wait_until(all_succeeded, timeout_s=90, what="all tasks to succeed", interval_s=0.5)
        assert "adopted worker" in shoal.log()
    finally:
        shoal.terminate()
    assert containers(docker_client, instance_label) == []


async def test_policy_edits_drain_to_the_new_max_and_a_bad_edit_changes_nothing(
    tmp_path: Path, docker_client: docker.DockerClient, worker_image: str, instance_label: str
) -> None:
    manifest = pool_manifest(max_replicas=4, work_seconds=5, scale_down_window="1s")
    async with running_shoal(tmp_path, manifest, instance=instance_label) as shoal:
        ids = [await shoal.enqueue(payload=i) for i in range(14)]

        async def busy_workers(n: int) -> Any:
            workers = (await shoal.get("/metrics.json"))["workers"]
            busy = [w for w in workers if w["state"] == "ready" and w["inFlight"] > 0]
            return len(busy) >= n

        await shoal.wait_for(lambda: busy_workers(4), timeout_s=40, what="4 busy workers")

        (tmp_path / "pool.yaml").write_text(manifest.replace("max: 4", "max: 2"))

        async def two_left() -> bool:
            metrics = await shoal.get("/metrics.json")
            return (
                len(metrics["workerIds"]) == 2
                and len(containers(docker_client, instance_label)) == 2
            )

        await shoal.wait_for(two_left, timeout_s=40, what="the pool to drain to 2")

        (tmp_path / "pool.yaml").write_text("spec: [this is: not valid\n")

        async def error_shown() -> Any:
            status = await shoal.get("/autoscaler-status")
            return status["policyError"]

        error = await shoal.wait_for(error_shown, timeout_s=10, what="the policy error")
        assert "not valid YAML" in " ".join(error["problems"])
        status = await shoal.get("/autoscaler-status")
        assert status["pools"]["default"]["replicas"]["max"] == 2
        assert len((await shoal.get("/metrics.json"))["workerIds"]) == 2

        tasks = [await shoal.get(f"/tasks/{i}") for i in ids]
        assert not [t for t in tasks if t["state"] in ("failed", "dead")]
        assert all(t["attempts"] <= 1 for t in tasks), "draining must not retry tasks"


async def test_template_change_rolls_one_surge_worker_at_a_time(
    tmp_path: Path, docker_client: docker.DockerClient, worker_image: str, instance_label: str
) -> None:
    manifest = pool_manifest(min_replicas=2, max_replicas=3, work_seconds=1, min_interval="200ms")
    async with running_shoal(tmp_path, manifest, instance=instance_label) as shoal:

        async def ready_workers() -> list[dict[str, Any]]:
            workers = (await shoal.get("/metrics.json"))["workers"]
            return [w for w in workers if w["state"] == "ready"]

        async def two_ready() -> bool:
            return len(await ready_workers()) == 2

        await shoal.wait_for(two_ready, timeout_s=30, what="two ready workers")
        old_hash = (await shoal.get("/autoscaler-status"))["pools"]["default"]["templateHash"]
        (tmp_path / "pool.yaml").write_text(
            manifest.replace('WORK_SECONDS: "1"', 'WORK_SECONDS: "2"')
        )

        most_live = 0
        least_ready = 2

        async def rolled() -> bool:
            nonlocal most_live, least_ready
            workers = (await shoal.get("/metrics.json"))["workers"]
            live = [w for w in workers if w["state"] in ("starting", "ready")]
            ready = [w for w in workers if w["state"] == "ready"]
            most_live = max(most_live, len(live))
            least_ready = min(least_ready, len(ready))
            new_hash = (await shoal.get("/autoscaler-status"))["pools"]["default"]["templateHash"]
            return (
                new_hash != old_hash
                and len(workers) == 2
                and all(w["templateHash"] == new_hash and w["state"] == "ready" for w in workers)
            )

        await shoal.wait_for(rolled, timeout_s=60, what="the rollout", interval_s=0.05)
    assert most_live <= 3, "one surge worker at a time"
    assert least_ready >= 2, "a rollout never lowers ready capacity"


async def test_two_pools_each_scale_with_their_own_queue(
    tmp_path: Path, docker_client: docker.DockerClient, worker_image: str, instance_label: str
) -> None:
    manifest = (
        pool_manifest(name="alpha", max_replicas=2, work_seconds=1)
        + "---"
        + pool_manifest(name="beta", max_replicas=2, work_seconds=1)
    )
    async with running_shoal(tmp_path, manifest, instance=instance_label) as shoal:
        alpha = [await shoal.enqueue(pool="alpha", payload=i) for i in range(3)]
        beta = [await shoal.enqueue(pool="beta", payload=i) for i in range(3)]

        async def all_done() -> list[dict[str, Any]] | None:
            tasks = [await shoal.get(f"/tasks/{i}") for i in alpha + beta]
            return tasks if all(t["state"] == "succeeded" for t in tasks) else None

        tasks = await shoal.wait_for(all_done, timeout_s=60, what="both pools' tasks")
    for task in tasks:
        assert task["worker"].startswith(f"shoal-{task['pool']}-"), task
