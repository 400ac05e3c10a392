"""The balancer's reverse proxy: HTTP/1.1 in, HTTP/1.1 to the live workers of a pool.

It owns the listening socket, the client and upstream connections, the
keep-alive pools, the activator (requests held while a pool scales from zero)
and health (passive ejection on a connect failure, active probes that bring a
worker back). It does not decide which workers exist: ``api.endpoints`` hands
it the routable set, and it never writes to the registry. Backend choice is
``api.balancer``'s.

The hot path is a pair of ``asyncio.Protocol`` objects with httptools parsers,
not an aiohttp app: a request is parsed once, its head rewritten (hop-by-hop
headers out; ``X-Forwarded-*`` and ``X-Request-Id`` in) and written to a pooled
upstream connection within the same callback when one is idle. Bodies stream
both ways with flow control. Errors become 502/503/504 JSON; a client never
sees a traceback.

Retries (issue 5): after a connect failure nothing was sent, so another worker
is tried for any method; a request that a worker may have started is only
retried when its method is idempotent; and a 503 from a worker that has left
the routing table (Shoal's worker refuses new work with 503 once draining) is
retried when the whole body is still held.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import httptools

from api.balancer import POOL_HEADER, Backend, Strategy, make_strategy, route_of
from api.endpoints import ControlPlane, PoolInfo
from controller import logfields

logger = logging.getLogger(__name__)

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",  # framing is re-declared by the proxy
    }
)
_REQUEST_OWN = frozenset(
    {b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-request-id"}
)
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_REQUEST_ID_OK = frozenset(range(0x21, 0x7F))
# The fast paths take only what they fully understand; the rest goes through httptools.
_FAST_METHODS = frozenset({b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"})
_FAST_REFUSED = frozenset({b"expect"})
_WS = (b" ", b"\t")
_HIGH_WATER = 256 * 1024


@dataclass(frozen=True)
class ProxyConfig:
    connect_timeout_s: float = 2.0
    # Time allowed for the response head, and then between two reads of its body.
    upstream_timeout_s: float = 300.0
    activation_timeout_s: float = 30.0
    # Pooled upstream connections are closed after this long idle (the worker's own is 75 s).
    upstream_idle_s: float = 30.0
    client_idle_s: float = 75.0
    max_idle_per_backend: int = 256
    max_tries: int = 3
    # Request bodies up to this size are kept so that a refused request can be replayed.
    replay_limit_bytes: int = 64 * 1024
    probe_interval_s: float = 1.0
    probe_path: str = "/healthz"
    retry_after_s: int = 5
    default_strategy: str = "least-connections"
    # While a pool gets traffic, capacity is asked for this often so it stays above zero.
    demand_interval_s: float = 5.0
    sweep_interval_s: float = 0.25


class _Reply(Exception):
    """An answer the proxy makes itself (404, 502, 503, 504)."""

    def __init__(self, status: int, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass
class _Pool:
    """The routing table of one pool, and the requests waiting for its first worker."""

    name: str
    strategy: Strategy
    backends: list[Backend] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    last_request_at: float = 0.0
    refused: bool = False
    asking: asyncio.Task[None] | None = None


class _Exchange:
    """One client request and its way through one or more upstream tries."""

    __slots__ = (
        "attempts",
        "backend",
        "body",
        "body_done",
        "body_size",
        "chunked",
        "client",
        "closing",
        "deadline",
        "head",
        "http10",
        "keep_alive",
        "method",
        "pool",
        "replayable",
        "request_id",
        "responded",
        "sent",
        "task",
        "tried",
        "upstream",
    )

    def __init__(self, client: _ClientConnection, method: str) -> None:
        self.client = client
        self.method = method
        self.head = b""
        self.pool = ""
        self.request_id = ""
        self.keep_alive = True
        self.http10 = False
        self.chunked = False
        # Body bytes not yet written upstream, then (up to the replay limit) kept for a replay.
        self.body: list[bytes] = []
        self.body_size = 0
        self.body_done = False
        self.replayable = True
        self.backend: Backend | None = None
        self.upstream: _UpstreamConnection | None = None
        self.sent = False  # bytes of this request went to a worker that may have read them
        self.responded = False  # the response head went to the client
        self.closing = False
        self.deadline = 0.0
        self.tried: set[str] = set()
        self.attempts = 0  # times the request was written to a worker
        self.task: asyncio.Task[None] | None = None


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _error_body(status: int, message: str, request_id: str) -> bytes:
    return json.dumps({"error": message, "status": status, "requestId": request_id}).encode()


class _UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a worker, carrying one exchange at a time."""

    def __init__(self, proxy: Proxy, backend: Backend) -> None:
        self.proxy = proxy
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.idle_since = 0.0
        self.closed = False
        self._reason = b""
        self._headers: list[bytes] = []
        self._framing = b""
        self._interim = False
        self._out_chunked = False
        self._until_close = False
        self._retrying = False
        self._in_message = False
        self._pending: list[bytes] = []

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # NB: uvloop's transports are not asyncio.Transport subclasses; no isinstance here.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # A worker does not speak unasked; whatever it is, this connection is done.
            self.close()
            return
        exchange.deadline = self.proxy.now() + self.proxy.config.upstream_timeout_s
        if not self._in_message and self._fast_response(data, exchange):
            return
        client = exchange.client
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._flush(client)
            self.proxy.upstream_broken(self, f"bad response from worker: {exc}")
            return
        self._flush(client)

    def _flush(self, client: _ClientConnection) -> None:
        # One write per read: a response's head and body leave in one syscall.
        if self._pending:
            client.write(b"".join(self._pending) if len(self._pending) > 1 else self._pending[0])
            self._pending = []

    def _fast_response(self, data: bytes, exchange: _Exchange) -> bool:
        """Relays ``data`` when it is exactly one plain response with a Content-Length.

        The same strict subset as the request side; interim, bodiless, chunked and
        partial responses go through httptools.
        """
        end = data.find(b"\r\n\r\n")
        if end < 0 or exchange.method == "HEAD":
            return False
        head = data[:end]
        lines = head.split(b"\r\n")
        status_line = lines[0]
        code = status_line[9:12]
        if (
            head.count(b"\n") != len(lines) - 1
            or status_line[:9] != b"HTTP/1.1 "
            or not code.isdigit()
            or code[:1] == b"1"
            or code in (b"204", b"304")
        ):
            return False
        length = -1
        keep_alive = True
        kept: list[bytes] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name[:1] in _WS or name[-1:] in _WS:
                return False
            lname = name.lower()
            if lname in _HOP_BY_HOP:
                if lname == b"content-length":
                    value = value.strip(b" \t")
                    if length >= 0 or not value.isdigit():
                        return False
                    length = int(value)
                elif lname == b"connection":
                    keep_alive = b"close" not in value.lower()
                elif lname == b"transfer-encoding" or lname == b"upgrade":
                    return False
                continue
            kept.append(line)
        if length < 0 or len(data) - end - 4 != length:
            return False
        if code == b"503" and self.proxy.may_replay_refusal(exchange):
            self.proxy.replay_refused(self, exchange)
            return True
        exchange.responded = True
        kept.append(b"Content-Length: %d" % length)
        if not exchange.keep_alive:
            kept.append(b"Connection: close")
        exchange.client.write(
            b"HTTP/1.1 %b\r\nX-Request-Id: %b\r\n%b\r\n\r\n%b"
            % (status_line[9:], exchange.request_id.encode(), b"\r\n".join(kept), data[end + 4 :])
        )
        self.proxy.finish(self, reuse=keep_alive and not self.closed)
        return True

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange = self.exchange
        if exchange is None:
            self.proxy.forget_idle(self)
            return
        if self._until_close and exchange.responded:
            self.on_message_complete()
            return
        self.proxy.upstream_broken(
            self, "worker closed the connection" if exc is None else str(exc)
        )

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.pause_reading()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.resume_reading()

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = True
        self._headers = []
        self._framing = b""
        self._reason = b""
        self._until_close = False

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname in _HOP_BY_HOP:
            if lname == b"transfer-encoding" or lname == b"content-length":
                self._framing = lname
                if lname == b"content-length":
                    self._headers.append(b"Content-Length: %b\r\n" % value)
            return
        self._headers.append(b"%b: %b\r\n" % (name, value))

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True
            if status != 101:
                self._pending.append(
                    b"HTTP/1.1 %d %b\r\n%b\r\n" % (status, self._reason, b"".join(self._headers))
                )
            return
        if status == 503 and self.proxy.may_replay_refusal(exchange):
            # The worker left routing (draining) and refused the request unread: try another.
            self._retrying = True
            return
        self._interim = False
        exchange.responded = True
        head = self._headers
        no_body = exchange.method == "HEAD" or status in (204, 304)
        if no_body:
            self._out_chunked = False
        elif self._framing == b"transfer-encoding":
            if exchange.http10:
                exchange.keep_alive = False
                self._out_chunked = False
            else:
                head.append(b"Transfer-Encoding: chunked\r\n")
                self._out_chunked = True
        elif self._framing == b"":
            # Read until the worker closes: the client gets chunks, or a close under HTTP/1.0.
            self._until_close = True
            if exchange.http10:
                exchange.keep_alive = False
                self._out_chunked = False
            else:
                head.append(b"Transfer-Encoding: chunked\r\n")
                self._out_chunked = True
        else:
            self._out_chunked = False
        if not exchange.keep_alive:
            head.append(b"Connection: close\r\n")
        self._pending.append(
            b"HTTP/1.1 %d %b\r\nX-Request-Id: %b\r\n%b\r\n"
            % (status, self._reason, exchange.request_id.encode(), b"".join(head))
        )
        if exchange.method == "HEAD":
            self._flush(exchange.client)
            # httptools cannot be told a response has no body; never reuse this connection.
            self.proxy.finish(self, reuse=False)

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is None or self._retrying:
            return
        self._pending.append(_chunk(body) if self._out_chunked else body)

    def on_message_complete(self) -> None:
        self._in_message = False
        if self._interim:
            self._interim = False
            return
        exchange = self.exchange
        if exchange is None:
            return
        if self._retrying:
            self._retrying = False
            self.proxy.replay_refused(self, exchange)
            return
        if self._out_chunked:
            self._pending.append(b"0\r\n\r\n")
        self._flush(exchange.client)
        self.proxy.finish(
            self,
            reuse=not self._until_close and not self.closed and self.parser.should_keep_alive(),
        )

    # -- helpers ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _ClientConnection(asyncio.Protocol):
    """One connection from a client; requests on it are answered in order."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = b"unknown"
        self.queue: list[_Exchange] = []
        self.closed = False
        self.paused = False
        self.idle_since = proxy.now()
        self._parsing: _Exchange | None = None
        self._url = b""
        self._headers: list[bytes] = []
        self._host = b""
        self._pool_header: bytes | None = None
        self._forwarded_for = b""
        self._request_id = b""
        self._framing = b""
        self._in_message = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = str(peer[0]).encode()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.proxy.clients.add(self)

    def data_received(self, data: bytes) -> None:
        if not self._in_message and not self.queue and self._fast_request(data):
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(501, "protocol upgrades are not supported by the balancer")
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.clients.discard(self)
        for exchange in self.queue:
            self.proxy.abandon(exchange)
        self.queue.clear()

    def pause_writing(self) -> None:
        if self.queue and self.queue[0].upstream is not None:
            transport = self.queue[0].upstream.transport
            if transport is not None:
                transport.pause_reading()

    def resume_writing(self) -> None:
        if self.queue and self.queue[0].upstream is not None:
            transport = self.queue[0].upstream.transport
            if transport is not None:
                transport.resume_reading()

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = True
        self._url = b""
        self._headers = []
        self._host = b""
        self._pool_header = None
        self._forwarded_for = b""
        self._request_id = b""
        self._framing = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname in _HOP_BY_HOP:
            if lname == b"transfer-encoding" or lname == b"content-length":
                self._framing = lname
                if lname == b"content-length":
                    self._headers.append(b"Content-Length: %b\r\n" % value)
            return
        if lname in _REQUEST_OWN:
            if lname == b"x-forwarded-for":
                self._forwarded_for = value
            elif lname == b"x-request-id":
                self._request_id = value
            return
        if lname == b"host":
            self._host = value
        elif lname == POOL_HEADER_B:
            self._pool_header = value
        self._headers.append(b"%b: %b\r\n" % (name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        self._open(
            parser.get_method(),
            keep_alive=parser.should_keep_alive(),
            http10=parser.get_http_version() == "1.0",
            body=None,
        )

    def _open(self, method: bytes, *, keep_alive: bool, http10: bool, body: bytes | None) -> None:
        """Turns the parsed head into an exchange; ``body`` is the whole body when known."""
        exchange = _Exchange(self, method.decode("latin-1"))
        exchange.keep_alive = keep_alive
        exchange.http10 = http10
        exchange.chunked = self._framing == b"transfer-encoding"
        exchange.request_id = self.proxy.request_id(self._request_id)
        pool, path = route_of(self._url, self._pool_header)
        exchange.pool = pool
        forwarded_for = (
            self._forwarded_for + b", " + self.peer if self._forwarded_for else self.peer
        )
        extra = [
            b"X-Forwarded-For: %b\r\nX-Forwarded-Proto: http\r\n" % forwarded_for,
            b"X-Request-Id: %b\r\n" % exchange.request_id.encode(),
        ]
        if self._host:
            extra.append(b"X-Forwarded-Host: %b\r\n" % self._host)
        if path is not self._url:
            extra.append(b"X-Forwarded-Prefix: /pools/%b\r\n" % pool.encode("latin-1"))
        if exchange.chunked:
            extra.append(b"Transfer-Encoding: chunked\r\n")
        exchange.head = b"%b %b HTTP/1.1\r\n%b%b\r\n" % (
            method,
            path,
            b"".join(self._headers),
            b"".join(extra),
        )
        if body is not None:
            if body:
                exchange.body.append(body)
                exchange.body_size = len(body)
                exchange.replayable = len(body) <= self.proxy.config.replay_limit_bytes
            exchange.body_done = True
        else:
            self._parsing = exchange
        self.queue.append(exchange)
        if len(self.queue) == 1:
            self.proxy.dispatch(exchange)
        else:
            # A pipelined request waits for the one before it; stop reading meanwhile.
            self.pause_reading()

    def _fast_request(self, data: bytes) -> bool:
        """Handles ``data`` when it is exactly one plain HTTP/1.1 request; else returns False.

        Most requests arrive whole in one read. This strict subset (origin-form target,
        no folding, no Transfer-Encoding, Expect or Upgrade, an exact Content-Length)
        skips httptools' per-header callbacks; anything else goes to httptools whole.
        """
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = data[:end]
        lines = head.split(b"\r\n")
        if head.count(b"\n") != len(lines) - 1 or b"\x00" in head:
            return False
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1" or parts[0] not in _FAST_METHODS:
            return False
        target = parts[1]
        if target[:1] != b"/":
            return False
        headers: list[bytes] = []
        host = b""
        pool_header: bytes | None = None
        forwarded_for = b""
        request_id = b""
        length = -1
        keep_alive = True
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name[:1] in _WS or name[-1:] in _WS:
                return False
            lname = name.lower()
            value = value.strip(b" \t")
            if lname in _HOP_BY_HOP or lname in _FAST_REFUSED:
                if lname == b"content-length":
                    if length >= 0 or not value.isdigit():
                        return False
                    length = int(value)
                    headers.append(b"Content-Length: %b\r\n" % value)
                elif lname == b"connection":
                    tokens = value.lower()
                    if b"upgrade" in tokens:
                        return False
                    keep_alive = b"close" not in tokens
                elif lname in _FAST_REFUSED or lname in (b"transfer-encoding", b"upgrade"):
                    return False
                continue
            if lname in _REQUEST_OWN:
                if lname == b"x-forwarded-for":
                    forwarded_for = value
                elif lname == b"x-request-id":
                    request_id = value
                continue
            if lname == b"host":
                host = value
            elif lname == POOL_HEADER_B:
                pool_header = value
            headers.append(line + b"\r\n")
        body = data[end + 4 :]
        if len(body) != max(length, 0):
            return False
        self._url = target
        self._headers = headers
        self._host = host
        self._pool_header = pool_header
        self._forwarded_for = forwarded_for
        self._request_id = request_id
        self._framing = b"content-length" if length >= 0 else b""
        self._open(parts[0], keep_alive=keep_alive, http10=False, body=body)
        return True

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        if exchange is None:
            return
        chunk = _chunk(body) if exchange.chunked else body
        exchange.body_size += len(body)
        upstream = exchange.upstream
        if upstream is not None and exchange.sent:
            upstream.write(chunk)
            if exchange.replayable and exchange.body_size <= self.proxy.config.replay_limit_bytes:
                exchange.body.append(chunk)
            else:
                exchange.replayable = False
                exchange.body.clear()
        else:
            exchange.body.append(chunk)
            if exchange.body_size > self.proxy.config.replay_limit_bytes:
                # Held until a worker is found; stop reading so memory stays bounded.
                self.pause_reading()

    def on_message_complete(self) -> None:
        self._in_message = False
        exchange = self._parsing
        self._parsing = None
        if exchange is None:
            return
        exchange.body_done = True
        if exchange.chunked:
            if exchange.upstream is not None and exchange.sent:
                exchange.upstream.write(b"0\r\n\r\n")
                exchange.body.append(b"0\r\n\r\n")
            else:
                exchange.body.append(b"0\r\n\r\n")

    # -- helpers ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        body = _error_body(status, message, "")
        self.write(
            b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%b" % (status, _REASONS[status].encode(), len(body), body)
        )
        self.close()

    def done(self, exchange: _Exchange) -> None:
        """The response of ``exchange`` was written whole; move on to the next request."""
        if self.queue and self.queue[0] is exchange:
            self.queue.pop(0)
        self.idle_since = self.proxy.now()
        if not exchange.keep_alive or exchange.closing or not exchange.body_done:
            self.close()
            return
        if self.queue:
            self.proxy.dispatch(self.queue[0])
        self.resume_reading()


POOL_HEADER_B = POOL_HEADER.encode()


class Proxy:
    """The balancer's proxy server: routing table, connection pools, activator and probes."""

    def __init__(
        self,
        control: ControlPlane,
        *,
        config: ProxyConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.control = control
        self.config = config or ProxyConfig()
        self.now = clock
        self.pools: dict[str, _Pool] = {}
        self.routable: dict[str, Backend] = {}
        self.load: dict[str, int] = {}
        self.idle: dict[str, list[_UpstreamConnection]] = {}
        self.busy: set[_UpstreamConnection] = set()
        self.clients: set[_ClientConnection] = set()
        self.ejected: dict[str, Backend] = {}
        self.stats: dict[str, int] = {
            "requests": 0,
            "retries": 0,
            "ejections": 0,
            "activations": 0,
            "errors": 0,
        }
        self._rid_prefix = secrets.token_hex(4)
        self._rid_counter = itertools.count(1)
        self._servers: list[asyncio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._slow: set[asyncio.Task[None]] = set()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, *, host: str, port: int, reuse_port: bool = False) -> int:
        """Follows the control plane, listens, and returns the bound port."""
        await self.control.start(self.on_change, self.on_gone)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _ClientConnection(self),
            host=host,
            port=port,
            reuse_port=reuse_port or None,
            backlog=1024,
        )
        self._servers.append(server)
        self._tasks = [
            loop.create_task(self._sweep(), name="balancer-sweep"),
            loop.create_task(self._probe_loop(), name="balancer-probes"),
            loop.create_task(self._demand_loop(), name="balancer-demand"),
        ]
        bound: int = server.sockets[0].getsockname()[1]
        return bound

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in [*self._tasks, *self._slow]:
            task.cancel()
        for task in [*self._tasks, *self._slow]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for client in list(self.clients):
            client.close()
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
        for conn in list(self.busy):
            conn.close()
        self.idle.clear()
        for server in self._servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout=1.0)
        self._servers = []
        await self.control.close()

    # -- routing table ------------------------------------------------------------------

    def on_change(self, backends: Mapping[str, Backend]) -> None:
        """The routable set changed: rebuild pool tables, drop connections to leavers."""
        left = [worker_id for worker_id in self.routable if worker_id not in backends]
        self.routable = dict(backends)
        by_pool: dict[str, list[Backend]] = {}
        for backend in backends.values():
            by_pool.setdefault(backend.pool, []).append(backend)
        for name in set(by_pool) | set(self.pools):
            pool = self._pool(name)
            pool.backends = sorted(by_pool.get(name, []), key=lambda b: b.worker_id)
            if self._choose(pool) is not None:
                self._wake(pool)
        for worker_id in left:
            self.ejected.pop(worker_id, None)
            self.load.pop(worker_id, None)
            # NB: idle connections to a worker that left are closed now, so none is reused
            # after its container is stopped; requests in flight on it finish normally.
            for conn in self.idle.pop(worker_id, []):
                conn.close()

    def on_gone(self, worker_id: str) -> None:
        """A worker left the registry, so its container is stopped: end what is still on it."""
        for conn in [c for c in self.busy if c.backend.worker_id == worker_id]:
            self.upstream_broken(conn, "the worker is gone")

    def _pool(self, name: str, info: PoolInfo | None = None) -> _Pool:
        pool = self.pools.get(name)
        if pool is None:
            strategy_name = info.strategy if info is not None else self.config.default_strategy
            pool = _Pool(name=name, strategy=make_strategy(strategy_name))
            self.pools[name] = pool
        elif info is not None and info.strategy != pool.strategy.name:
            pool.strategy = make_strategy(info.strategy)
        return pool

    def _choose(self, pool: _Pool, exclude: set[str] | None = None) -> Backend | None:
        ejected = self.ejected
        if ejected:
            skip = set(ejected) if exclude is None else exclude | set(ejected)
        else:
            skip = exclude or set()
        return pool.strategy.pick(pool.backends, self.load, exclude=skip)

    def _wake(self, pool: _Pool) -> None:
        waiters, pool.waiters = pool.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- request flow -------------------------------------------------------------------

    def request_id(self, given: bytes) -> str:
        if given and len(given) <= 128 and all(c in _REQUEST_ID_OK for c in given):
            return given.decode("ascii")
        return f"{self._rid_prefix}-{next(self._rid_counter):x}"

    def dispatch(self, exchange: _Exchange) -> None:
        """Starts ``exchange``: at once when a pooled connection is idle, else in a task."""
        self.stats["requests"] += 1
        exchange.deadline = self.now() + self.config.upstream_timeout_s
        info = self.control.pools().get(exchange.pool)
        if info is not None:
            pool = self._pool(exchange.pool, info)
            pool.last_request_at = self.now()
            backend = self._choose(pool)
            if backend is not None:
                conns = self.idle.get(backend.worker_id)
                if conns:
                    self._send(exchange, backend, conns.pop())
                    return
        else:
            backend = None
        task = asyncio.get_running_loop().create_task(self._dispatch_slow(exchange, backend))
        exchange.task = task
        self._slow.add(task)
        task.add_done_callback(self._slow.discard)

    async def _dispatch_slow(self, exchange: _Exchange, chosen: Backend | None = None) -> None:
        try:
            pool = await self._pool_for(exchange.pool)
            pool.last_request_at = self.now()
            for _ in range(self.config.max_tries):
                # NB: reuse the fast path's choice, or a rotating strategy would skip a turn.
                backend, chosen = chosen or self._choose(pool, exchange.tried), None
                if backend is None:
                    backend = await self._activate(pool, exchange)
                conns = self.idle.get(backend.worker_id)
                conn = conns.pop() if conns else await self._connect(backend, exchange)
                if conn is not None:
                    self._send(exchange, backend, conn)
                    return
                self.stats["retries"] += 1
            raise _Reply(502, f"no worker of pool {pool.name!r} could be reached")
        except _Reply as reply:
            self.reply_error(exchange, reply)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("balancer failed to route a request")
            self.reply_error(exchange, _Reply(502, "balancer error; see its log"))
        finally:
            exchange.task = None

    async def _pool_for(self, name: str) -> _Pool:
        info = self.control.pools().get(name)
        if info is None:
            await self.control.refresh_pools()
            info = self.control.pools().get(name)
        if info is None:
            raise _Reply(404, f"unknown pool {name!r}")
        return self._pool(name, info)

    async def _activate(self, pool: _Pool, exchange: _Exchange) -> Backend:
        """Holds the request until the pool has a routable worker (scale from zero)."""
        info = self.control.pools().get(pool.name)
        if info is not None and info.max_replicas == 0:
            raise _Reply(
                503,
                f"pool {pool.name!r} has max 0 replicas",
                retry_after_s=self.config.retry_after_s,
            )
        self.stats["activations"] += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.activation_timeout_s
        pool.refused = False
        while True:
            backend = self._choose(pool, exchange.tried)
            if backend is None and exchange.tried:
                # Every worker failed once for this request; a fresh one may have joined since.
                backend = self._choose(pool)
            if backend is not None:
                return backend
            if pool.refused:
                raise _Reply(
                    503,
                    f"pool {pool.name!r} cannot scale up",
                    retry_after_s=self.config.retry_after_s,
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _Reply(
                    503,
                    f"no worker of pool {pool.name!r} became ready within "
                    f"{self.config.activation_timeout_s:g}s",
                    retry_after_s=self.config.retry_after_s,
                )
            self._ask_capacity(pool)
            waiter: asyncio.Future[None] = loop.create_future()
            pool.waiters.append(waiter)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter, timeout=min(remaining, 1.0))

    def _ask_capacity(self, pool: _Pool) -> None:
        if pool.asking is not None:
            return

        async def ask() -> None:
            try:
                answer = await self.control.request_capacity(pool.name)
                if answer is False:
                    pool.refused = True
                    self._wake(pool)
                else:
                    # Asked (or unsure): ask again a little later while requests still wait.
                    await asyncio.sleep(self.config.demand_interval_s)
            finally:
                pool.asking = None

        pool.asking = asyncio.get_running_loop().create_task(ask(), name=f"activate-{pool.name}")
        self._slow.add(pool.asking)
        pool.asking.add_done_callback(self._slow.discard)

    async def _connect(self, backend: Backend, exchange: _Exchange) -> _UpstreamConnection | None:
        """Opens a connection; a failure ejects the worker and returns None (nothing was sent)."""
        loop = asyncio.get_running_loop()
        exchange.tried.add(backend.worker_id)
        try:
            _transport, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _UpstreamConnection(self, backend), backend.host, backend.port
                ),
                timeout=self.config.connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            self.eject(backend, f"connect failed: {exc or 'timeout'}")
            return None
        if backend.worker_id not in self.routable:
            # It left routing while we connected: do not start anything on it.
            conn.close()
            return None
        return conn

    def _send(self, exchange: _Exchange, backend: Backend, conn: _UpstreamConnection) -> None:
        exchange.backend = backend
        exchange.upstream = conn
        exchange.tried.add(backend.worker_id)
        exchange.attempts += 1
        conn.exchange = exchange
        self.busy.add(conn)
        self.load[backend.worker_id] = self.load.get(backend.worker_id, 0) + 1
        exchange.sent = True
        if exchange.body:
            conn.write(exchange.head + b"".join(exchange.body))
        else:
            conn.write(exchange.head)
        if exchange.body_size > self.config.replay_limit_bytes:
            exchange.replayable = False
        if not exchange.replayable:
            exchange.body.clear()
        exchange.client.resume_reading()

    def finish(self, conn: _UpstreamConnection, *, reuse: bool) -> None:
        """The response came whole: free the worker's slot, pool the connection, go on."""
        exchange = conn.exchange
        conn.exchange = None
        self.busy.discard(conn)
        if exchange is None:
            return
        self._release(exchange)
        exchange.upstream = None
        if reuse and conn.backend.worker_id in self.routable and not conn.closed:
            conns = self.idle.setdefault(conn.backend.worker_id, [])
            if len(conns) < self.config.max_idle_per_backend:
                conn.idle_since = self.now()
                conns.append(conn)
            else:
                conn.close()
        else:
            conn.close()
        exchange.client.done(exchange)

    def _release(self, exchange: _Exchange) -> None:
        backend = exchange.backend
        if backend is not None:
            count = self.load.get(backend.worker_id, 0)
            if count > 1:
                self.load[backend.worker_id] = count - 1
            else:
                self.load.pop(backend.worker_id, None)
        exchange.backend = None

    def forget_idle(self, conn: _UpstreamConnection) -> None:
        conns = self.idle.get(conn.backend.worker_id)
        if conns and conn in conns:
            conns.remove(conn)

    def may_replay_refusal(self, exchange: _Exchange) -> bool:
        backend = exchange.backend
        return (
            backend is not None
            and backend.worker_id not in self.routable
            and exchange.replayable
            and exchange.body_done
            and exchange.attempts < self.config.max_tries
        )

    def replay_refused(self, conn: _UpstreamConnection, exchange: _Exchange) -> None:
        """A worker that left routing refused the request with 503; another worker gets it."""
        conn.exchange = None
        self.busy.discard(conn)
        conn.close()
        self._release(exchange)
        exchange.upstream = None
        exchange.sent = False
        self.stats["retries"] += 1
        logger.debug("request %s refused by a draining worker; retrying", exchange.request_id)
        self._redispatch(exchange)

    def _redispatch(self, exchange: _Exchange) -> None:
        if exchange.client.closed:
            return
        task = asyncio.get_running_loop().create_task(self._dispatch_slow(exchange))
        exchange.task = task
        self._slow.add(task)
        task.add_done_callback(self._slow.discard)

    def upstream_broken(self, conn: _UpstreamConnection, why: str) -> None:
        """The worker's connection failed mid-exchange: retry if safe, else 502 or cut."""
        exchange = conn.exchange
        conn.exchange = None
        self.busy.discard(conn)
        conn.close()
        if exchange is None:
            self.forget_idle(conn)
            return
        backend = exchange.backend
        self._release(exchange)
        exchange.upstream = None
        if exchange.responded:
            # Part of the answer is out: the client must see the cut.
            logger.warning(
                "worker %s broke off a response (request %s): %s",
                conn.backend.name,
                exchange.request_id,
                why,
                extra={logfields.WORKER_ID: conn.backend.worker_id[:12]},
            )
            exchange.closing = True
            exchange.client.close()
            return
        safe = exchange.method in _IDEMPOTENT and exchange.replayable and exchange.body_done
        if safe and exchange.attempts < self.config.max_tries:
            self.stats["retries"] += 1
            self._redispatch(exchange)
            return
        self.stats["errors"] += 1
        logger.warning(
            "request %s to worker %s failed after it was sent; not retried (%s): %s",
            exchange.request_id,
            backend.name if backend else "?",
            exchange.method,
            why,
        )
        self.reply_error(exchange, _Reply(502, f"the worker failed before answering: {why}"))

    def abandon(self, exchange: _Exchange) -> None:
        """The client went away: cancel the wait, or drop the half-used upstream connection."""
        if exchange.task is not None:
            exchange.task.cancel()
        conn = exchange.upstream
        if conn is not None:
            conn.exchange = None
            self.busy.discard(conn)
            conn.close()
            self._release(exchange)
            exchange.upstream = None

    def reply_error(self, exchange: _Exchange, reply: _Reply) -> None:
        client = exchange.client
        if client.closed:
            return
        if reply.status >= 500:
            self.stats["errors"] += 1
        body = _error_body(reply.status, str(reply), exchange.request_id)
        extra = b""
        if reply.retry_after_s is not None:
            extra = b"Retry-After: %d\r\n" % reply.retry_after_s
        keep = exchange.keep_alive and exchange.body_done
        exchange.closing = not keep
        client.write(
            b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"X-Request-Id: %b\r\n%b%b\r\n%b"
            % (
                reply.status,
                _REASONS.get(reply.status, "Error").encode(),
                len(body),
                exchange.request_id.encode(),
                extra,
                b"" if keep else b"Connection: close\r\n",
                body,
            )
        )
        client.done(exchange)

    # -- health ------------------------------------------------------------------------

    def eject(self, backend: Backend, why: str) -> None:
        if backend.worker_id in self.ejected or backend.worker_id not in self.routable:
            return
        self.ejected[backend.worker_id] = backend
        self.stats["ejections"] += 1
        for conn in self.idle.pop(backend.worker_id, []):
            conn.close()
        logger.warning(
            "ejected worker %s (%s) until its next good probe: %s",
            backend.name,
            backend.address,
            why,
            extra={logfields.WORKER_ID: backend.worker_id[:12], logfields.POOL: backend.pool},
        )

    async def probe(self, backend: Backend) -> bool:
        """One ``GET /healthz`` on a fresh connection; True on a 200."""
        request = (
            f"GET {self.config.probe_path} HTTP/1.1\r\nHost: {backend.address}\r\n"
            "Connection: close\r\nUser-Agent: shoal-balancer\r\n\r\n"
        ).encode()
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(backend.host, backend.port),
                timeout=self.config.connect_timeout_s,
            )
            writer.write(request)
            line = await asyncio.wait_for(reader.readline(), timeout=self.config.connect_timeout_s)
            parts = line.split()
            return len(parts) >= 2 and parts[1] == b"200"
        except (OSError, TimeoutError, ValueError):
            return False
        finally:
            if writer is not None:
                writer.close()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.probe_interval_s)
            ejected = list(self.ejected.values())
            if not ejected:
                continue
            results = await asyncio.gather(*(self.probe(b) for b in ejected))
            for backend, ok in zip(ejected, results, strict=True):
                if ok and self.ejected.pop(backend.worker_id, None) is not None:
                    logger.info(
                        "worker %s passed a probe; routing to it again",
                        backend.name,
                        extra={logfields.WORKER_ID: backend.worker_id[:12]},
                    )
                    pool = self.pools.get(backend.pool)
                    if pool is not None:
                        self._wake(pool)

    async def _demand_loop(self) -> None:
        """Tells the reconciler a pool with traffic is wanted, so it does not go to zero."""
        while True:
            await asyncio.sleep(self.config.demand_interval_s)
            horizon = self.now() - self.config.demand_interval_s
            for pool in list(self.pools.values()):
                if pool.last_request_at >= horizon:
                    with contextlib.suppress(Exception):
                        await self.control.request_capacity(pool.name)

    async def _sweep(self) -> None:
        """Times out slow workers (504), idle pooled connections and idle clients."""
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            now = self.now()
            for conn in list(self.busy):
                exchange = conn.exchange
                if exchange is not None and now > exchange.deadline:
                    self._time_out(conn, exchange)
            idle_limit = now - self.config.upstream_idle_s
            for worker_id, conns in list(self.idle.items()):
                keep = [c for c in conns if c.idle_since >= idle_limit and not c.closed]
                for conn in conns:
                    if conn not in keep:
                        conn.close()
                self.idle[worker_id] = keep
            client_limit = now - self.config.client_idle_s
            for client in list(self.clients):
                if not client.queue and client.idle_since < client_limit:
                    client.close()

    def _time_out(self, conn: _UpstreamConnection, exchange: _Exchange) -> None:
        conn.exchange = None
        self.busy.discard(conn)
        conn.close()
        self._release(exchange)
        exchange.upstream = None
        logger.warning(
            "worker %s did not answer request %s within %gs",
            conn.backend.name,
            exchange.request_id,
            self.config.upstream_timeout_s,
            extra={logfields.WORKER_ID: conn.backend.worker_id[:12]},
        )
        if exchange.responded:
            exchange.closing = True
            exchange.client.close()
            return
        self.reply_error(exchange, _Reply(504, "the worker did not answer in time"))

    def snapshot(self) -> dict[str, Any]:
        """Counters and the routing table, for status pages and tests."""
        return {
            **self.stats,
            "pools": {
                name: {
                    "strategy": pool.strategy.name,
                    "backends": [b.name for b in pool.backends],
                    "waiting": len(pool.waiters),
                }
                for name, pool in self.pools.items()
            },
            "ejected": sorted(b.name for b in self.ejected.values()),
            "inFlight": dict(self.load),
        }
