#!/usr/bin/env python3
"""Measures Shoal's balancer beside nginx and a direct connection, on loopback, with wrk.

One run starts, all on 127.0.0.1 and on free ports:
- a trivial keep-alive worker: by default an nginx that answers ``200 {"status":"ok"}``
  (the fastest trivial server at hand, so the proxies are what is measured), or with
  ``--backend worker`` Shoal's own ``workerimg/worker.py`` answering ``GET /healthz``;
- nginx as a reverse proxy (one worker process, upstream keep-alive);
- a stand-in controller (the real API routes over a registry that holds the one worker);
- ``shoal balancer --controller ...`` following it (``--processes`` serving processes).

Then, per round, for each of direct / nginx / shoal: wrk at 64 connections (requests/s,
p50, p99) and at 8 connections (p50), plus the CPU time each proxy spent per request.
Every server is started here and stopped by its pid; every wrk run is bounded by
``--duration``. ``--json`` prints the medians over rounds as
``{"direct": {"rps", "p50_ms", "p99_ms", "p50_ms_c8"}, "nginx": {...}, "shoal": {...}}``.

Needs the Debian packages ``nginx`` and ``wrk``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TARGETS = ("direct", "nginx", "shoal")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, *, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f}s")


def nginx_conf(workdir: Path, *, name: str, listen: int, upstream: int | None) -> Path:
    if upstream is None:
        location = 'default_type application/json; return 200 \'{"status":"ok"}\';'
        upstream_block = ""
    else:
        upstream_block = f"upstream worker {{ server 127.0.0.1:{upstream}; keepalive 64; }}"
        location = (
            "proxy_pass http://worker; proxy_http_version 1.1; "
            'proxy_set_header Connection ""; '
            "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"
        )
    temp = workdir / f"{name}-tmp"
    temp.mkdir(exist_ok=True)
    conf = workdir / f"{name}.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {workdir / name}.pid;
error_log {workdir / name}.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path {temp}; proxy_temp_path {temp}; fastcgi_temp_path {temp};
  uwsgi_temp_path {temp}; scgi_temp_path {temp};
  {upstream_block}
  server {{ listen 127.0.0.1:{listen}; location / {{ {location} }} }}
}}
"""
    )
    return conf


@contextmanager
def process(argv: list[str], *, port: int, env: dict[str, str] | None = None) -> Iterator[int]:
    """Starts a server, waits for its port, yields its pid, and stops it by that pid."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        try:
            wait_for_port(port)
        except RuntimeError:
            proc.kill()
            _out, err = proc.communicate(timeout=5)
            raise RuntimeError(f"{argv[0]} did not start: {err.decode()[-800:]}") from None
        yield proc.pid
    finally:
        if proc.poll() is None:
            # SIGTERM to the pid we started; a multi-process server stops its own children.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def cpu_ticks(pid: int) -> int:
    """User+system ticks of ``pid`` and its live descendants (nginx workers, balancer children)."""
    total = 0
    for child in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return found
    for child in map(int, children):
        found.append(child)
        found.extend(descendants(child))
    return found


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def wrk(url: str, *, connections: int, duration_s: float, threads: int) -> dict[str, float]:
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s:g}s",
        "--latency",
        "--timeout",
        "5s",
        url,
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30)
    out = result.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"wrk gave no figures for {url}: {out[-500:]} {result.stderr[-300:]}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(rps.group(1)),
        "p50_ms": _ms(p50.group(1)),
        "p99_ms": _ms(p99.group(1)),
        "requests": float(total.group(1)),
        "errors": float(sum(map(int, errors.groups())) if errors else 0)
        + float(non2xx.group(1) if non2xx else 0),
    }


# -- the stand-in controller ---------------------------------------------------------------

CONTROLLER_MANIFEST = """
apiVersion: shoal/v1
kind: WorkerPool
metadata: {name: default}
spec:
  replicas: {min: 1, max: 1}
