"""Shared fixtures: the Docker engine gate, unique labels, and the worker image.

Docker tests skip when no engine answers, except under ``CI=true``, where a
missing engine fails them: CI must exercise real containers.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKER_IMAGE = os.environ.get("SHOAL_WORKER_IMAGE", "shoal/worker:latest")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[object]:
    import docker

    from controller.runtimes.docker import docker_available

    available, why = docker_available(timeout_s=10)
    if not available:
        if _in_ci():
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)
    client = docker.from_env(timeout=10)
    yield client
    client.close()


@pytest.fixture(scope="session")
def worker_image(docker_client: object) -> str:
    """Makes sure the worker image exists, building it once per session if needed."""
    import docker

    assert isinstance(docker_client, docker.DockerClient)
    sources = (REPO / "workerimg" / "Dockerfile").read_bytes()
    sources += (REPO / "workerimg" / "worker.py").read_bytes()
    digest = hashlib.sha256(sources).hexdigest()[:16]
    try:
        labels = docker_client.images.get(WORKER_IMAGE).labels or {}
    except docker.errors.ImageNotFound:
        labels = {}
    if labels.get("shoal.source-digest") != digest:
        # Missing or built from older sources: a stale worker would test old code.
        subprocess.run([str(REPO / "hack" / "build-images.sh")], check=True, timeout=900)
    return WORKER_IMAGE


@pytest.fixture
def instance_label(docker_client: object) -> Iterator[str]:
    """A unique ``shoal.instance`` for one test; its containers are removed afterwards."""
    import docker

    assert isinstance(docker_client, docker.DockerClient)
    instance = f"test-{secrets.token_hex(4)}"
    yield instance
    for container in docker_client.containers.list(
        all=True, filters={"label": f"shoal.instance={instance}"}
    ):
        container.remove(force=True)
