"""The aiohttp application factory.

``make_app`` wires the routes to a ``Controller``; when ``manage_controller``
is set, the app's cleanup context starts the controller with the server and
stops it (and its workers) when the server stops. With ``api_token`` set, every
route but ``/healthz`` needs it as a bearer token (``api.auth``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware

from api import auth, dashboard, openapi, prometheus
from api.keys import CONTROLLER, MAX_BODY_BYTES
from api.routes import errors_middleware, routes
from controller.manager import Controller

DEFAULT_MAX_BODY_BYTES = 1024 * 1024


def make_app(
    controller: Controller,
    *,
    manage_controller: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    api_token: str | None = None,
) -> web.Application:
    # NB: authentication comes first, so a refused request never reaches a handler.
    middlewares: list[Middleware] = [auth.bearer_middleware(api_token)] if api_token else []
    middlewares.append(errors_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
    app[CONTROLLER] = controller
    app[MAX_BODY_BYTES] = max_body_bytes
    app.add_routes(routes)
    prometheus.setup(app)
    openapi.setup(app)
    dashboard.setup(app)
    if manage_controller:

        async def lifecycle(app: web.Application) -> AsyncIterator[None]:
            await controller.start()
            yield
            await controller.stop()

        app.cleanup_ctx.append(lifecycle)
    return app