"""


async def serve_controller(port: int, worker_port: int, workdir: Path) -> None:
    """The real API routes over a registry holding one ready worker; runs until SIGTERM."""
    from aiohttp import web

    from api.app import make_app
    from controller.manager import Controller, ControllerConfig
    from controller.queues.memory import MemoryQueue
    from controller.runtimes.base import WorkerId
    from controller.runtimes.fake import FakeRuntime

    manifest = workdir / "pool.yaml"
    manifest.write_text(CONTROLLER_MANIFEST)
    controller = Controller(
        config=ControllerConfig(manifests=manifest), runtime=FakeRuntime(), queue=MemoryQueue()
    )
    controller.store.load()
    worker_id = WorkerId("bench-worker")
    controller.registry.add(
        worker_id=worker_id,
        name="bench-worker",
        pool="default",
        template_hash="bench",
        host="127.0.0.1",
        host_port=worker_port,
        concurrency=1024,
    )
    controller.registry.mark_ready(worker_id)
    runner = web.AppRunner(make_app(controller, manage_controller=False), shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await runner.cleanup()


# -- the run -------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench_balancer: {tool} is not installed (apt-get install {tool})")
    python = sys.executable
    ports = {name: free_port() for name in ("worker", "nginx", "controller", "shoal")}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        workdir = Path(tmp)
        if args.backend == "nginx":
            conf = nginx_conf(workdir, name="worker", listen=ports["worker"], upstream=None)
            worker_argv = ["nginx", "-c", str(conf), "-e", str(workdir / "worker.err")]
            worker_env: dict[str, str] = {}
            path = "/"
        else:
            worker_argv = [python, str(REPO / "workerimg" / "worker.py")]
            worker_env = {"HOST": "127.0.0.1", "PORT": str(ports["worker"])}
            path = "/healthz"
        proxy_conf = nginx_conf(
            workdir, name="proxy", listen=ports["nginx"], upstream=ports["worker"]
        )
        balancer_argv = [
            python,
            "-m",
            "api.balancer_cli",
            "--controller",
            f"http://127.0.0.1:{ports['controller']}",
            "--listen",
            f"127.0.0.1:{ports['shoal']}",
            "--processes",
            str(args.processes),
            "--log-level",
            "warning",
        ]
        controller_argv = [
            python,
            str(Path(__file__).resolve()),
            "--serve-controller",
            str(ports["controller"]),
            str(ports["worker"]),
            str(workdir),
        ]
        env = {"PYTHONPATH": str(REPO)}
        with (
            process(worker_argv, port=ports["worker"], env=worker_env),
            process(
                ["nginx", "-c", str(proxy_conf), "-e", str(workdir / "proxy.err")],
                port=ports["nginx"],
            ) as nginx_pid,
            process(controller_argv, port=ports["controller"], env=env),
            process(balancer_argv, port=ports["shoal"], env=env) as shoal_pid,
        ):
            urls = {
                "direct": f"http://127.0.0.1:{ports['worker']}{path}",
                "nginx": f"http://127.0.0.1:{ports['nginx']}{path}",
                "shoal": f"http://127.0.0.1:{ports['shoal']}{path}",
            }
            pids = {"nginx": nginx_pid, "shoal": shoal_pid}
            # Let every balancer process get its routing table, then warm all paths up.
            time.sleep(1.0)
            for url in urls.values():
                wrk(url, connections=64, duration_s=1, threads=args.threads)
            rounds: dict[str, list[dict[str, float]]] = {t: [] for t in TARGETS}
            for _ in range(args.rounds):
                for target in TARGETS:
                    pid = pids.get(target)
                    before = cpu_ticks(pid) if pid else 0
                    c64 = wrk(
                        urls[target],
                        connections=64,
                        duration_s=args.duration,
                        threads=args.threads,
                    )
                    spent = cpu_ticks(pid) - before if pid else 0
                    c8 = wrk(urls[target], connections=8, duration_s=args.duration, threads=1)
                    rounds[target].append(
                        {
                            **{k: c64[k] for k in ("rps", "p50_ms", "p99_ms")},
                            "p50_ms_c8": c8["p50_ms"],
                            "errors": c64["errors"] + c8["errors"],
                            "cpu_us_per_request": (
                                spent / _CLK_TCK / c64["requests"] * 1e6 if pid else 0.0
                            ),
                        }
                    )
    return {
        target: {
            key: round(statistics.median(r[key] for r in runs), 3)
            for key in ("rps", "p50_ms", "p99_ms", "p50_ms_c8", "errors", "cpu_us_per_request")
        }
        for target, runs in rounds.items()
    }


def verdict(results: dict[str, dict[str, Any]]) -> list[str]:
    shoal, nginx, direct = results["shoal"], results["nginx"], results["direct"]
    share = shoal["rps"] / nginx["rps"] if nginx["rps"] else 0.0
    added_ms = shoal["p50_ms_c8"] - direct["p50_ms_c8"]
    return [
        f"shoal/nginx requests/s: {share:.0%} (target >= 50%): "
        + ("met" if share >= 0.5 else "NOT met"),
        f"p50 added over direct at 8 connections: {added_ms:.3f} ms (target <= 1 ms): "
        + ("met" if added_ms <= 1.0 else "NOT met"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads at 64 connections")
    parser.add_argument(
        "--processes", type=int, default=2, help="Shoal balancer processes (SO_REUSEPORT)"
    )
    parser.add_argument("--backend", choices=["nginx", "worker"], default="nginx")
    parser.add_argument("--serve-controller", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_controller:
        port, worker_port, workdir = args.serve_controller
        asyncio.run(serve_controller(int(port), int(worker_port), Path(workdir)))
        return 0
    if not 0 < args.duration <= 60 or not 1 <= args.rounds <= 10:
        raise SystemExit("bench_balancer: keep --duration within (0, 60] and --rounds within 1-10")

    results = measure(args)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"backend: {args.backend}; shoal processes: {args.processes}; rounds: {args.rounds}")
    header = (
        f"{'':8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'p50 c8':>9}{'cpu us/req':>12}{'errs':>6}"
    )
    print(header)
    for target, row in results.items():
        print(
            f"{target:8}{row['rps']:>10.0f}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}"
            f"{row['p50_ms_c8']:>9.3f}{row['cpu_us_per_request']:>12.1f}{row['errors']:>6.0f}"
        )
    for line in verdict(results):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
