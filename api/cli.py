"""The ``shoal`` command.

``shoal up`` runs the whole system in one process: policy store, queue,
reconciler, dispatcher, prober and the HTTP API. SIGINT or SIGTERM stops it
cleanly and stops the workers it runs, unless ``--keep-workers``.

The API binds 127.0.0.1 unless ``--host`` says otherwise; ``SHOAL_API_TOKEN`` or
``--api-token-file`` turns on bearer authentication, and binding elsewhere without
one is allowed but warned about. Tracing follows the ``OTEL_*`` variables.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from controller import telemetry
from controller.errors import PolicyError, ShoalError
from controller.logs import setup_logging
from controller.runtimes.base import Runtime

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8700


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Shoal: an autoscaling task runner.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the controller, the queue and the HTTP API")
    up.add_argument(
        "--manifests",
        type=Path,
        default=Path(os.environ.get("SHOAL_MANIFESTS", _repo_root() / "manifests")),
        help="a WorkerPool YAML file or a folder of them (default: ./manifests)",
    )
    up.add_argument("--runtime", choices=["auto", "docker", "process"], default="auto")
    up.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("SHOAL_STATE_DIR", ".state")),
        help="where the durable queue lives (default: ./.state)",
    )
    up.add_argument(
        "--queue",
        default=os.environ.get("SHOAL_QUEUE", "sqlite://"),
        help="queue URL: sqlite:// (in --state-dir), sqlite:///abs/path.db, memory://, redis://",
    )
    up.add_argument(
        "--task-retention",
        default=os.environ.get("SHOAL_TASK_RETENTION", "7d"),
        help="prune finished tasks this long after they finish, e.g. 24h or 7d; 0 keeps all",
    )
    up.add_argument("--host", default="127.0.0.1", help="address the API binds (default: loopback)")
    up.add_argument(
        "--api-token-file",
        type=Path,
        default=None,
        help="file holding the API bearer token (overrides SHOAL_API_TOKEN)",
    )
    up.add_argument("--port", type=int, default=DEFAULT_PORT)
    up.add_argument("--keep-workers", action="store_true", help="leave workers running on shutdown")
    up.add_argument(
        "--instance",
        default=os.environ.get("SHOAL_INSTANCE", "default"),
        help="label value that separates several Shoal installations on one engine "
        "(default: $SHOAL_INSTANCE, else 'default')",
    )
    up.add_argument(
        "--balancer-port",
        type=int,
        default=None,
        help="also serve the balancer (reverse proxy to ready workers) on this port",
    )
    up.add_argument("--log-level", default=os.environ.get("SHOAL_LOG_LEVEL", "info"))
    up.add_argument("--log-format", choices=["text", "json"], default="text")

    from api import balancer_cli

    balancer_cli.add_parser(sub)
    return parser


async def pick_runtime(choice: str, *, instance: str) -> Runtime:
    """Builds the runtime; ``auto`` prefers Docker and says why it did or did not get it."""
    if choice in ("auto", "docker"):
        from controller.runtimes.docker import DockerRuntime, docker_available

        ok, reason = await asyncio.to_thread(docker_available)
        if ok:
            if choice == "auto":
                logger.info("runtime auto: using docker (%s)", reason)
            return DockerRuntime(instance=instance)
        if choice == "docker":
            raise SystemExit(f"shoal: --runtime docker, but no Docker engine answers: {reason}")
        logger.warning(
            "runtime auto: no Docker engine (%s); running workers as local processes", reason
        )
    from controller.runtimes.process import ProcessRuntime

    return ProcessRuntime(instance=instance)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _up(args: argparse.Namespace) -> int:
    from api.app import make_app
    from api.auth import TokenError, load_token

    try:
        api_token = load_token(token_file=args.api_token_file)
    except TokenError as exc:
        logger.error("shoal: %s", exc)
        return 2
    if api_token is None and not _is_loopback(args.host):
        logger.warning(
            "the API binds %s WITHOUT a token: anyone who can reach it can enqueue tasks and "
            "read status; set SHOAL_API_TOKEN or --api-token-file",
            args.host,
        )
    from controller.manager import Controller, ControllerConfig
    from controller.queues import open_queue

    args.state_dir.mkdir(parents=True, exist_ok=True)
    runtime = await pick_runtime(args.runtime, instance=args.instance)
    try:
        queue = await open_queue(
            args.queue, state_dir=args.state_dir, task_retention=args.task_retention
        )
    except ValueError as exc:
        await runtime.close()
        raise SystemExit(f"shoal: {exc}") from exc
    controller = Controller(
        config=ControllerConfig(manifests=args.manifests, keep_workers=args.keep_workers),
        runtime=runtime,
        queue=queue,
    )
    app = make_app(controller, api_token=api_token)
    # Watch and dashboard streams never end by themselves: don't wait 60 s for them.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    try:
        await runner.setup()
    except PolicyError as exc:
        await runtime.close()
        await queue.close()
        logger.error("shoal: manifest refused: %s", exc)
        return 2
    except ShoalError as exc:
        # E.g. the engine or the queue did not answer the first relist or count.
        await runner.cleanup()
        await runtime.close()
        await queue.close()
        logger.error("shoal: cannot start: %s", exc)
        return 1
    site = web.TCPSite(runner, args.host, args.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        logger.error("shoal: cannot listen on %s:%d: %s", args.host, args.port, exc.strerror)
        return 1
    logger.info(
        "Shoal API listening on http://%s:%d (%s)",
        args.host,
        args.port,
        "bearer token required" if api_token else "no authentication",
    )
    balancer = None
    if args.balancer_port is not None:
        from api.balancer_cli import start_in_process

        try:
            balancer = await start_in_process(controller, host=args.host, port=args.balancer_port)
        except OSError as exc:
            await runner.cleanup()
            logger.error("shoal: cannot serve the balancer: %s", exc.strerror)
            return 1
        logger.info("Shoal balancer listening on %s", balancer.url)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("shutting down")
    if balancer is not None:
        await balancer.close()
    await runner.cleanup()
    logger.info("bye")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(level=getattr(args, "log_level", "info"), fmt=getattr(args, "log_format", "text"))
    if args.command == "up":
        provider = telemetry.setup_tracing()
        try:
            return asyncio.run(_up(args))
        finally:
            if provider is not None:
                # Flushes spans still batched for an exporter.
                provider.shutdown()
    if args.command == "balancer":
        from api import balancer_cli

        return balancer_cli.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
