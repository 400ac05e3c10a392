"""A newcomer's path: a fresh clone, `hack/up.sh`, one real load test, `hack/down.sh`."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import docker
import pytest

from tests.conftest import REPO
from tests.integration.shoal_harness import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.timeout(900)]


def test_fresh_clone_comes_up_and_serves_a_load_test_without_loss(
    tmp_path: Path, docker_client: docker.DockerClient, worker_image: str
) -> None:
    clone = tmp_path / "shoal"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    instance = f"e2e-{secrets.token_hex(4)}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env.pop("VIRTUAL_ENV", None)

    up = subprocess.run(
        [str(clone / "hack" / "up.sh"), "--detach", "--port", str(port), "--instance", instance],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        load = subprocess.run(
            [
                str(clone / ".venv" / "bin" / "python"),
                str(clone / "hack" / "loadtest.py"),
                "--url",
                f"http://127.0.0.1:{port}",
                "--pool",
                "default",
                "--tasks",
                "24",
                "--rate",
                "6",
                "--work-seconds",
                "1",
                "--json",
            ],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        summary = json.loads(load.stdout.strip().splitlines()[-1])
        print("load test summary:", json.dumps(summary))
        assert load.returncode == 0, load.stdout[-2000:] + load.stderr[-2000:]
        assert summary["submitted"] == 24
        assert summary["succeeded"] == 24
        assert summary["lost"] == 0 and summary["failed"] == 0
        assert summary["max_replicas"] >= 1
    finally:
        down = subprocess.run(
            [str(clone / "hack" / "down.sh")], cwd=clone, env=env, capture_output=True, timeout=120
        )
        left = docker_client.containers.list(
            all=True, filters={"label": f"shoal.instance={instance}"}
        )
        for container in left:
            container.remove(force=True)
    assert down.returncode == 0
    assert left == [], "shutdown must leave no Shoal container behind"
