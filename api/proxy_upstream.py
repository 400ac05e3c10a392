"""The worker side of the balancer's proxy: one keep-alive connection to a worker.

Owns parsing a worker's response (httptools, plus a strict fast path for one plain
response with a Content-Length that arrives whole) and relaying it to the client: head
rewritten, body re-framed (chunked, or until close under HTTP/1.0), one client write per
read, back-pressure passed both ways. It does not decide whether a connection is pooled,
retried or timed out: it reports to ``api.proxy.Proxy`` (``finish``, ``upstream_broken``,
``replay_refused``), which opens these connections and keeps the idle ones per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from typing import TYPE_CHECKING, cast

import httptools

from api.balancer import Backend
from api.proxy_exchange import (
    HOP_BY_HOP,
    PLAIN_CONNECTION,
    RESPONSE_HEAD,
    Exchange,
    HeldWriter,
    frame_chunk,
    hop_by_hop_listed,
    listed_headers,
)
from controller import logfields

if TYPE_CHECKING:
    from api.proxy import Proxy
    from api.proxy_client import ClientConnection

logger = logging.getLogger(__name__)

# A 429 passed on when every worker is busy: a slot frees within about a task's time.
_RETRY_AFTER_BUSY = b"Retry-After: 1"
# Framing and hop-by-hop header lines and the worker's X-Request-Id (whole line, name,
# value); of these, all but Content-Length are dropped.
_RESPONSE_SPECIAL = re.compile(
    rb"(\r\n(connection|keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade"
    rb"|content-length|x-request-id):([^\r]*))",
    re.IGNORECASE,
)


class UpstreamConnection(HeldWriter, asyncio.Protocol):
    """One keep-alive connection to a worker, carrying one exchange at a time."""

    def __init__(self, proxy: Proxy, backend: Backend) -> None:
        self.proxy = proxy
        self.outbox = proxy.outbox
        self._held_out = []
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.idle_since = 0.0
        self.closed = False
        self.reading_paused = False
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._listed: set[bytes] = set()
        self._framing = b""
        self._interim = False
        self._out_chunked = False
        self._until_close = False
        self._retrying = False
        # A final response was parsed whole in this read (``_reuse``: may the connection be
        # pooled); anything the worker sent after it (``_extra``) is never relayed.
        self._complete = False
        self._reuse = False
        self._extra = False
        self._in_message = False
        self._in_head = False
        self._head_bytes = 0
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
        if not self._in_message and self._fast_response(data, exchange):
            return
        # A response in parts: the timeout runs from its last read.
        exchange.deadline = self.proxy.now() + self.proxy.config.upstream_timeout_s
        client = exchange.client
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self._complete:
                self._flush(client)
                self.proxy.upstream_broken(self, f"bad response from worker: {exc}")
                return
            self._extra = True
        if self._complete:
            self._finish_message()
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.proxy.config.max_head_bytes:
                self._refuse_large_head()
                return
        self._flush(client)

    def _finish_message(self) -> None:
        """Relays the end of the response and hands the connection back to the proxy.

        RFC 9112 section 6.3: bytes after a complete response are neither relayed nor
        taken for the next response; the connection that sent them is not reused.
        """
        exchange = self.exchange
        self._complete = False
        if self._extra:
            self._extra = False
            self._reuse = False
            logger.warning(
                "worker %s sent bytes after its response (request %s); dropped them and "
                "its connection",
                self.backend.name,
                exchange.request_id if exchange is not None else "?",
                extra={logfields.WORKER_ID: self.backend.worker_id[:12]},
            )
        if exchange is not None:
            self._flush(exchange.client)
        self.proxy.finish(self, reuse=self._reuse)

    def _flush(self, client: ClientConnection) -> None:
        # One write per read: a response's head and body leave in one syscall.
        if self._pending:
            client.write(b"".join(self._pending) if len(self._pending) > 1 else self._pending[0])
            self._pending = []

    def _fast_response(self, data: bytes, exchange: Exchange) -> bool:
        """Relays ``data`` when it is exactly one plain response with a Content-Length.

        The same strict subset as the request side, checked and rewritten by regular
        expressions over the whole head; interim, bodiless, chunked and partial
        responses go through httptools.
        """
        end = data.find(b"\r\n\r\n")
        if end < 0 or end > self.proxy.config.max_head_bytes or exchange.method == "HEAD":
            return False
        head = RESPONSE_HEAD.fullmatch(data, 0, end)
        if head is None:
            return False
        status_line, code, fields = head.groups()
        length = -1
        keep_alive = True
        dropped: list[bytes] = []
        for line, name, value in _RESPONSE_SPECIAL.findall(fields):
            lname = name.lower()
            if lname == b"content-length":
                value = value.strip(b" \t")
                if length >= 0 or not value.isdigit():
                    return False
                length = int(value)
            elif lname == b"connection" or lname == b"proxy-connection":
                # NB: llhttp reads Proxy-Connection like Connection; so does this path.
                tokens = listed_headers(value)
                if not tokens <= PLAIN_CONNECTION:
                    return False  # it names headers to drop: httptools' path does that
                keep_alive = keep_alive and b"close" not in tokens
                dropped.append(line)
            elif lname == b"transfer-encoding" or lname == b"upgrade":
                return False
            else:
                dropped.append(line)
        if length < 0 or len(data) - end - 4 != length:
            return False
        for line in dropped:
            # NB: no line before a dropped one can start with its bytes (the pattern would
            # have matched that line first), so the first occurrence is the line itself.
            fields = fields.replace(line, b"", 1)
        if code == b"503" or code == b"429":
            if self.proxy.refused(exchange, int(code)):
                self.proxy.replay_refused(self, exchange)
                return True
            if code == b"429" and b"\r\nretry-after:" not in fields.lower():
                fields += b"\r\n" + _RETRY_AFTER_BUSY
        exchange.responded = True
        exchange.client.write_soon(
            b"HTTP/1.1 %b\r\nX-Request-Id: %b%b%b\r\n\r\n%b"
            % (
                status_line,
                exchange.rid,
                fields,
                b"" if exchange.keep_alive else b"\r\nConnection: close",
                data[end + 4 :],
            )
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
        if self._until_close and exchange.responded and exc is None:
            # The worker's close ends an answer without a length; a reset (exc) cuts it.
            self.on_message_complete()
            self._finish_message()
            return
        if self._held_out:
            # The request was still in the outbox: not a byte of it reached the worker.
            self._held_out = []
            exchange.sent = False
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
        if self._complete:
            self._extra = True
            return
        self._in_message = True
        self._in_head = True
        self._head_bytes = 0
        self._headers = []
        self._listed = set()
        self._framing = b""
        self._reason = b""
        self._until_close = False

    def on_status(self, status: bytes) -> None:
        if not self._extra:
            self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._extra:
            return
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"transfer-encoding" or lname == b"content-length":
                self._framing = lname
                if lname == b"content-length":
                    self._headers.append((lname, b"Content-Length: %b\r\n" % value))
            elif lname == b"connection" or lname == b"proxy-connection":
                self._listed |= hop_by_hop_listed(value)
            return
        if lname == b"x-request-id":
            return  # the balancer's own goes to the client
        self._headers.append((lname, b"%b: %b\r\n" % (name, value)))

    def on_headers_complete(self) -> None:
        self._in_head = False
        exchange = self.exchange
        if exchange is None or self._extra:
            return
        size = len(self._reason) + sum(len(line) for _, line in self._headers)
        if size > self.proxy.config.max_head_bytes:
            self._refuse_large_head()
            return
        status = self.parser.get_status_code()
        if status == 101 or not 100 <= status <= 599:
            self._pending = []
            why = (
                "the worker switched protocols (101), which the balancer does not relay"
                if status == 101
                else f"the worker answered status {status}"
            )
            self.proxy.upstream_broken(self, why, retry=False)
            return
        listed = self._listed
        # Headers the worker's Connection header names are hop-by-hop too (RFC 9110 7.6.1);
        # a response without a body states no Content-Length (RFC 9110 8.6).
        drop_length = status < 200 or status == 204
        head = [
            line
            for lname, line in self._headers
            if lname not in listed and not (drop_length and lname == b"content-length")
        ]
        if 100 <= status < 200:
            self._interim = True
            self._pending.append(
                b"HTTP/1.1 %d %b\r\n%b\r\n" % (status, self._reason, b"".join(head))
            )
            return
        if status == 503 or status == 429:
            if self.proxy.refused(exchange, status):
                # Refused unread (draining or busy): another worker gets it once this ends.
                self._retrying = True
                return
            if status == 429 and not any(h[:12].lower() == b"retry-after:" for h in head):
                head.append(_RETRY_AFTER_BUSY + b"\r\n")
        self._interim = False
        exchange.responded = True
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
            % (status, self._reason, exchange.rid, b"".join(head))
        )
        if exchange.method == "HEAD":
            self._flush(exchange.client)
            # httptools cannot be told a response has no body; never reuse this connection.
            self.proxy.finish(self, reuse=False)

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is None or self._retrying or self._extra:
            return
        self._pending.append(frame_chunk(body) if self._out_chunked else body)

    def on_message_complete(self) -> None:
        if self._extra:
            return
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
        # Finished once the parser is through this read (``_finish_message``), so that
        # bytes after the response are seen first.
        self._complete = True
        self._reuse = not self._until_close and not self.closed and self.parser.should_keep_alive()

    # -- helpers ----------------------------------------------------------------------

    def _refuse_large_head(self) -> None:
        limit_kib = self.proxy.config.max_head_bytes // 1024
        self._pending = []
        self.proxy.upstream_broken(
            self, f"the worker's response head is over {limit_kib} KiB", retry=False
        )

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Drops the connection; bytes it still had to send to the worker are dropped too.

        A connection is given up mid-request (timed out, abandoned, answered early) or
        idle: either way nothing left in its buffer is worth delivering, and a graceful
        close would wait for a worker that may never read them.
        """
        self._held_out = []  # a request held for a connection being dropped is not sent
        self.closed = True
        transport = self.transport
        if transport is not None:
            if transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()
