"""The client side of the balancer's proxy: one ``asyncio.Protocol`` per client connection.

Owns parsing requests (httptools, plus a strict fast path for a plain HTTP/1.1 request
that arrives whole in one read), rewriting the head for a worker (hop-by-hop headers out;
``X-Forwarded-*`` and ``X-Request-Id`` in), answering pipelined requests in order,
streaming request bodies with flow control (a chunked body, which workers refuse, is
gathered up to the replay limit and sent with a Content-Length, else refused with 411),
and refusing what it cannot parse (400/501) or a head over the limit (431).
It does not choose workers, retry or time anything out: each parsed request becomes an
``Exchange`` handed to ``api.proxy.Proxy.dispatch``, which created this protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from typing import TYPE_CHECKING, cast

import httptools

from api.balancer import DEFAULT_POOL, POOL_HEADER, route_of
from api.proxy_exchange import (
    HOP_BY_HOP,
    PLAIN_CONNECTION,
    REASONS,
    REQUEST_HEAD,
    Exchange,
    HeldWriter,
    error_body,
    hop_by_hop_listed,
    listed_headers,
)

if TYPE_CHECKING:
    from api.proxy import Proxy
    from api.proxy_upstream import UpstreamConnection

# Headers about the client that only a proxy may set: a client's own are dropped (or,
# for X-Forwarded-For, appended to), so a worker cannot be told a made-up origin.
_REQUEST_OWN = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-proto",
        b"x-real-ip",
        b"x-request-id",
    }
)
# The fast path takes only what it fully understands; the rest goes through httptools.
# Header names the fast path must look at: framing and hop-by-hop ones, those the proxy
# sets itself, the Host and the pool header. Other lines pass through as they are.
_REQUEST_SPECIAL = re.compile(
    rb"\r\n(connection|keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade"
    rb"|expect|content-length|host|x-forwarded-for|x-forwarded-host|x-forwarded-port"
    rb"|x-forwarded-prefix|x-forwarded-proto|x-real-ip|x-request-id|"
    + re.escape(POOL_HEADER.encode())
    + rb"):([^\r]*)",
    re.IGNORECASE,
)
# Of those, the lines not forwarded (the proxy writes its own X-Forwarded-* and id).
_REQUEST_DROPPED = re.compile(
    rb"\r\n(?:connection|keep-alive|proxy-connection|te|trailer|x-forwarded-for"
    rb"|x-forwarded-host|x-forwarded-port|x-forwarded-prefix|x-forwarded-proto|x-real-ip"
    rb"|x-request-id):[^\r]*",
    re.IGNORECASE,
)
_FAST_REFUSED = frozenset({b"expect", b"transfer-encoding", b"upgrade"})
_HIGH_WATER = 256 * 1024
# After a refusal, what the client still sends is read and dropped for this long (or this
# much) before the close, so that the close does not reset the refusal away.
_LINGER_S = 2.0
_LINGER_BYTES = 4 * 1024 * 1024
POOL_HEADER_B = POOL_HEADER.encode()
POOLS_PREFIX = b"/pools/"


def origin_form(target: bytes) -> tuple[bytes, bytes]:
    """The path and query of an absolute-form target, and its authority (else empty).

    RFC 9112 section 3.2.2: a server must accept ``GET http://host/path``, and the
    authority in it wins over a Host header. Other targets are returned as they are.
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return target, b""
    cut = len(rest)
    for delimiter in (b"/", b"?"):
        at = rest.find(delimiter)
        if at != -1 and at < cut:
            cut = at
    path = rest[cut:]
    return (path if path.startswith(b"/") else b"/" + path), rest[:cut]


