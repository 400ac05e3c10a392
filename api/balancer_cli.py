"""``shoal balancer``: the reverse proxy as its own process, and its in-process entry point.

It owns argument parsing, the process model (one event loop per process; with
``--processes N`` the others are started as children that bind the same port
with SO_REUSEPORT, so the kernel spreads connections across them) and clean
shutdown on SIGINT/SIGTERM. Each process follows the controller on its own
(``HttpControlPlane``). ``start_in_process`` runs one proxy inside ``shoal up``
on the controller's event loop, following its registry directly.

The controller's CLI wires ``add_parser`` and ``run`` (or ``main``, which also
picks uvloop when it is installed) into ``shoal``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.auth import TokenError, load_token
from api.balancer import STRATEGIES
from api.endpoints import HttpControlPlane, RegistryControlPlane
from api.proxy import Proxy, ProxyConfig

if TYPE_CHECKING:
    from controller.manager import Controller

logger = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``balancer`` to ``shoal``'s sub-commands and returns its parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "balancer",
        help="reverse-proxy requests to the ready workers of a pool",
        description=(
            "Follows a controller's worker watch and proxies HTTP/1.1 requests to the ready "
            "workers of a pool, chosen by /pools/<name>/ or the X-Shoal-Pool header."
        ),
    )
    parser.add_argument(
        "--controller",
        default=os.environ.get("SHOAL_CONTROLLER", "http://127.0.0.1:8700"),
        help="base URL of the Shoal API to follow (default: http://127.0.0.1:8700)",
    )
    parser.add_argument(
        "--listen",
        default=os.environ.get("SHOAL_BALANCER_LISTEN", "127.0.0.1:8800"),
        help="host:port to serve on (default: 127.0.0.1:8800)",
    )
    parser.add_argument("--pool", default=None, help="follow only this pool's workers")
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="least-connections",
        help="backend choice (the controller does not publish the manifests' choice)",
    )
    parser.add_argument(
        "--activation-timeout",
        type=float,
        default=30.0,
        help="seconds a request waits for a pool at zero to get a ready worker (default 30)",
    )
    parser.add_argument(
        "--upstream-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for a worker's answer, and between its reads (default 300)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="serving processes sharing the port with SO_REUSEPORT (default 1)",
    )
    parser.add_argument(
        "--api-token-file",
        type=Path,
        default=None,
        help="file holding the controller API's bearer token (else SHOAL_API_TOKEN)",
    )
    parser.add_argument("--log-level", default=os.environ.get("SHOAL_LOG_LEVEL", "info"))
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    return parser


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"shoal balancer: --listen wants host:port, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _config(args: argparse.Namespace) -> ProxyConfig:
    return ProxyConfig(
        activation_timeout_s=args.activation_timeout,
        upstream_timeout_s=args.upstream_timeout,
        default_strategy=args.strategy,
    )


async def _serve(args: argparse.Namespace, *, reuse_port: bool) -> int:
    host, port = _split_listen(args.listen)
    try:
        token = load_token(token_file=args.api_token_file)
    except TokenError as exc:
        logger.error("shoal balancer: %s", exc)
        return 2
    control = HttpControlPlane(args.controller, pool=args.pool, strategy=args.strategy, token=token)
    proxy = Proxy(control, config=_config(args))
    try:
        bound = await proxy.start(host=host, port=port, reuse_port=reuse_port)
    except OSError as exc:
        await proxy.close()
        logger.error("shoal balancer: cannot listen on %s:%d: %s", host, port, exc.strerror)
        return 1
    logger.info(
        "balancer listening on http://%s:%d (pid %d), following %s",
        host,
        bound,
        os.getpid(),
        args.controller,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await proxy.close()
    return 0


def _child(args: argparse.Namespace) -> None:
    from controller.logs import setup_logging

    setup_logging(level=args.log_level, fmt=args.log_format)
    _run_loop(_serve(args, reuse_port=True))


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Runs ``main`` on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def run(args: argparse.Namespace) -> int:
    """``shoal balancer``: serves until SIGINT/SIGTERM; returns the exit code."""
    if args.processes < 1:
        raise SystemExit("shoal balancer: --processes must be at least 1")
    if args.processes == 1:
        return await _serve(args, reuse_port=False)

    # Children are spawned (not forked) so none inherits this running event loop.
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_child, args=(args,), name=f"shoal-balancer-{i}", daemon=True)
        for i in range(1, args.processes)
    ]
    for child in children:
        child.start()
    try:
        return await _serve(args, reuse_port=True)
    finally:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)
        for child in children:
            await asyncio.to_thread(child.join, 5.0)
            if child.is_alive():
                child.kill()


def main(args: argparse.Namespace) -> int:
    """Like ``asyncio.run(run(args))``, on uvloop when it is installed."""
    return _run_loop(run(args))


class InProcessBalancer:
    """The handle ``start_in_process`` returns."""

    def __init__(self, proxy: Proxy, *, host: str, port: int) -> None:
        self.proxy = proxy
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        await self.proxy.close()


async def start_in_process(
    controller: Controller,
    *,
    host: str,
    port: int,
    config: ProxyConfig | None = None,
) -> InProcessBalancer:
    """Starts a proxy on the running loop that follows ``controller``'s registry directly.

    Call it after ``controller.start()``; ``port`` 0 picks a free port (see ``.port``).
    Capacity is asked for through ``controller.reconciler.request_capacity(pool)``.
    """
    proxy = Proxy(RegistryControlPlane.from_controller(controller), config=config)
    bound = await proxy.start(host=host, port=port)
    logger.info("balancer listening on http://%s:%d (in process)", host, bound)
    return InProcessBalancer(proxy, host=host, port=bound)


def _standalone() -> int:
    parser = argparse.ArgumentParser(prog="shoal")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["balancer", *sys.argv[1:]])
    from controller.logs import setup_logging

    setup_logging(level=args.log_level, fmt=args.log_format)
    with contextlib.suppress(KeyboardInterrupt):
        return main(args)
    return 130


if __name__ == "__main__":
    sys.exit(_standalone())
