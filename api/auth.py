"""Bearer-token authentication for Shoal's HTTP API.

It owns where the token comes from (``SHOAL_API_TOKEN``, or a file named by
``--api-token-file``) and the middleware that checks it. When a token is set, every
request but ``GET /healthz`` must carry ``Authorization: Bearer <token>``; others get a
401 JSON body with a ``WWW-Authenticate: Bearer`` challenge (RFC 6750 section 3) before
any handler runs or any body is read, so a refused request changes nothing. With no
token, the API is open, which is why ``shoal up`` binds 127.0.0.1 by default.

It does not do users, scopes or TLS; put a proxy in front for those.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware

logger = logging.getLogger(__name__)

TOKEN_ENV = "SHOAL_API_TOKEN"
# Probes (Docker, Kubernetes, load balancers) rarely carry credentials; it says only "ok".
OPEN_PATHS = frozenset({"/healthz"})
# The dashboard's page and static files hold no data (that comes through the
# guarded /v1/stream); a browser cannot attach a token to a <script src>.
OPEN_PREFIXES = ("/dashboard/",)
MIN_TOKEN_LENGTH = 16

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class TokenError(ValueError):
    """The configured token cannot be used (unreadable file, empty or too short)."""


def load_token(*, token_file: Path | None, env: Mapping[str, str] | None = None) -> str | None:
    """The API token: the file wins over ``SHOAL_API_TOKEN``; None when neither is set.

    Surrounding whitespace (a trailing newline from ``echo``) is not part of the token.
    """
    env = os.environ if env is None else env
    if token_file is not None:
        try:
            raw = token_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenError(f"cannot read the API token file {token_file}: {exc}") from exc
        source = str(token_file)
    else:
        raw = env.get(TOKEN_ENV, "")
        if not raw:
            return None
        source = TOKEN_ENV
    token = raw.strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenError(
            f"the API token in {source} is {len(token)} characters long; "
            f"use at least {MIN_TOKEN_LENGTH} (e.g. `openssl rand -hex 32`)"
        )
    return token


def _unauthorized(message: str, *, error: str | None) -> web.Response:
    challenge = 'Bearer realm="shoal"'
    if error is not None:
        challenge += f', error="{error}"'
    return web.json_response(
        {"error": message}, status=401, headers={"WWW-Authenticate": challenge}
    )


def bearer_middleware(token: str) -> Middleware:
    """A middleware that lets through only requests carrying ``token`` (or to open paths)."""
    expected = token.encode()

    @web.middleware
    async def check_bearer(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or (
            request.method == "GET" and request.path.startswith(OPEN_PREFIXES)
        ):
            return await handler(request)
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if not scheme and request.method == "GET" and "access_token" in request.query:
            # RFC 6750 2.3: a browser's EventSource cannot set headers, so the
            # dashboard page and its stream may carry the token in the query.
            scheme, presented = "bearer", request.query["access_token"]
        if scheme.lower() != "bearer" or not presented.strip():
            return _unauthorized("this API needs a bearer token", error=None)
        # NB: compare_digest takes time independent of where the strings differ.
        if not hmac.compare_digest(presented.strip().encode("utf-8", "surrogateescape"), expected):
            logger.debug("refused a request to %s with a wrong token", request.path)
            return _unauthorized("the bearer token is not valid", error="invalid_token")
        return await handler(request)

    return check_bearer
