"""One proxied request's record, and the HTTP/1.1 framing both sides of the proxy share.

Owns ``Exchange`` (a client request on its way through one or more upstream tries: the
rewritten head, the body held for a replay, which worker has it and what was sent), the
small vocabulary of the wire (hop-by-hop header names, the fast paths' head patterns,
reason phrases, chunk framing, the JSON error body, ``Reply``: an answer the proxy makes
itself) and ``Outbox``, which holds whole messages until the event loop has handled its
batch of ready connections. It makes no decisions: ``api.proxy_client`` fills an
exchange, ``api.proxy.Proxy`` routes and retries it, and ``api.proxy_upstream`` relays
its response. Internal to the proxy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import TYPE_CHECKING

from api.balancer import Backend

if TYPE_CHECKING:
    from api.proxy_client import ClientConnection
    from api.proxy_upstream import UpstreamConnection

logger = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
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
REASONS = {
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    411: "Length Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
HEADER_WS = (b" ", b"\t")
_TCHAR = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]"
_VCHARS = rb"[\t\x20-\x7e\x80-\xff]*"
# The header lines of a head after its first line, each led by CRLF, as RFC 9110 allows
# them: a token name right before the colon, then visible characters, spaces and tabs.
# No obs-fold, no bare CR or LF, no NUL. The fast paths take a head only if it matches.
FIELDS = rb"((?:\r\n" + _TCHAR + rb"+:" + _VCHARS + rb")*)"
# A whole request head (without its final CRLF CRLF) that the client's fast path takes:
# a common method, an origin-form target of visible ASCII, HTTP/1.1; groups: method,
# target, header lines.
REQUEST_HEAD = re.compile(rb"(GET|POST|PUT|DELETE|PATCH|OPTIONS) (/[!-~]*) HTTP/1\.1" + FIELDS)
# A whole response head that the worker side's fast path takes: HTTP/1.1 and a final
# status that may carry a body; groups: status code and reason, status code, header lines.
RESPONSE_HEAD = re.compile(
    rb"HTTP/1\.1 (((?!204|304)[2-5][0-9][0-9])(?: " + _VCHARS + rb")?)" + FIELDS
)


class Exchange:
    """One client request and its way through one or more upstream tries."""

    __slots__ = (
        "attempts",
        "backend",
        "body",
        "body_deadline",
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
        "responded",
        "rid",
        "sent",
        "task",
        "tried",
        "upstream",
    )

    def __init__(self, client: ClientConnection, method: str) -> None:
        self.client = client
        self.method = method
        self.head = b""
        self.pool = ""
        self.rid = b""  # the request id, as it is written in heads
        self.keep_alive = True
        self.http10 = False
        self.chunked = False  # its chunked body is still being gathered (not dispatched yet)
        # Body bytes not yet written upstream, then (up to the replay limit) kept for a replay.
        self.body: list[bytes] = []
        self.body_size = 0
        self.body_done = False
        # While the body is still coming, the client must send some of it by this time.
        self.body_deadline = 0.0
        self.replayable = True
        self.backend: Backend | None = None
        self.upstream: UpstreamConnection | None = None
        self.sent = False  # bytes of this request went to a worker that may have read them
        self.responded = False  # the response head went to the client
        self.closing = False
        self.deadline = 0.0
        self.tried: set[str] = set()
        self.attempts = 0  # times the request was written to a worker
        self.task: asyncio.Task[None] | None = None

    @property
    def request_id(self) -> str:
        return self.rid.decode("ascii")


# Connection header tokens that name no other header (RFC 9110 section 7.6.1).
PLAIN_CONNECTION = frozenset({b"close", b"keep-alive"})


# Headers a Connection header may not take away: the message's framing and its Host.
_NEVER_LISTED = frozenset({b"content-length", b"transfer-encoding", b"host"})


def listed_headers(connection: bytes) -> set[bytes]:
    """The lowercased tokens of a Connection header's value (empty ones left out)."""
    tokens = {token.strip(b" \t") for token in connection.lower().split(b",")}
    tokens.discard(b"")
    return tokens


def hop_by_hop_listed(connection: bytes) -> set[bytes]:
    """The header names a Connection header lists, to be dropped (RFC 9110 section 7.6.1).

    Framing headers and Host are never dropped this way: a message framed by a length
    that the next hop cannot see would be read differently there.
    """
    return listed_headers(connection) - PLAIN_CONNECTION - _NEVER_LISTED


class Outbox:
    """Writes held while the event loop handles its batch of ready connections, then sent.

    Sending each message the moment it is made wakes its reader (a client, a worker) once
    per message; sending them all once the batch is handled wakes each reader about once
    per batch. On a busy proxy those wake-ups are a large share of the kernel's work. Held
    bytes wait at most for the rest of one loop iteration.
    """

    def __init__(self) -> None:
        self._held: list[HeldWriter] = []

    def hold(self, writer: HeldWriter) -> None:
        if not self._held:
            asyncio.get_running_loop().call_soon(self.flush)
        self._held.append(writer)

    def flush(self) -> None:
        held, self._held = self._held, []
        for writer in held:
            try:
                writer.send_held()
            except Exception:  # one broken connection must not keep the others' bytes
                logger.exception("balancer could not send held bytes to a connection")


class HeldWriter:
    """A connection whose whole messages may wait in an ``Outbox`` (see there).

    Order on the connection is kept: a direct ``write`` and a close send what is held first.
    """

    transport: asyncio.Transport | None
    closed: bool
    outbox: Outbox
    _held_out: list[bytes]

    def write_soon(self, data: bytes) -> None:
        if self.transport is None or self.closed:
            return
        if self._held_out:
            self._held_out.append(data)
        else:
            self._held_out = [data]
            self.outbox.hold(self)

    def send_held(self) -> None:
        out = self._held_out
        if out:
            self._held_out = []
            if self.transport is not None and not self.closed:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            if self._held_out:
                self.send_held()
            self.transport.write(data)


def frame_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def error_body(status: int, message: str, request_id: str) -> bytes:
    return json.dumps({"error": message, "status": status, "requestId": request_id}).encode()


class Reply(Exception):
    """An answer the proxy makes itself (404, 502, 503, 504)."""

    def __init__(self, status: int, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