class ClientConnection(HeldWriter, asyncio.Protocol):
    """One connection from a client; requests on it are answered in order."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.outbox = proxy.outbox
        self._held_out = []
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = b"unknown"
        self.queue: list[Exchange] = []
        self.closed = False
        self.paused = False
        self.idle_since = proxy.now()
        self._parsing: Exchange | None = None
        self._url = b""
        # The header lines to forward (name, line led by CRLF), as httptools reads them.
        self._fields: list[tuple[bytes, bytes]] = []
        self._hosts = 0
        self._listed: set[bytes] = set()  # header names the Connection header lists
        self._codings = b""  # a Transfer-Encoding other than chunked, refused with 501
        self._host = b""
        self._pool_header: bytes | None = None
        self._forwarded_for = b""
        self._request_id = b""
        self._framing = b""
        self._in_message = False
        self._in_head = False
        self._head_bytes = 0
        self._linger_bytes = 0
        # An answer refusing a bad request, sent once the requests before it are answered.
        self._refusal = b""
        # The worker connection whose reading this client's full write buffer paused.
        self.paused_upstream: UpstreamConnection | None = None
        self.closed_at = 0.0

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
        if self.closed:
            self._drop(data)
            return
        if self._refusal:
            return  # read before the pause took hold; nothing after a bad request counts
        if not self._in_message and not self.queue and self._fast_request(data):
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(501, "protocol upgrades are not supported by the balancer")
            return
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed request: {exc}")
            return
        if self._in_head:
            # httptools buffers a header it has not seen the end of: bound what it may hold.
            self._head_bytes += len(data)
            if self._head_bytes > self.proxy.config.max_head_bytes:
                self._refuse_large_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.clients.discard(self)
        for exchange in self.queue:
            self.proxy.abandon(exchange)
        self.queue.clear()

    def pause_writing(self) -> None:
        if self.queue and self.queue[0].upstream is not None:
            self.paused_upstream = self.queue[0].upstream
            self.paused_upstream.pause_reading()

    def resume_writing(self) -> None:
        # NB: the worker connection paused for this client, not whatever queue[0] has now.
        upstream, self.paused_upstream = self.paused_upstream, None
        if upstream is not None and upstream.exchange is not None:
            if upstream.exchange.client is self:
                upstream.resume_reading()

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = True
        self._in_head = True
        self._head_bytes = 0
        self._url = b""
        self._fields = []
        self._host = b""
        self._hosts = 0
        self._listed = set()
        self._codings = b""
        self._pool_header = None
        self._forwarded_for = b""
        self._request_id = b""
        self._framing = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"content-length":
                self._framing = lname
                self._fields.append((lname, b"\r\nContent-Length: %b" % value))
            elif lname == b"transfer-encoding":
                self._framing = lname
                if value.strip(b" \t").lower() != b"chunked":
                    self._codings = value
            elif lname == b"connection" or lname == b"proxy-connection":
                self._listed |= hop_by_hop_listed(value)
            return
        if lname in _REQUEST_OWN:
            if lname == b"x-forwarded-for":
                self._forwarded_for = value
            elif lname == b"x-request-id":
                self._request_id = value
            return
        if lname == b"host":
            self._host = value
            self._hosts += 1
        elif lname == POOL_HEADER_B:
            self._pool_header = value
        self._fields.append((lname, b"\r\n%b: %b" % (name, value)))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self.closed or self._refusal:
            return
        parser = self.parser
        if parser.should_upgrade():
            return  # refused with 501 when httptools raises HttpParserUpgrade after this
        fields = self._fields
        size = len(self._url) + sum(len(line) for _, line in fields)
        if size > self.proxy.config.max_head_bytes:
            self._refuse_large_head()
            return
        version = parser.get_http_version()
        if version not in ("1.0", "1.1"):
            self._refuse(505, f"HTTP/{version} is not supported; send HTTP/1.1")
            return
        if self._hosts > 1 or (self._hosts == 0 and version == "1.1"):
            # RFC 9112 section 3.2: a server must answer 400 to either.
            self._refuse(400, "an HTTP/1.1 request needs exactly one Host header")
            return
        if self._codings:
            self._refuse(
                501,
                f"transfer coding {self._codings.decode('latin-1')!r} is not supported; "
                "send the body plain or only chunked",
            )
            return
        url = self._url
        if url[:1] != b"/":
            url, authority = origin_form(url)
            if authority:
                # RFC 9112 section 3.2.2: the target's authority replaces the Host header.
                self._host = authority
                host_line = (b"host", b"\r\nHost: %b" % authority)
                fields = [host_line, *(f for f in fields if f[0] != b"host")]
        listed = self._listed
        self._open(
            parser.get_method(),
            url,
            b"".join(line for lname, line in fields if lname not in listed),
            keep_alive=parser.should_keep_alive(),
            http10=version == "1.0",
            body=None,
        )

    def _open(
        self,
        method: bytes,
        url: bytes,
        fields: bytes,
        *,
        keep_alive: bool,
        http10: bool,
        body: bytes | None,
    ) -> None:
        """Turns a parsed head into an exchange and dispatches it.

        ``fields`` are the header lines to forward, each led by CRLF; ``body`` is the whole
        body when it came with the head, else None (it streams in through ``on_body``).
        """
        exchange = Exchange(self, method.decode("latin-1"))
        exchange.keep_alive = keep_alive
        exchange.http10 = http10
        exchange.chunked = self._framing == b"transfer-encoding"
        exchange.rid = self.proxy.request_id(self._request_id)
        if self._pool_header is None and not url.startswith(POOLS_PREFIX):
            pool, path = DEFAULT_POOL, url
        else:
            pool, path = route_of(url, self._pool_header)
            if path is url and url.startswith(POOLS_PREFIX):
                # ``/pools//x`` names no pool: unknown (404), not the default pool.
                pool = ""
        exchange.pool = pool
        peer = self.peer
        forwarded_for = self._forwarded_for + b", " + peer if self._forwarded_for else peer
        exchange.head = (
            b"%b %b HTTP/1.1%b\r\nX-Forwarded-For: %b\r\nX-Forwarded-Proto: http\r\n"
            b"X-Request-Id: %b%b%b\r\n\r\n"
        ) % (
            method,
            path,
            fields,
            forwarded_for,
            exchange.rid,
            b"\r\nX-Forwarded-Host: %b" % self._host if self._host else b"",
            b"\r\nX-Forwarded-Prefix: /pools/%b" % pool.encode("latin-1")
            if path is not url
            else b"",
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
        if body is None:
            # The body (if any) streams in: each part must come within client_idle_s.
            exchange.body_deadline = self.proxy.now() + self.proxy.config.client_idle_s
        if exchange.chunked:
            # Dispatched once the whole body is in (``on_message_complete``).
            return
        if len(self.queue) == 1:
            self.proxy.dispatch(exchange)
        else:
            # A pipelined request waits for the one before it; stop reading meanwhile.
            self.pause_reading()

    def _fast_request(self, data: bytes) -> bool:
        """Handles ``data`` when it is exactly one plain HTTP/1.1 request; else returns False.

        Most requests arrive whole in one read. This strict subset (origin-form target,
        RFC 9110 header lines, no Transfer-Encoding, Expect or Upgrade, one exact
        Content-Length, one Host) is checked and rewritten by a few regular expressions
        over the whole head, with no per-header Python work; anything else goes to
        httptools whole.
        """
        end = data.find(b"\r\n\r\n")
        if end < 0 or end > self.proxy.config.max_head_bytes:
            return False
        head = REQUEST_HEAD.fullmatch(data, 0, end)
        if head is None:
            return False
        method, target, fields = head.groups()
        host = b""
        hosts = 0
        pool_header: bytes | None = None
        forwarded_for = b""
        request_id = b""
        length = -1
        keep_alive = True
        drop = False
        for name, value in _REQUEST_SPECIAL.findall(fields):
            lname = name.lower()
            value = value.strip(b" \t")
            if lname == b"host":
                if hosts:
                    return False
                hosts += 1
                host = value
            elif lname == b"content-length":
                if length >= 0 or not value.isdigit():
                    return False
                length = int(value)
            elif lname == b"connection" or lname == b"proxy-connection":
                # NB: llhttp reads Proxy-Connection like Connection; so does this path.
                tokens = listed_headers(value)
                if not tokens <= PLAIN_CONNECTION:
                    return False  # an upgrade, or headers to drop: httptools' path
                keep_alive = keep_alive and b"close" not in tokens
                drop = True
            elif lname == POOL_HEADER_B:
                pool_header = value
            elif lname == b"x-forwarded-for":
                forwarded_for = value
                drop = True
            elif lname == b"x-request-id":
                request_id = value
                drop = True
            elif lname in _FAST_REFUSED:
                return False
            else:
                drop = True
        body = data[end + 4 :]
        if len(body) != max(length, 0) or not hosts:
            return False
        if drop:
            fields = _REQUEST_DROPPED.sub(b"", fields)
        self._host = host
        self._pool_header = pool_header
        self._forwarded_for = forwarded_for
        self._request_id = request_id
        self._framing = b"content-length" if length >= 0 else b""
        self._open(method, target, fields, keep_alive=keep_alive, http10=False, body=body)
        return True

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        if exchange is None:
            return
        exchange.body_size += len(body)
        exchange.body_deadline = self.proxy.now() + self.proxy.config.client_idle_s
        if exchange.chunked:
            # Workers refuse chunked bodies (411): gather it, then send it with a length.
            if exchange.body_size > self.proxy.config.replay_limit_bytes:
                self._parsing = None
                limit_kib = self.proxy.config.replay_limit_bytes // 1024
                self._refuse(
                    411,
                    f"a chunked request body over {limit_kib} KiB is not accepted; "
                    "send it with a Content-Length",
                )
                return
            exchange.body.append(body)
            return
        upstream = exchange.upstream
        if upstream is not None and exchange.sent:
            upstream.write(body)
            if exchange.replayable and exchange.body_size <= self.proxy.config.replay_limit_bytes:
                exchange.body.append(body)
            else:
                exchange.replayable = False
                exchange.body.clear()
        else:
            exchange.body.append(body)
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
        if exchange.sent:
            # The worker's time to answer runs from the end of the request, however slow.
            exchange.deadline = self.proxy.now() + self.proxy.config.upstream_timeout_s
        if exchange.chunked:
            exchange.chunked = False
            exchange.head = exchange.head[:-2] + b"Content-Length: %d\r\n\r\n" % exchange.body_size
            if self.queue and self.queue[0] is exchange:
                self.proxy.dispatch(exchange)

    # -- helpers ----------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None and not self.closed and not self._refusal:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Closes now: sends what is held, and cuts a lingering close short too."""
        transport = self.transport
        if transport is None:
            return
        if not self.closed:
            self.send_held()
            self.closed = True
            self.closed_at = self.proxy.now()
        if not transport.is_closing():
            transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """Answers a request that cannot be read with ``status``, then closes.

        Requests read whole before it still get their answers first, in order (a client
        matches answers to pipelined requests by their order); the request cut short is
        dropped, and nothing more is read.
        """
        if self._refusal:
            return  # the first refusal stands; nothing after it is read
        body = error_body(status, message, "")
        refusal = (
            b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%b" % (status, REASONS[status].encode(), len(body), body)
        )
        queue = self.queue
        while queue and not queue[-1].body_done:
            self.proxy.abandon(queue.pop())
        self._parsing = None
        if queue:
            self.pause_reading()
            self._refusal = refusal
            return
        self.write(refusal)
        self._linger()

    def _linger(self) -> None:
        """Half-closes, drops what the client still sends for a moment, then closes.

        Closing a socket with unread input sends a reset, which can destroy the answer
        before the client reads it (RFC 9112 section 9.6 asks for a graceful close).
        """
        transport = self.transport
        if transport is None or self.closed:
            return
        for exchange in self.queue:
            self.proxy.abandon(exchange)
        self.queue.clear()
        self.send_held()
        self.closed = True
        self.closed_at = self.proxy.now()
        if not transport.can_write_eof():
            transport.close()
            return
        try:
            transport.write_eof()
        except OSError:  # the client reset the connection already
            transport.abort()
            return
        if self.paused:
            # Read and drop what the client still sends, and see its close.
            self.paused = False
            transport.resume_reading()
        self._linger_bytes = _LINGER_BYTES
        asyncio.get_running_loop().call_later(_LINGER_S, transport.close)

    def _drop(self, data: bytes) -> None:
        self._linger_bytes -= len(data)
        if self._linger_bytes < 0 and self.transport is not None:
            self.transport.close()

    def time_out_body(self) -> None:
        """The request body stalled (nothing came for client_idle_s): 408, then close."""
        limit_s = self.proxy.config.client_idle_s
        self._refuse(408, f"the request body stalled: nothing of it arrived for {limit_s:g}s")

    def _refuse_large_head(self) -> None:
        limit_kib = self.proxy.config.max_head_bytes // 1024
        self._refuse(431, f"request head (request line and headers) over {limit_kib} KiB")

    def done(self, exchange: Exchange, now: float) -> None:
        """The response of ``exchange`` was written whole; move on to the next request."""
        queue = self.queue
        if queue and queue[0] is exchange:
            del queue[0]
        self.idle_since = now
        if not exchange.body_done:
            # Answered before its body was all read: the rest of it must not be taken for
            # the next request, so nothing more is read. A lingering close lets the client
            # read the answer rather than a reset (RFC 9112 section 9.6).
            self._parsing = None
            self._linger()
            return
        if not exchange.keep_alive or exchange.closing:
            self.close()
            return
        if queue:
            if not queue[0].chunked:
                self.proxy.dispatch(queue[0])
        elif self._refusal:
            refusal, self._refusal = self._refusal, b""
            self.write(refusal)
            self._linger()
            return
        if self.paused:
            self.resume_reading()
