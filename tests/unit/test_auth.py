"""Bearer-token authentication: where the token comes from, and that a refusal changes nothing."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from api import cli
from api.app import make_app
from api.auth import TOKEN_ENV, TokenError, load_token
from controller import telemetry
from controller.manager import Controller, ControllerConfig
from controller.queues.memory import MemoryQueue
from controller.runtimes.fake import FakeRuntime

TOKEN = "s3cret-token-0123456789abcdef"
MANIFEST = """
apiVersion: shoal/v1
kind: WorkerPool
metadata: {name: default}
spec:
  replicas: {min: 0, max: 2}
"""


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], Controller]]:
    manifest = tmp_path / "pool.yaml"
    manifest.write_text(MANIFEST)
    controller = Controller(
        config=ControllerConfig(manifests=manifest), runtime=FakeRuntime(), queue=MemoryQueue()
    )
    controller.store.load()
    app = make_app(controller, manage_controller=False, api_token=TOKEN)
    async with TestClient(TestServer(app)) as client:
        yield client, controller
    await controller.queue.close()


async def _total_tasks(controller: Controller) -> int:
    counts = (await controller.queue.counts("default")).to_json()
    return sum(v for k, v in counts.items() if k != "ready")


async def test_auth_refuses_an_enqueue_without_a_token_and_stores_nothing(
    guarded: tuple[TestClient[Any, Any], Controller],
) -> None:
    client, controller = guarded
    response = await client.post("/enqueue-task", json={"payload": 1})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="shoal"'
    assert "token" in (await response.json())["error"]
    assert await _total_tasks(controller) == 0


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(f"Bearer {TOKEN}x", id="wrong-token"),
        pytest.param(f"Bearer {TOKEN[:-1]}", id="prefix-of-token"),
        pytest.param(f"Basic {TOKEN}", id="basic-scheme"),
        pytest.param("Bearer ", id="empty-token"),
        pytest.param("Bearer t\u00e9st-\udcff", id="non-ascii"),
    ],
)
async def test_auth_refuses_wrong_credentials(
    guarded: tuple[TestClient[Any, Any], Controller], authorization: str
) -> None:
    client, controller = guarded
    response = await client.post("/enqueue-task", json={}, headers={"Authorization": authorization})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await _total_tasks(controller) == 0


async def test_auth_wrong_token_is_named_invalid_token(
    guarded: tuple[TestClient[Any, Any], Controller],
) -> None:
    client, _ = guarded
    response = await client.get("/queue-length", headers={"Authorization": "Bearer nope"})
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="shoal", error="invalid_token"'


async def test_auth_lets_the_right_token_through(
    guarded: tuple[TestClient[Any, Any], Controller],
) -> None:
    client, controller = guarded
    headers = {"Authorization": f"bearer {TOKEN}"}  # the scheme is case-insensitive
    response = await client.post("/enqueue-task", json={"payload": 1}, headers=headers)
    assert response.status == 202
    assert await _total_tasks(controller) == 1
    metrics = await client.get("/metrics", headers=headers)
    assert metrics.status == 200


async def test_auth_guards_every_route_but_healthz_and_the_dashboard_assets(
    guarded: tuple[TestClient[Any, Any], Controller],
) -> None:
    client, controller = guarded
    assert (await client.get("/healthz")).status == 200
    # Static files hold no data, and a browser cannot put a token on <script src>.
    assert (await client.get("/dashboard/app.js")).status == 200
    assert (await client.get("/dashboard/style.css")).status == 200
    assert (await client.post("/dashboard/app.js", data=b"{}")).status == 401
    checked = 0
    for route in client.app.router.routes():
        if route.resource is None or route.method in ("HEAD", "OPTIONS"):
            continue
        path = route.resource.canonical.replace("{id}", "x").replace("{pool}", "default")
        path = path.replace("{name}", "app.js")
        if path in ("/healthz", "/dashboard/app.js"):
            continue
        response = await client.request(route.method, path, data=b"{}")
        assert response.status == 401, (route.method, path)
        checked += 1
    assert checked >= 20
    assert await _total_tasks(controller) == 0


async def test_auth_refuses_before_reading_a_large_body(
    guarded: tuple[TestClient[Any, Any], Controller],
) -> None:
    """A client without the token cannot make the server read (or buffer) its body."""
    client, _ = guarded
    response = await client.post("/enqueue-task", data=io.BytesIO(b"x" * (2 * 1024 * 1024)))
    assert response.status == 401


def test_load_token_reads_the_environment() -> None:
    assert load_token(token_file=None, env={TOKEN_ENV: f"  {TOKEN}\n"}) == TOKEN
    assert load_token(token_file=None, env={}) is None


def test_load_token_file_wins_over_the_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert load_token(token_file=token_file, env={TOKEN_ENV: "x" * 32}) == TOKEN


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param("short", "at least", id="too-short"),
        pytest.param("   \n", "at least", id="blank"),
        pytest.param(None, "cannot read", id="missing-file"),
    ],
)
def test_load_token_refuses_unusable_tokens(
    tmp_path: Path, content: str | None, message: str
) -> None:
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    with pytest.raises(TokenError, match=message):
        load_token(token_file=token_file, env={})


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    telemetry.install(None)


def test_cli_up_refuses_an_unreadable_token_file_before_starting_anything(
    tmp_path: Path, restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        [
            "up",
            "--runtime",
            "process",
            "--queue",
            "memory://",
            "--state-dir",
            str(tmp_path / "state"),
            "--api-token-file",
            str(tmp_path / "missing"),
        ]
    )
    assert code == 2
    assert "cannot read the API token file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.4", False),
        ("example.internal", False),
    ],
)
def test_cli_knows_which_hosts_are_loopback(host: str, loopback: bool) -> None:
    assert cli._is_loopback(host) is loopback


async def test_auth_takes_the_token_from_the_query_for_get_only(
    guarded: tuple[TestClient[Any, Any], Controller],
) -> None:
    """The dashboard's EventSource cannot send headers: GET may carry ?access_token=."""
    client, controller = guarded
    assert (await client.get(f"/queue-length?access_token={TOKEN}")).status == 200
    assert (await client.get("/queue-length?access_token=wrong")).status == 401
    posted = await client.post(f"/enqueue-task?access_token={TOKEN}", json={"payload": 1})
    assert posted.status == 401
    assert await _total_tasks(controller) == 0
