"""The balancer's proxy against a raw-socket worker that misbehaves on the wire.

Each test scripts the worker's bytes exactly (an answer before the request body is
read, bytes after an answer, a switch of protocols, odd statuses and headers) and
checks that no answer reaches the wrong request and that what a client or a worker
sees is what RFC 9110/9112 ask of an intermediary. The proxy runs in-process with a
real registry and the in-process control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from api.endpoints import PoolInfo, RegistryControlPlane
from api.proxy import Proxy, ProxyConfig
from api.proxy_client import ClientConnection
from api.proxy_upstream import UpstreamConnection
from controller.registry import Registry
from controller.runtimes.base import WorkerId

# Given the request head (without its blank line), returns the bytes to answer and
# whether to read the request's body first.
Script = Callable[[bytes], tuple[bytes, bool]]
Make = Callable[..., Awaitable["Setup"]]


def ok(text: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(text), text)


def target_of(head: bytes) -> bytes:
    return head.split(b" ", 2)[1]


def header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


@dataclass
class RawWorker:
    """Reads requests one by one on each connection and answers as ``script`` says."""

    script: Script
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    port: int = 0
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def reset_all(self) -> None:
        """Resets every open connection (RST, as a crashed worker's kernel sends)."""
        for writer in self.writers:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), timeout=1)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n"))[:-4]
                self.heads.append(head)
                answer, read_body_first = self.script(head)
                length = int(header(head, b"content-length") or 0)
                if read_body_first:
                    self.bodies.append(await reader.readexactly(length))
                writer.write(answer)
                await writer.drain()
                if not read_body_first:
                    # Answered early; the body still arrives and is read as a body.
                    self.bodies.append(await reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@dataclass
class Setup:
    proxy: Proxy
    url: tuple[str, int]
    worker: RawWorker


@pytest.fixture
async def setup() -> AsyncIterator[Callable[[Script], Awaitable[Setup]]]:
    made: list[Setup] = []

    async def make(script: Script, **config: float) -> Setup:
        worker = RawWorker(script)
        await worker.start()
        registry = Registry()
        worker_id = WorkerId("id-raw")
        registry.add(
            worker_id=worker_id,
            name="raw",
            pool="default",
            template_hash="t1",
            host="127.0.0.1",
            host_port=worker.port,
            concurrency=4,
        )
        registry.mark_ready(worker_id)
        pools = {"default": PoolInfo(name="default", strategy="least-connections", max_replicas=1)}
        control = RegistryControlPlane(
            registry=registry,
            pools=lambda: pools,
            request_capacity=lambda pool, *, hold_s: True,
            report_load=lambda pool, *, in_flight: None,
        )
        settings = {"upstream_timeout_s": 5.0, "sweep_interval_s": 0.05, **config}
        proxy = Proxy(control, config=ProxyConfig(**settings))
        port = await proxy.start(host="127.0.0.1", port=0)
        made.append(Setup(proxy=proxy, url=("127.0.0.1", port), worker=worker))
        return made[-1]

    yield make
    for each in made:
        await each.proxy.close()
        await each.worker.stop()


async def exchange(url: tuple[str, int], request: bytes, *, until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection(*url)
    writer.write(request)
    try:
        if until_close:
            return await asyncio.wait_for(reader.read(), timeout=5)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        length = int(header(head[:-4], b"content-length") or 0)
        return head + await asyncio.wait_for(reader.readexactly(length), timeout=5)
    finally:
        writer.close()


def answers(data: bytes) -> list[bytes]:
    return [b"HTTP/1.1 " + part for part in data.split(b"HTTP/1.1 ")[1:]]


# -- what a worker sends ----------------------------------------------------------------


async def test_an_answer_before_the_body_is_read_does_not_hand_the_next_request_over_as_body(
    setup: Callable[[Script], Awaitable[Setup]],
) -> None:
    def script(head: bytes) -> tuple[bytes, bool]:
        if target_of(head) == b"/upload":
            return b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\n\r\nno way", False
        return ok(b"for " + (header(head, b"x-tag") or b"?")), True

    s = await setup(script)
    # The client stops after 1000 of the 100000 bytes it announced.
    upload = await exchange(
        s.url, b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"A" * 1000
    )
    victim = await exchange(
        s.url, b"GET /b HTTP/1.1\r\nHost: b\r\nX-Tag: B\r\n\r\n", until_close=False
    )

    assert upload.startswith(b"HTTP/1.1 401 ") and upload.endswith(b"no way")
    assert victim.startswith(b"HTTP/1.1 200 ") and victim.endswith(b"for B")
    assert [target_of(h) for h in s.worker.heads] == [b"/upload", b"/b"]


async def test_bytes_a_worker_sends_after_its_answer_are_not_relayed_as_an_answer(
    setup: Callable[[Script], Awaitable[Setup]],
) -> None:
    def script(head: bytes) -> tuple[bytes, bool]:
        if target_of(head) == b"/first":
            return ok(b"hello") + ok(b"EVIL!"), True
        return ok(b"mine"), True

    s = await setup(script)
    data = await exchange(
        s.url,
        b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )

    got = answers(data)
    assert len(got) == 2 and got[0].endswith(b"hello") and got[1].endswith(b"mine"), data
    assert b"EVIL" not in data


async def test_a_worker_that_switches_protocols_or_answers_an_impossible_status_gets_502(
    setup: Callable[[Script], Awaitable[Setup]],
) -> None:
    def script(head: bytes) -> tuple[bytes, bool]:
        if target_of(head) == b"/switch":
            return b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n", True
        return b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n", True

    s = await setup(script)
    for target in (b"/switch", b"/odd"):
        data = await exchange(
            s.url, b"GET %b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" % target
        )
        assert data.startswith(b"HTTP/1.1 502 "), data
    assert len(s.worker.heads) == 2, "neither is retried: the worker would answer the same"


async def test_response_headers_the_worker_lists_in_connection_and_a_204_length_are_dropped(
    setup: Callable[[Script], Awaitable[Setup]],
) -> None:
    def script(head: bytes) -> tuple[bytes, bool]:
        if target_of(head) == b"/empty":
            return b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", True
        return (
            b"HTTP/1.1 200 OK\r\nConnection: X-Internal, content-length\r\nX-Internal: secret\r\n"
            b"X-Request-Id: the-workers\r\nContent-Length: 2\r\n\r\nok"
        ), True

    s = await setup(script)
    data = await exchange(
        s.url,
        b"GET /listed HTTP/1.1\r\nHost: a\r\nX-Request-Id: mine\r\n\r\n"
        b"GET /empty HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )

    listed, empty = answers(data)
    assert b"X-Internal" not in listed and listed.endswith(b"\r\n\r\nok")
    assert b"Content-Length: 2" in listed, "a Connection header never takes the framing away"
    assert listed.count(b"X-Request-Id") == 1 and b"X-Request-Id: mine" in listed
    assert empty.startswith(b"HTTP/1.1 204 ") and b"Content-Length" not in empty


# -- what a client sends ----------------------------------------------------------------


def echo_head(head: bytes) -> tuple[bytes, bool]:
    return ok(head), True


async def test_an_upgrade_request_gets_one_501_and_reaches_no_worker(
    setup: Callable[[Script], Awaitable[Setup]],
) -> None:
    s = await setup(echo_head)
    for request in (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"POST /charge HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: foo\r\n"
        b"Content-Length: 2\r\n\r\n{}",
    ):
        data = await exchange(s.url, request)
        assert [a[:12] for a in answers(data)] == [b"HTTP/1.1 501"], data
    assert s.worker.heads == []


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost:\r\nHost: evil\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", b"400"),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", b"505"),
        (b"CONNECT /pools/default/x HTTP/1.1\r\nHost: a\r\n\r\n", b"501"),
        (b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n", b"501"),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            b"501",
        ),
    ],
)
async def test_requests_an_intermediary_must_not_forward_are_refused(
    setup: Callable[[Script], Awaitable[Setup]], request_bytes: bytes, status: bytes
) -> None:
    s = await setup(echo_head)
    data = await exchange(s.url, request_bytes)
    assert data.startswith(b"HTTP/1.1 " + status + b" "), data
    assert s.worker.heads == []


