"""HTTP handlers: enqueue and watch tasks, read status and metrics.

Handlers validate input (``api.models``), call the controller, and shape JSON.
They hold no business logic: the queue decides task states, the reconciler
decides replicas. Errors are JSON ``{"error": ..., "problems": [...]}`` with a
4xx status; nothing is stored when a request is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from aiohttp import web
from opentelemetry.trace import Span, SpanKind
from pydantic import BaseModel, ValidationError

from api.keys import CONTROLLER, MAX_BODY_BYTES
from api.models import (
    MAX_KEY_LENGTH,
    ActivateBody,
    DequeueBody,
    DispatchBody,
    EnqueueBody,
    HeartbeatBody,
    ResultBody,
    describe_validation_error,
)
from controller import telemetry
from controller.dispatcher import retry_policy_of
from controller.errors import QueueUnavailable, TaskNotFound, UnknownPool
from controller.manager import Controller
from controller.queues.base import (
    FINAL_STATES,
    TASK_STATES,
    EnqueueRequest,
    IdempotencyConflict,
    Task,
    TaskState,
    request_fingerprint,
)
from controller.registry import WatchExpired

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()
IDEMPOTENCY_HEADER = "Idempotency-Key"
# How many of the oldest queued tasks /autoscaler-status reads to find undeclared pools.
ORPHAN_SCAN = 50
ORPHAN_LOOKUP_TIMEOUT_S = 1.0
BodyT = TypeVar("BodyT", bound=BaseModel)


def json_error(
    status: int, message: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status, headers=headers)


class BadRequest(Exception):
    def __init__(self, message: str, *, status: int = 400, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


async def read_body(request: web.Request, model: type[BodyT]) -> BodyT:
    # The body is read as JSON whatever the Content-Type says: curl's -d sends
    # application/x-www-form-urlencoded, and refusing that helps nobody.
    declared = request.content_length
    if declared is not None and declared > request.app[MAX_BODY_BYTES]:
        # Refused on the declaration, before waiting for a body we would not keep.
        raise BadRequest(
            f"request body too large (limit {request.app[MAX_BODY_BYTES]} bytes)", status=413
        )
    raw = await request.read()
    if not raw.strip():
        raise BadRequest("request body is empty; send a JSON object")
    try:
        data = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError as exc:
        raise BadRequest("request body is nested too deeply") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = describe_validation_error(exc)
        summary = "; ".join(f"{p['field']}: {p['reason']}" for p in problems)
        raise BadRequest(f"invalid request: {summary}", problems=problems) from exc


def _refuse_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (RFC 8259): stored, they would break every
    # client that reads the task back.
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a JSON number")
    return value


def query_values(request: web.Request, *names: str) -> list[str | None]:
    """The one value of each query parameter in ``names`` (None when absent).

    A parameter given twice gets 400 naming it: ``limit=2&limit=3`` has no right reading,
    and taking either value would hide a client's bug. Handlers read all their parameters
    here first, so a repeat is refused whatever else is wrong with the request.
    """
    for name in names:
        count = len(request.query.getall(name, []))
        if count > 1:
            reason = f"given {count} times; give it once"
            raise BadRequest(
                f"query parameter {name!r} {reason}",
                problems=[{"field": f"{name} (query)", "reason": reason}],
            )
    return [request.query.get(name) for name in names]


def _controller(request: web.Request) -> Controller:
    return request.app[CONTROLLER]


def _enqueue_request(
    controller: Controller, body: EnqueueBody, request: web.Request
) -> EnqueueRequest:
    pool = controller.store.get(body.pool)
    if pool is None:
        raise UnknownPool(body.pool)
    key = _idempotency_key(body, request)
    return EnqueueRequest(
        pool=body.pool,
        payload=body.payload,
        work_seconds=body.work_seconds,
        max_attempts=body.max_attempts or pool.spec.delivery.max_attempts,
        idempotency_key=key,
        # The enqueue span's context: the task's later spans join this trace.
        traceparent=telemetry.current_traceparent(),
        # Of the body as sent: a retry that leaves max_attempts to the pool still
        # matches after the pool's default changed.
        fingerprint=None
        if key is None
        else request_fingerprint(
            payload=body.payload, work_seconds=body.work_seconds, max_attempts=body.max_attempts
        ),
    )


def _idempotency_key(body: EnqueueBody, request: web.Request) -> str | None:
    """The key of the ``Idempotency-Key`` header or the ``idempotency_key`` field.

    The header obeys the field's rules (1 to ``MAX_KEY_LENGTH`` characters). Both may be
    sent only when they are equal: neither is picked over the other.
    """
    headers = request.headers.getall(IDEMPOTENCY_HEADER, [])
    if not headers:
        return body.idempotency_key
    if len(headers) > 1:
        raise _bad_key(f"{IDEMPOTENCY_HEADER} header sent {len(headers)} times; send it once")
    header = headers[0]
    if not header:
        raise _bad_key(f"{IDEMPOTENCY_HEADER} header is empty; send a key or leave it out")
    if len(header) > MAX_KEY_LENGTH:
        raise _bad_key(
            f"{IDEMPOTENCY_HEADER} header is {len(header)} characters long; "
            f"the limit is {MAX_KEY_LENGTH}"
        )
    if body.idempotency_key is not None and body.idempotency_key != header:
        raise _bad_key(
            f"{IDEMPOTENCY_HEADER} header and the idempotency_key field differ; "
            "send the key once, or the same key in both"
        )
    return header


def _bad_key(reason: str) -> BadRequest:
    return BadRequest(
        f"invalid request: {reason}",
        problems=[{"field": f"{IDEMPOTENCY_HEADER} (header)", "reason": reason}],
    )


def _enqueue_span(request: web.Request) -> AbstractContextManager[Span]:
    """The server span of an enqueue; a ``traceparent`` the client sent becomes its parent."""
    return telemetry.tracer.start_as_current_span(
        "enqueue",
        context=telemetry.extract(request.headers.get("traceparent")),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": request.method, "url.path": request.path},
    )


def _describe_enqueue(span: Span, task: Task, *, created: bool) -> None:
    span.set_attributes(
        {"shoal.task.id": task.id, "shoal.pool": task.pool, "shoal.created": created}
    )


@routes.post("/enqueue-task")
async def enqueue_task(request: web.Request) -> web.Response:
    controller = _controller(request)
    with _enqueue_span(request) as span:
        body = await read_body(request, EnqueueBody)
        task, created = await controller.submit(_enqueue_request(controller, body, request))
        _describe_enqueue(span, task, created=created)
    return web.json_response(
        {"id": task.id, "pool": task.pool, "state": task.state, "created": created},
        status=202 if created else 200,
        headers={"Location": f"/tasks/{task.id}"},
    )


@routes.post("/dispatch-task")
async def dispatch_task(request: web.Request) -> web.Response:
    """Enqueues a task and waits for its outcome up to ``timeout_s`` (a synchronous submit)."""
    controller = _controller(request)
    with _enqueue_span(request) as span:
        body = await read_body(request, DispatchBody)
        task, created = await controller.submit(_enqueue_request(controller, body, request))
        _describe_enqueue(span, task, created=created)
    deadline = time.monotonic() + body.timeout_s
    while task.state not in FINAL_STATES and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        try:
            current = await controller.queue.get(task.id)
        except QueueUnavailable:
            # The task is stored: answer 202 with its id rather than invite a resubmit.
            break
        if current is not None:
            task = current
    status = 200 if task.state in FINAL_STATES else 202
    return web.json_response(
        task.to_json(), status=status, headers={"Location": f"/tasks/{task.id}"}
    )


async def _existing_task(controller: Controller, request: web.Request) -> Task:
    """The task named in the path; ``TaskNotFound`` (404) when there is none."""
    task_id = request.match_info["id"]
    task = await controller.queue.get(task_id)
    if task is None:
        raise TaskNotFound(task_id)
    return task


@routes.get("/tasks/{id}")
async def get_task(request: web.Request) -> web.Response:
    task = await _existing_task(_controller(request), request)
    return web.json_response(task.to_json())


@routes.get("/tasks")
async def list_tasks(request: web.Request) -> web.Response:
    controller = _controller(request)
    state, pool, limit_text, after = query_values(request, "state", "pool", "limit", "after")
    if state is not None and state not in TASK_STATES:
        raise BadRequest(f"state must be one of {', '.join(TASK_STATES)}")
    if pool is not None and controller.store.get(pool) is None:
        # A pool removed from the manifests keeps its tasks: they stay listable.
        counts = (await controller.queue.counts(pool)).to_json()
        if not any(n for state, n in counts.items() if state != "ready"):
            raise UnknownPool(pool)
    try:
        limit = int("100" if limit_text is None else limit_text)
    except ValueError as exc:
        raise BadRequest("limit must be an integer") from exc
    if not 1 <= limit <= 1000:
        raise BadRequest("limit must be between 1 and 1000")
    if after is not None and await controller.queue.get(after) is None:
        raise BadRequest(f"after={after!r} is not a task id; use the 'next' of the previous page")
    tasks = await controller.queue.list(
        pool=pool,
        state=_as_state(state),
        limit=limit,
        after=after,
    )
    page: dict[str, Any] = {"items": [t.to_json() for t in tasks]}
    if len(tasks) == limit:
        page["next"] = tasks[-1].id
    return web.json_response(page)


def _as_state(state: str | None) -> TaskState | None:
    for known in TASK_STATES:
        if known == state:
            return known
    return None


@routes.post("/tasks/{id}/cancel")
async def cancel_task(request: web.Request) -> web.Response:
    task = await _controller(request).queue.cancel(request.match_info["id"])
    if task is None:
        raise TaskNotFound(request.match_info["id"])
    if task.state != "cancelled":
        return json_error(409, f"task is {task.state}; only queued tasks can be cancelled")
    return web.json_response(task.to_json())


@routes.post("/tasks/{id}/redrive")
async def redrive_task(request: web.Request) -> web.Response:
    controller = _controller(request)
    existing = await _existing_task(controller, request)
    if existing.state not in ("dead", "failed"):
        return json_error(409, f"task is {existing.state}; only dead or failed tasks are redriven")
    task = await controller.queue.redrive(existing.id)
    if task is None or task.state != "queued":
        return json_error(409, "task changed while being redriven; try again")
    controller.reconciler.wake()
    if controller.dispatcher is not None:
        controller.dispatcher.wake()
    return web.json_response(task.to_json())


@routes.post("/dequeue-task")
async def dequeue_task(request: web.Request) -> web.Response:
    """Pull mode: a worker leases the next task and reports to ``/tasks/{id}/result``."""
    controller = _controller(request)
    body = await read_body(request, DequeueBody)
    pool = controller.store.get(body.pool)
    if pool is None:
        raise UnknownPool(body.pool)
    lease_s = body.lease_s or pool.spec.delivery.lease_timeout
    task = await controller.queue.lease(body.pool, worker=body.worker, lease_s=lease_s)
    if task is None:
        return web.Response(status=204)
    return web.json_response(task.to_json())


@routes.post("/tasks/{id}/result")
async def report_result(request: web.Request) -> web.Response:
    controller = _controller(request)
    body = await read_body(request, ResultBody)
    task = await _existing_task(controller, request)
    task_id = task.id
    pool = controller.store.get(task.pool)
    if body.error is None:
        accepted = await controller.queue.ack(task_id, worker=body.worker, result=body.result)
        updated: Task | None = await controller.queue.get(task_id) if accepted else None
    else:
        updated = await controller.queue.fail(
            task_id,
            worker=body.worker,
            error=body.error,
            retry=retry_policy_of(pool) if pool is not None else None,
            permanent=body.permanent,
        )
    if updated is None:
        return json_error(409, f"worker {body.worker!r} does not hold the lease of task {task_id}")
    if controller.dispatcher is not None:
        controller.dispatcher.wake()
    return web.json_response(updated.to_json())


@routes.post("/tasks/{id}/heartbeat")
async def heartbeat(request: web.Request) -> web.Response:
    controller = _controller(request)
    body = await read_body(request, HeartbeatBody)
    task = await _existing_task(controller, request)
    task_id = task.id
    pool = controller.store.get(task.pool)
    lease_s = body.lease_s or (pool.spec.delivery.lease_timeout if pool else 30.0)
    if not await controller.queue.extend(task_id, worker=body.worker, lease_s=lease_s):
        return json_error(409, f"worker {body.worker!r} does not hold the lease of task {task_id}")
    return web.json_response({"id": task_id, "leaseS": lease_s})


# -- status and metrics -----------------------------------------------------------


async def _queue_lengths(controller: Controller) -> dict[str, dict[str, int]]:
    names = sorted(controller.store.pools)
    counts = await asyncio.gather(*(controller.queue.counts(n) for n in names))
    return {name: c.to_json() for name, c in zip(names, counts, strict=True)}


async def metrics_json(controller: Controller) -> dict[str, Any]:
    queues = await _queue_lengths(controller)
    snapshot = controller.snapshot()
    workers = controller.registry.list()
    live = [w for w in workers if w.state in ("starting", "ready")]
    pools = {}
    for name, status in snapshot["pools"].items():
        if name not in queues:
            continue  # declared while the counts were read; the next scrape has it
        pools[name] = {
            "queueLength": queues[name]["queued"],
            "running": queues[name]["running"],
            "ready": status["ready"],
            "starting": status["starting"],
            "draining": status["draining"],
            "desired": status["desired"],
            "tasks": queues[name],
        }
    return {
        "queueLength": sum(q["queued"] for q in queues.values()),
        "activeTasks": sum(w.in_flight for w in workers),
        "replicas": len(live) + sum(s["spawnsInFlight"] for s in snapshot["pools"].values()),
        "workerPorts": [w.host_port for w in workers if w.host_port is not None],
        "workerIds": [w.short_id for w in workers],
        "workers": snapshot["workers"],
        "requestsProcessed": sum(w.processed for w in workers),
        "outcomes": dict(controller.outcomes),
        "pools": pools,
        "policyError": snapshot["policyError"],
        "uptimeS": time.time() - controller.started_at,
        "timings": _timings_json(controller),
    }


def _timings_json(controller: Controller) -> dict[str, Any]:
    """The histograms /metrics exposes, as cumulative bucket counts (seconds)."""
    timings: dict[str, Any] = {
        "reconcileS": controller.reconciler.pass_timings.snapshot().to_json(),
    }
    if controller.dispatcher is not None:
        for key, histogram in (
            ("queueWaitS", controller.dispatcher.timings.queue_wait),
            ("runS", controller.dispatcher.timings.run_time),
        ):
            timings[key] = {pool: histogram.snapshot(pool).to_json() for pool in histogram.labels()}
    return timings


@routes.get("/metrics.json")
async def metrics_as_json(request: web.Request) -> web.Response:
    return web.json_response(await metrics_json(_controller(request)))


@routes.get("/queue-length")
async def queue_length(request: web.Request) -> web.Response:
    queues = await _queue_lengths(_controller(request))
    return web.json_response(
        {"queueLength": sum(q["queued"] for q in queues.values()), "pools": queues}
    )


@routes.get("/containers-status")
async def containers_status(request: web.Request) -> web.Response:
    workers = _controller(request).registry.list()
    return web.json_response({"containers": [w.to_json() for w in workers], "count": len(workers)})


@routes.get("/requests-processed")
async def requests_processed(request: web.Request) -> web.Response:
    controller = _controller(request)
    workers = controller.registry.list()
    return web.json_response(
        {
            "total": controller.outcomes.get("succeeded", 0),
            "byWorker": {w.name: w.processed for w in workers},
            "outcomes": dict(controller.outcomes),
        }
    )


@routes.get("/scaling-events")
async def scaling_events(request: web.Request) -> web.Response:
    controller = _controller(request)
    # No 404 for a pool no longer declared: its past events are still worth reading.
    [pool] = query_values(request, "pool")
    events = [e.to_json() for e in controller.reconciler.events if pool is None or e.pool == pool]
    return web.json_response({"events": events})


@routes.get("/autoscaler-status")
async def autoscaler_status(request: web.Request) -> web.Response:
    controller = _controller(request)
    snapshot = controller.snapshot()
    return web.json_response(
        {
            "pools": snapshot["pools"],
            "policyError": snapshot["policyError"],
            "warnings": await _orphan_warnings(controller),
        }
    )


async def _orphan_warnings(controller: Controller) -> list[dict[str, Any]]:
    """One warning per pool no manifest declares that still holds queued tasks.

    Such tasks wait for good: no worker of their pool will start. The candidates are the
    pools of the ``ORPHAN_SCAN`` oldest queued tasks (orphans never leave the queue, so they
    gather at its head), of the scaling events and of the workers left; each is counted with
    the queue's counts. The status itself never waits on the queue for long, nor fails with it.
    """
    declared = set(controller.store.pools)
    try:
        async with asyncio.timeout(ORPHAN_LOOKUP_TIMEOUT_S):
            oldest = await controller.queue.list(state="queued", limit=ORPHAN_SCAN)
            candidates = {t.pool for t in oldest}
            candidates |= {e.pool for e in controller.reconciler.events}
            candidates |= {w.pool for w in controller.registry.list()}
            names = sorted(candidates - declared)
            counts = await asyncio.gather(*(controller.queue.counts(n) for n in names))
    except (QueueUnavailable, TimeoutError):
        return [{"message": "the queue did not answer: tasks of undeclared pools not looked for"}]
    return [
        {
            "pool": name,
            "queued": c.queued,
            "message": f"pool {name!r} is declared in no manifest but holds {c.queued} queued "
            "task(s); they wait until the pool is declared again or they are cancelled",
        }
        for name, c in zip(names, counts, strict=True)
        if c.queued > 0
    ]


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


# -- the worker watch (kube-proxy style) ----------------------------------------


@routes.get("/v1/workers")
async def workers(request: web.Request) -> web.StreamResponse:
    controller = _controller(request)
    registry = controller.registry
    pool, watch, version = query_values(request, "pool", "watch", "resourceVersion")
    # A pool removed from the manifests is still known while workers of it are draining.
    if pool is not None and controller.store.get(pool) is None and not registry.list(pool):
        raise UnknownPool(pool)
    if watch not in ("true", "1"):
        return web.json_response(
            {
                "resourceVersion": registry.resource_version,
                "items": [w.to_json() for w in registry.list(pool)],
            }
        )
    try:
        since = registry.resource_version if version is None else int(version)
    except ValueError as exc:
        raise BadRequest("resourceVersion must be an integer") from exc
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    try:
        async for event in registry.watch(since=since):
            if pool is not None and event.worker.pool != pool:
                continue
            await response.write(json.dumps(event.to_json()).encode() + b"\n")
    except WatchExpired as exc:
        await response.write(json.dumps({"type": "ERROR", "code": 410, "error": str(exc)}).encode())
    except ConnectionResetError:
        pass
    return response


@routes.post("/v1/pools/{pool}/activate")
async def activate(request: web.Request) -> web.Response:
    """Asks for capacity in a pool that may be at zero (the balancer's activator)."""
    controller = _controller(request)
    pool = request.match_info["pool"]
    if controller.store.get(pool) is None:
        raise UnknownPool(pool)
    body = await read_body(request, ActivateBody) if request.can_read_body else ActivateBody()
    if body.in_flight is not None:
        controller.reconciler.report_sync_load(pool, in_flight=body.in_flight)
    # A load report alone holds no capacity; an ask without a hold gets the default.
    hold_s = (
        body.hold_s if body.hold_s is not None else (None if body.in_flight is not None else 30.0)
    )
    if hold_s is None:
        policy = controller.store.get(pool)
        granted = policy is not None and policy.spec.replicas.max > 0
    else:
        granted = controller.reconciler.request_capacity(pool, hold_s=hold_s)
    if not granted:
        return json_error(409, f"pool {pool!r} has max 0 replicas", headers={"Retry-After": "5"})
    return web.json_response({"pool": pool, "requested": hold_s is not None}, status=202)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Maps errors to JSON bodies; a client never sees a traceback."""
    try:
        return await handler(request)
    except BadRequest as exc:
        return json_error(exc.status, str(exc), **exc.extra)
    except (UnknownPool, TaskNotFound) as exc:
        return json_error(404, str(exc))
    except IdempotencyConflict as exc:
        # 422, as draft-ietf-httpapi-idempotency-key-header (section 2.7) asks for a
        # key reused with another payload; our 409s mean "the task's state forbids it".
        return json_error(422, str(exc), idempotencyKey=exc.idempotency_key, taskId=exc.task_id)
    except QueueUnavailable as exc:
        retry_after = str(max(1, round(exc.retry_after_s)))
        return json_error(503, f"queue unavailable: {exc}", headers={"Retry-After": retry_after})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text or exc.reason
        if exc.status == 413:
            message = f"request body too large (limit {request.app[MAX_BODY_BYTES]} bytes)"
        return json_error(exc.status, message)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return json_error(500, "internal error; see the Shoal log")
