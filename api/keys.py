"""Typed keys of the aiohttp application's state."""

from __future__ import annotations

from aiohttp import web

from controller.manager import Controller

CONTROLLER = web.AppKey("controller", Controller)
MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)