async def test_request_headers_are_cleaned_before_a_worker_sees_them(
    setup: Callable[[Script], Awaitable[Setup]],
) -> None:
    s = await setup(echo_head)
    await exchange(
        s.url,
        b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret, content-length\r\n"
        b"X-Secret: s\r\nX-Real-IP: 10.9.9.9\r\nX-Forwarded-Prefix: /admin\r\n"
        b"Content-Length: 0\r\n\r\n"
        b"GET http://b.example/b?q=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )

    listed, absolute = s.worker.heads
    assert header(listed, b"x-secret") is None and header(listed, b"content-length") == b"0"
    assert header(listed, b"x-real-ip") is None and header(listed, b"x-forwarded-prefix") is None
    assert absolute.startswith(b"GET /b?q=1 HTTP/1.1\r\n")
    assert header(absolute, b"host") == b"b.example", "the target's authority wins (RFC 9112)"
    assert absolute.lower().count(b"\r\nhost:") == 1


# -- timing and flow ----------------------------------------------------------------------


async def test_a_stalled_body_gets_408_and_a_slow_steady_one_gets_through(setup: Make) -> None:
    s = await setup(echo_head, client_idle_s=0.5, upstream_timeout_s=1.0)
    head = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n"
    stalled = await exchange(s.url, head + b"12345")
    assert stalled.startswith(b"HTTP/1.1 408 "), stalled

    reader, writer = await asyncio.open_connection(*s.url)
    writer.write(head)
    for _ in range(10):  # 10 bytes over ~2 s: longer than the worker's 1 s, never idle 0.5 s
        await asyncio.sleep(0.2)
        writer.write(b"x")
    answer = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer


async def test_a_worker_connection_paused_for_a_slow_client_is_pooled_reading(
    setup: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Back-pressure from one client must not outlive its answer on a pooled connection."""

    def script(head: bytes) -> tuple[bytes, bool]:
        body = target_of(head)
        chunked = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked, True

    relay = UpstreamConnection._flush

    def relay_into_a_full_buffer(conn: UpstreamConnection, client: ClientConnection) -> None:
        relay(conn, client)
        client.pause_writing()  # what a client's full write buffer does after this write

    monkeypatch.setattr(UpstreamConnection, "_flush", relay_into_a_full_buffer)
    s = await setup(script)
    reader, writer = await asyncio.open_connection(*s.url)
    writer.write(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), timeout=5)
    (pooled,) = [c for conns in s.proxy.idle.values() for c in conns]
    assert not pooled.reading_paused, "the next request on it would never be answered"
    monkeypatch.undo()
    other = await exchange(s.url, b"GET /second HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
    writer.close()
    assert other.startswith(b"HTTP/1.1 200 ") and b"/second" in other


async def test_a_reset_mid_answer_without_length_reaches_the_client_as_a_cut(
    setup: Make,
) -> None:
    def script(head: bytes) -> tuple[bytes, bool]:
        return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial", True

    s = await setup(script)
    reader, writer = await asyncio.open_connection(*s.url)
    writer.write(b"GET /cut HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"partial\r\n"), timeout=5)
    s.worker.reset_all()
    rest = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    assert b"0\r\n\r\n" not in rest, "a reset is not a clean end of the answer"


async def test_the_first_refusal_of_a_pipelined_run_is_the_one_sent(setup: Make) -> None:
    s = await setup(echo_head)
    data = await exchange(
        s.url,
        b"GET /g HTTP/1.1\r\nHost: a\r\n\r\nGET /v HTTP/2.0\r\nHost: a\r\n\r\n"
        b"GET /g HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    assert [a[:12] for a in answers(data)] == [b"HTTP/1.1 200", b"HTTP/1.1 505"], data
