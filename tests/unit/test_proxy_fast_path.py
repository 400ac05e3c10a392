"""The proxy's fast paths forward exactly what its httptools paths forward.

A request (or a worker's response) that arrives whole in one read may take a fast path
that checks and rewrites its head with regular expressions; the same bytes split inside
the head always go through httptools. Property: for any head, both ways give the worker
(or the client) the same request line or status, the same header lines in the same
order (names compared case-insensitively, values without surrounding blanks), the same
body and the same keep-alive decision. So the fast path may decline anything unusual,
but whatever it takes, it takes the way the careful path would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.balancer import Backend
from api.endpoints import PoolInfo
from api.proxy import Proxy, ProxyConfig
from api.proxy_client import ClientConnection
from api.proxy_exchange import Exchange
from api.proxy_upstream import UpstreamConnection


class FakeTransport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closed


class FakeControl:
    def pools(self) -> Mapping[str, PoolInfo]:
        return {
            name: PoolInfo(name=name, strategy="least-connections", max_replicas=4)
            for name in ("default", "api")
        }


@dataclass
class Forwarded:
    """What a worker (or a client) would read: parsed back with httptools."""

    first: tuple[Any, ...] = ()
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False

    def on_url(self, url: bytes) -> None:
        self.first += (url,)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value.strip(b" \t")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def parse_request(data: bytes) -> Forwarded:
    seen = Forwarded()
    parser = httptools.HttpRequestParser(seen)
    parser.feed_data(data)
    seen.first = (parser.get_method(), *seen.first)
    return seen


def parse_response(data: bytes) -> Forwarded:
    seen = Forwarded()
    parser = httptools.HttpResponseParser(seen)
    parser.feed_data(data)
    seen.first = (parser.get_status_code(),)
    return seen


def splits(data: bytes) -> Iterator[list[bytes]]:
    """The data whole, then cut once inside the head (so httptools must take it)."""
    yield [data]
    cut = max(1, data.find(b"\r\n") // 2)
    yield [data[:cut], data[cut:]]


def new_proxy() -> Proxy:
    proxy = Proxy(FakeControl(), config=ProxyConfig())  # type: ignore[arg-type]
    proxy.request_id = lambda given: given or b"generated"  # type: ignore[method-assign]
    return proxy


def forward_request(pieces: list[bytes]) -> tuple[list[Exchange], bool]:
    """Feeds a client connection; returns the exchanges dispatched and if it was refused."""
    proxy = new_proxy()
    dispatched: list[Exchange] = []
    proxy.dispatch = dispatched.append  # type: ignore[method-assign]
    client = ClientConnection(proxy)
    transport = FakeTransport()
    client.connection_made(transport)  # type: ignore[arg-type]
    for piece in pieces:
        client.data_received(piece)
    refused = any(
        out.startswith(b"HTTP/1.1 4") or out.startswith(b"HTTP/1.1 5") for out in transport.out
    )
    return dispatched, refused


def relay_response(pieces: list[bytes], method: str = "GET") -> tuple[bytes, bool | None]:
    """Feeds a worker connection; returns what the client got and whether it was pooled."""
    return asyncio.run(_relay(pieces, method))


async def _relay(pieces: list[bytes], method: str) -> tuple[bytes, bool | None]:
    proxy = new_proxy()
    backend = Backend(worker_id="w1", name="w1", pool="default", host="127.0.0.1", port=1)
    proxy.on_change({"w1": backend})
    conn = UpstreamConnection(proxy, backend)
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    client = ClientConnection(proxy)
    client_transport = FakeTransport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    exchange = Exchange(client, method)
    exchange.rid = b"rid-1"
    exchange.body_done = True
    client.queue.append(exchange)
    proxy._send(exchange, backend, conn)
    for piece in pieces:
        conn.data_received(piece)
    await asyncio.sleep(0)  # the outbox sends held writes once the loop is through its batch
    pooled = conn in proxy.idle.get("w1", []) if conn.exchange is None else None
    return b"".join(client_transport.out), pooled


# -- requests ---------------------------------------------------------------------------

_TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!#",
    min_size=1,
    max_size=12,
)
_VALUE = st.text(alphabet='abc XYZ019-/;=,.:\t"', max_size=20).map(lambda s: s.encode())
_SPECIAL_HEADERS = st.sampled_from(
    [
        (b"Host", b"example.test"),
        (b"host", b"Example.Test:8080"),
        (b"X-Shoal-Pool", b"api"),
        (b"x-shoal-pool", b" api "),
        (b"X-Forwarded-For", b"10.0.0.1"),
        (b"X-Forwarded-Host", b"elsewhere"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Request-Id", b"client-id-7"),
        (b"X-Request-Id", b"bad id"),
        (b"Connection", b"keep-alive"),
        (b"Connection", b"close"),
        (b"connection", b"Keep-Alive, TE"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-Sum"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Proxy-Connection", b"close"),
        (b"Expect", b"100-continue"),
        (b"Upgrade", b"websocket"),
        (b"Transfer-Encoding", b"gzip"),
        (b"Accept", b"*/*"),
    ]
)
_SEPARATOR = st.sampled_from([b": ", b":", b":  ", b": \t"])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD"]))
    target = draw(st.sampled_from([b"/", b"/a/b?x=1", b"/pools/api/run", b"/pools//x", b"/%7E"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            name, value = draw(_SPECIAL_HEADERS)
        else:
            name, value = draw(_TOKEN).encode(), draw(_VALUE).strip(b" \t")
        lines.append(name + draw(_SEPARATOR) + value + draw(st.sampled_from([b"", b" "])))
    body = draw(st.binary(max_size=40)) if method in (b"POST", b"PUT", b"PATCH") else b""
    if body or draw(st.booleans()):
        lines.append(b"Content-Length: %d" % len(body))
    return b"%b %b %b\r\n%b\r\n\r\n%b" % (
        method,
        target,
        version,
        b"".join(line + b"\r\n" for line in lines),
        body,
    )


def summary(dispatched: list[Exchange]) -> list[tuple[Any, ...]]:
    out = []
    for exchange in dispatched:
        seen = parse_request(exchange.head + b"".join(exchange.body))
        out.append(
            (
                seen.first,
                seen.headers,
                seen.body,
                exchange.pool,
                exchange.keep_alive,
                exchange.rid,
                exchange.body_done,
            )
        )
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_a_request_is_forwarded_alike_whole_or_in_parts(data: bytes) -> None:
    whole, split = (forward_request(pieces) for pieces in splits(data))
    assert summary(whole[0]) == summary(split[0])
    assert whole[1] == split[1]


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8800\r\nUser-Agent: wrk\r\n\r\n",
        b"GET /pools/api/x?y=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n",
        b"POST /run HTTP/1.1\r\nHost: a\r\nX-Shoal-Pool: api\r\nContent-Length: 2\r\n\r\n{}",
        b"PUT /k HTTP/1.1\r\nhost:a\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1\r\nX-Request-Id: r-1\r\n"
        b"Keep-Alive: 5\r\nTE: trailers\r\nCookie: a=b; c=d\r\n\r\n",
    ],
)
def test_the_fast_path_takes_plain_requests(head: bytes) -> None:
    """Keeps the property above from passing because the fast path took nothing."""
    client = ClientConnection(new_proxy())
    client.connection_made(FakeTransport())  # type: ignore[arg-type]
    client.proxy.dispatch = lambda exchange: None  # type: ignore[method-assign]
    assert client._fast_request(head) is True


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost : x\r\nContent-Length: 0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n Content-Length: 5\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nHost: x\nContent-Length: 5\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET http://a/b HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
    ],
)
def test_the_fast_path_leaves_ambiguous_requests_to_httptools(head: bytes) -> None:
    client = ClientConnection(new_proxy())
    client.connection_made(FakeTransport())  # type: ignore[arg-type]
    assert client._fast_request(head) is False


# -- responses --------------------------------------------------------------------------


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    status = draw(
        st.sampled_from(
            [
                b"200 OK",
                b"201 Created",
                b"404 Not Found",
                b"500 Oops",
                b"204 No Content",
                b"200",
                b"302 Found",
            ]
        )
    )
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            name, value = draw(
                st.sampled_from(
                    [
                        (b"Connection", b"keep-alive"),
                        (b"Connection", b"close"),
                        (b"Keep-Alive", b"timeout=5"),
                        (b"Server", b"nginx"),
                        (b"Date", b"Fri, 04 Dec 2026 18:53:37 GMT"),
                        (b"Content-Type", b"application/json"),
                        (b"Trailer", b"X-Sum"),
                        (b"Proxy-Connection", b"close"),
                    ]
                )
            )
        else:
            name, value = draw(_TOKEN).encode(), draw(_VALUE).strip(b" \t")
        lines.append(name + draw(_SEPARATOR) + value)
    body = draw(st.binary(max_size=40)) if not status.startswith(b"204") else b""
    if not status.startswith(b"204"):
        lines.insert(draw(st.integers(0, len(lines))), b"Content-Length: %d" % len(body))
    return b"HTTP/1.1 %b\r\n%b\r\n%b" % (status, b"".join(line + b"\r\n" for line in lines), body)


def response_summary(out: bytes) -> tuple[Any, ...]:
    seen = parse_response(out)
    return seen.first, seen.headers, seen.body, seen.complete


@settings(max_examples=300, deadline=None)
@given(responses())
def test_a_response_is_relayed_alike_whole_or_in_parts(data: bytes) -> None:
    (whole, whole_pooled), (split, split_pooled) = (relay_response(p) for p in splits(data))
    assert response_summary(whole) == response_summary(split)
    assert whole_pooled == split_pooled


def test_the_fast_response_path_rewrites_the_head_in_place() -> None:
    data = (
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 2\r\n"
        b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nok"
    )
    out, pooled = relay_response([data])
    assert out == (
        b"HTTP/1.1 200 OK\r\nX-Request-Id: rid-1\r\nServer: nginx\r\nContent-Length: 2\r\n\r\nok"
    )
    assert pooled is True
    closing, pooled = relay_response([data.replace(b"keep-alive", b"close")])
    assert pooled is False and b"onnection" not in closing


# -- the outbox ---------------------------------------------------------------------------


async def test_held_writes_leave_after_the_batch_in_order() -> None:
    proxy = new_proxy()
    client = ClientConnection(proxy)
    transport = FakeTransport()
    client.connection_made(transport)  # type: ignore[arg-type]

    client.write_soon(b"one ")
    client.write_soon(b"two ")
    assert transport.out == [], "nothing leaves while the loop is still in its batch"
    await asyncio.sleep(0)
    assert transport.out == [b"one two "], "one write for what was held"

    client.write_soon(b"three ")
    client.write(b"four")
    assert transport.out[1:] == [b"three ", b"four"], "a direct write sends the held first"
    await asyncio.sleep(0)
    assert len(transport.out) == 3, "nothing is sent twice"


async def test_a_closing_client_gets_what_was_held_and_a_dropped_worker_does_not() -> None:
    proxy = new_proxy()
    client = ClientConnection(proxy)
    client_transport = FakeTransport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    backend = Backend(worker_id="w1", name="w1", pool="default", host="127.0.0.1", port=1)
    worker = UpstreamConnection(proxy, backend)
    worker_transport = FakeTransport()
    worker.connection_made(worker_transport)  # type: ignore[arg-type]

    client.write_soon(b"last answer")
    client.close()
    worker.write_soon(b"GET / HTTP/1.1\r\n\r\n")
    worker.close()
    await asyncio.sleep(0)

    assert client_transport.out == [b"last answer"] and client_transport.closed
    assert worker_transport.out == [] and worker_transport.closed


async def test_a_connection_that_fails_to_send_does_not_hold_back_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(FakeTransport):
        def write(self, data: bytes) -> None:
            raise RuntimeError("the handle is closed")

    proxy = new_proxy()
    broken, fine = ClientConnection(proxy), ClientConnection(proxy)
    broken.connection_made(Broken())  # type: ignore[arg-type]
    fine_transport = FakeTransport()
    fine.connection_made(fine_transport)  # type: ignore[arg-type]

    broken.write_soon(b"lost")
    fine.write_soon(b"kept")
    await asyncio.sleep(0)

    assert fine_transport.out == [b"kept"]
    assert "could not send held bytes" in caplog.text
    fine.write_soon(b"again")
    await asyncio.sleep(0)
    assert fine_transport.out == [b"kept", b"again"], "the outbox is still in service"


# -- closing ------------------------------------------------------------------------------


async def test_a_closed_client_that_never_reads_is_cut_after_client_idle_s() -> None:
    """A graceful close waits for the client to read; one that never does would pin the
    socket and its buffers for ever."""
    proxy = new_proxy()
    client = ClientConnection(proxy)
    transport = FakeTransport()
    client.connection_made(transport)  # type: ignore[arg-type]
    transport.closed = False
    client.close()
    transport.closed = False  # still draining: the peer reads nothing
    proxy._sweep_once(client.closed_at + proxy.config.client_idle_s - 1)
    assert not transport.aborted
    proxy._sweep_once(client.closed_at + proxy.config.client_idle_s + 1)
    assert transport.aborted


async def test_a_reset_client_is_closed_even_when_its_half_close_fails() -> None:
    class ResetTransport(FakeTransport):
        def can_write_eof(self) -> bool:
            return True

        def write_eof(self) -> None:
            raise OSError(107, "Transport endpoint is not connected")

    proxy = new_proxy()
    client = ClientConnection(proxy)
    transport = ResetTransport()
    client.connection_made(transport)  # type: ignore[arg-type]
    client._refuse(400, "malformed request")
    assert transport.aborted and client.closed


async def test_a_post_still_in_the_outbox_when_its_worker_closes_goes_elsewhere() -> None:
    """Nothing of it reached the worker, so even a POST is safe to send again."""
    proxy = new_proxy()
    backend = Backend(worker_id="w1", name="w1", pool="default", host="127.0.0.1", port=1)
    proxy.on_change({"w1": backend})
    conn = UpstreamConnection(proxy, backend)
    worker_transport = FakeTransport()
    conn.connection_made(worker_transport)  # type: ignore[arg-type]
    client = ClientConnection(proxy)
    client_transport = FakeTransport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    exchange = Exchange(client, "POST")
    exchange.rid = b"rid-1"
    exchange.body_done = True
    client.queue.append(exchange)

    sent_again: list[Exchange] = []
    proxy._redispatch = sent_again.append  # type: ignore[method-assign]

    proxy._send(exchange, backend, conn)
    conn.connection_lost(None)  # the worker's close, read before the outbox was flushed
    await asyncio.sleep(0)

    assert worker_transport.out == [], "the request never left"
    assert sent_again == [exchange] and proxy.stats["errors"] == 0
    assert client_transport.out == [], "no 502 for a request that never reached a worker"
