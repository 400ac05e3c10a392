"""The OpenAPI 3.1 description of Shoal's HTTP API, served at ``/openapi.json`` and ``/docs``.

Request bodies come from the pydantic models in ``api.models`` (OpenAPI 3.1 speaks JSON
Schema 2020-12, which is what pydantic writes), so a field added there shows up here by
itself. Response shapes are written by hand below, next to the operations, because the
handlers build plain dicts. ``/docs`` renders the same document as one HTML page on the
server: no script, no CDN, nothing fetched from elsewhere.

Streaming operations carry ``x-shoal-streaming`` (on the operation or the parameter that
turns streaming on): they answer by never ending, so the fuzz test leaves them out.

It routes nothing but its own two pages; ``api.app`` calls ``setup``.
"""

from __future__ import annotations

import copy
import html
import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from api.models import (
    MAX_KEY_LENGTH,
    ActivateBody,
    DequeueBody,
    DispatchBody,
    EnqueueBody,
    HeartbeatBody,
    ResultBody,
)
from controller.queues.base import TASK_STATES

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"
JSON = "application/json"
_BODY_MODELS: tuple[type[BaseModel], ...] = (
    EnqueueBody,
    DispatchBody,
    DequeueBody,
    ResultBody,
    HeartbeatBody,
    ActivateBody,
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_NUMBER = {"type": "number"}
_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}


def _object(properties: dict[str, Any], *, required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
    }


_RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {
        **_object(
            {
                "error": _STR,
                "problems": {
                    "type": "array",
                    "items": _object({"field": _STR, "reason": _STR}),
                },
                "idempotencyKey": _STR,
                "taskId": _STR,
            },
            required=["error"],
        ),
        "description": "Every 4xx and 5xx answer; nothing was stored.",
    },
    "Task": _object(
        {
            "id": _STR,
            "pool": _STR,
            "state": {"enum": list(TASK_STATES)},
            "attempts": _INT,
            "maxAttempts": _INT,
            "payload": {},
            "workSeconds": _nullable(_NUMBER),
            "idempotencyKey": _nullable(_STR),
            "worker": _nullable(_STR),
            "result": {},
            "error": _nullable(_STR),
            "createdAt": _NUMBER,
            "startedAt": _nullable(_NUMBER),
            "finishedAt": _nullable(_NUMBER),
            "leaseExpiresAt": _nullable(_NUMBER),
            "notBefore": _nullable(_NUMBER),
            "workers": {"type": "array", "items": _STR},
        }
    ),
    "Enqueued": _object(
        {
            "id": _STR,
            "pool": _STR,
            "state": {"enum": list(TASK_STATES)},
            "created": {"type": "boolean"},
        }
    ),
    "TaskPage": _object(
        {"items": {"type": "array", "items": _ref("Task")}, "next": _STR}, required=["items"]
    ),
    "QueueCounts": _object(
        {
            name: _INT
            for name in ("queued", "ready", "running", "succeeded", "failed", "dead", "cancelled")
        }
    ),
    "Worker": _object(
        {
            "id": _STR,
            "workerId": _STR,
            "name": _STR,
            "pool": _STR,
            "templateHash": _STR,
            "host": _STR,
            "hostPort": _nullable({"type": "integer"}),
            "state": {"enum": ["starting", "ready", "draining", "gone"]},
            "healthy": {"type": "boolean"},
            "inFlight": _INT,
            "processed": _INT,
            "failed": _INT,
            "concurrency": _INT,
            "createdAt": _NUMBER,
            "readyAt": _nullable(_NUMBER),
            "drainingSince": _nullable(_NUMBER),
        }
    ),
    "PoolStatus": {
        **_object(
            {
                "pool": _STR,
                "desired": _nullable({"type": "integer"}),
                "ready": _INT,
                "starting": _INT,
                "draining": _INT,
                "spawnsInFlight": _INT,
                "queue": _ref("QueueCounts"),
                "lastDecision": _nullable({"type": "object"}),
                "lastError": _nullable(_STR),
            }
        ),
        "description": "What the reconciler publishes for one pool (more fields may appear).",
    },
    "ScalingEvent": _object(
        {"time": _NUMBER, "pool": _STR, "from": _INT, "to": _INT, "reason": _STR}
    ),
}


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json_response(description, _ref("Error"))


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": _ref(model.__name__)}}}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": _STR,
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


_TASK_ID = _path_param("id", "The task id that enqueue returned.")
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "The same as the ``idempotency_key`` field, with its rules; sent with "
    "the field, it must be equal to it (400 otherwise).",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH},
}
_POOL_QUERY = _query("pool", _STR, "Only this pool.")
_BAD = _error("The request is malformed or fails validation.")
_UNKNOWN = _error("No such task or pool.")
_CONFLICT = _error("The task is not in a state that allows this.")
_TOO_LARGE = _error("The body is larger than the limit.")
_UNAVAILABLE = _error("The queue cannot be reached; retry after ``Retry-After``.")
_KEY_REUSED = _error(
    "The idempotency key already names a task made from a different request "
    "(payload, work_seconds or max_attempts differ); ``idempotencyKey`` and ``taskId`` "
    "say which. Nothing was stored."
)


def _operations() -> dict[str, dict[str, Any]]:
    task = _json_response("The task.", _ref("Task"))
    return {
        "/enqueue-task": {
            "post": {
                "summary": "Enqueue a task",
                "description": "Stores a task durably; a worker runs it when one has room. "
                "An ``Idempotency-Key`` header or ``idempotency_key`` field makes a retry "
                "return the first task instead of a new one; the same key with a different "
                "payload, work_seconds or max_attempts is refused with 422. Keys are scoped "
                "to the pool and free again once their task was pruned (``--task-retention``). "
                "A ``traceparent`` header puts the task's spans into the caller's "
                "trace.",
                "parameters": [_IDEMPOTENCY_KEY],
                "requestBody": _body(EnqueueBody),
                "responses": {
                    "202": _json_response("Stored.", _ref("Enqueued")),
                    "200": _json_response("Already stored under this key.", _ref("Enqueued")),
                    "400": _BAD,
                    "404": _UNKNOWN,
                    "413": _TOO_LARGE,
                    "422": _KEY_REUSED,
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/dispatch-task": {
            "post": {
                "summary": "Enqueue a task and wait for its outcome",
                "parameters": [_IDEMPOTENCY_KEY],
                "requestBody": _body(DispatchBody),
                "responses": {
                    "200": _json_response("The task reached a final state.", _ref("Task")),
                    "202": _json_response("Still running after timeout_s.", _ref("Task")),
                    "400": _BAD,
                    "404": _UNKNOWN,
                    "413": _TOO_LARGE,
                    "422": _KEY_REUSED,
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/tasks": {
            "get": {
                "summary": "List tasks, oldest first",
                "parameters": [
                    _query("state", {"enum": list(TASK_STATES)}, "Only tasks in this state."),
                    _POOL_QUERY,
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        "Page size.",
                    ),
                    _query("after", _STR, "The ``next`` of the previous page."),
                ],
                "responses": {
                    "200": _json_response("A page of tasks.", _ref("TaskPage")),
                    "400": _BAD,
                    "404": _UNKNOWN,
                },
            }
        },
        "/tasks/{id}": {
            "get": {
                "summary": "Read a task",
                "parameters": [_TASK_ID],
                "responses": {"200": task, "404": _UNKNOWN},
            }
        },
        "/tasks/{id}/cancel": {
            "post": {
                "summary": "Cancel a queued task",
                "parameters": [_TASK_ID],
                "responses": {"200": task, "404": _UNKNOWN, "409": _CONFLICT},
            }
        },
        "/tasks/{id}/redrive": {
            "post": {
                "summary": "Queue a dead or failed task again with fresh attempts",
                "parameters": [_TASK_ID],
                "responses": {"200": task, "404": _UNKNOWN, "409": _CONFLICT},
            }
        },
        "/dequeue-task": {
            "post": {
                "summary": "Pull mode: lease the next task of a pool",
                "requestBody": _body(DequeueBody),
                "responses": {
                    "200": task,
                    "204": {"description": "Nothing to lease now."},
                    "400": _BAD,
                    "404": _UNKNOWN,
                    "413": _TOO_LARGE,
                },
            }
        },
        "/tasks/{id}/result": {
            "post": {
                "summary": "Pull mode: report the outcome of a leased task",
                "parameters": [_TASK_ID],
                "requestBody": _body(ResultBody),
                "responses": {
                    "200": task,
                    "400": _BAD,
                    "404": _UNKNOWN,
                    "409": _error("The worker does not hold the lease."),
                    "413": _TOO_LARGE,
                },
            }
        },
        "/tasks/{id}/heartbeat": {
            "post": {
                "summary": "Pull mode: extend the lease of a task",
                "parameters": [_TASK_ID],
                "requestBody": _body(HeartbeatBody),
                "responses": {
                    "200": _json_response(
                        "The lease was extended.", _object({"id": _STR, "leaseS": _NUMBER})
                    ),
                    "400": _BAD,
                    "404": _UNKNOWN,
                    "409": _error("The worker does not hold the lease."),
                    "413": _TOO_LARGE,
                },
            }
        },
        **_status_operations(),
    }


def _with_responses(item: dict[str, Any], responses: dict[str, Any]) -> dict[str, Any]:
    """``item`` (one GET) with ``responses`` added to the answers it declares."""
    op = item["get"]
    return {"get": {**op, "responses": {**op["responses"], **responses}}}


def _status_operations() -> dict[str, dict[str, Any]]:
    def get(summary: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {
            "get": {
                "summary": summary,
                **extra,
                "responses": {"200": _json_response(summary, schema)},
            }
        }

    pools_counts = {"type": "object", "additionalProperties": _ref("QueueCounts")}
    return {
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "description": "Text exposition format 0.0.4, from prometheus-client.",
                "responses": {
                    "200": {"description": "Metrics.", "content": {"text/plain": {"schema": _STR}}}
                },
            }
        },
        "/metrics.json": get(
            "Aggregates as JSON (the figures /metrics shows)",
            _object(
                {
                    "queueLength": _INT,
                    "activeTasks": _INT,
                    "replicas": _INT,
                    "requestsProcessed": _INT,
                    "workers": {"type": "array", "items": _ref("Worker")},
                    "outcomes": {"type": "object", "additionalProperties": _INT},
                    "pools": {"type": "object"},
                    "timings": {"type": "object"},
                },
            ),
        ),
        "/queue-length": get(
            "Queued tasks in total and counts per pool",
            _object({"queueLength": _INT, "pools": pools_counts}),
        ),
        "/containers-status": get(
            "Known workers",
            _object({"containers": {"type": "array", "items": _ref("Worker")}, "count": _INT}),
        ),
        "/requests-processed": get(
            "Tasks processed in total and per worker",
            _object(
                {
                    "total": _INT,
                    "byWorker": {"type": "object", "additionalProperties": _INT},
                    "outcomes": {"type": "object", "additionalProperties": _INT},
                }
            ),
        ),
        "/scaling-events": _with_responses(
            get(
                "Changes of desired replicas, oldest first",
                _object({"events": {"type": "array", "items": _ref("ScalingEvent")}}),
                parameters=[_POOL_QUERY],
            ),
            {"400": _BAD},
        ),
        "/autoscaler-status": get(
            "Per-pool status, the policy error and warnings (tasks no pool will run)",
            _object(
                {
                    "pools": {"type": "object", "additionalProperties": _ref("PoolStatus")},
                    "policyError": _nullable({"type": "object"}),
                    "warnings": {
                        "type": "array",
                        "items": _object(
                            {"pool": _STR, "queued": _INT, "message": _STR}, required=["message"]
                        ),
                    },
                }
            ),
        ),
        "/healthz": {
            **get("Liveness; needs no token", _object({"status": {"const": "ok"}})),
        },
        "/v1/workers": {
            "get": {
                "summary": "List workers, or watch their changes as NDJSON",
                "parameters": [
                    _POOL_QUERY,
                    {
                        **_query(
                            "watch",
                            {"enum": ["true", "1"]},
                            "Stream ADDED/MODIFIED/DELETED events as NDJSON until closed.",
                        ),
                        "x-shoal-streaming": True,
                    },
                    _query("resourceVersion", {"type": "integer"}, "Resume a watch after this."),
                ],
                "responses": {
                    "200": _json_response(
                        "The workers and the version to watch from.",
                        _object(
                            {
                                "resourceVersion": _INT,
                                "items": {"type": "array", "items": _ref("Worker")},
                            }
                        ),
                    ),
                    "400": _BAD,
                    "404": _error("No such pool declared, and no worker of it left."),
                },
            }
        },
        "/v1/pools/{pool}/activate": {
            "post": {
                "summary": "Ask for at least one worker in a pool (scale from zero)",
                "parameters": [_path_param("pool", "The pool name.")],
                "requestBody": {**_body(ActivateBody), "required": False},
                "responses": {
                    "202": _json_response(
                        "Capacity was asked for.",
                        _object({"pool": _STR, "requested": {"type": "boolean"}}),
                    ),
                    "400": _BAD,
                    "404": _UNKNOWN,
                    "409": _error("The pool allows no worker (max 0)."),
                },
            }
        },
        "/": {"get": _html("The live dashboard")},
        "/dashboard/{name}": {
            "get": {
                "summary": "A file of the dashboard",
                "parameters": [_path_param("name", "The file name.")],
                "responses": {"200": {"description": "The file."}, "404": _UNKNOWN},
            }
        },
        "/v1/stream": {
            "get": {
                "summary": "Dashboard snapshots as server-sent events",
                "x-shoal-streaming": True,
                "responses": {
                    "200": {
                        "description": "An event stream.",
                        "content": {"text/event-stream": {"schema": _STR}},
                    }
                },
            }
        },
        "/openapi.json": get("This document", {"type": "object"}),
        "/docs": {"get": _html("This document as a page")},
    }


def _html(summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "responses": {"200": {"description": "HTML.", "content": {"text/html": {"schema": _STR}}}},
    }


def build_document() -> dict[str, Any]:
    """The whole OpenAPI document; a fresh copy on every call."""
    schemas: dict[str, Any] = {}
    for model in _BODY_MODELS:
        schema = model.model_json_schema(by_alias=True, ref_template=REF, mode="validation")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas.update(copy.deepcopy(_RESPONSE_SCHEMAS))
    paths = _operations()
    paths["/healthz"]["get"]["security"] = []
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Shoal",
            "version": "0.1.0",
            "description": "A durable task queue with a pool of workers that fits the work. "
            "When a token is configured, every operation but /healthz needs "
            "``Authorization: Bearer <token>``. A query parameter given more than once "
            "is refused with 400.",
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


# -- /docs ----------------------------------------------------------------------------------

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Shoal API</title>
<style>
body{{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}}
h2{{font-size:1.05rem;margin:1.6rem 0 .3rem}} code,pre{{font:13px ui-monospace,monospace}}
pre{{background:#f4f4f4;padding:.6rem;overflow:auto}} .m{{font-weight:700;color:#06c}}
td{{padding:.1rem .6rem .1rem 0;vertical-align:top}}
</style></head><body>
<h1>Shoal API</h1>
<p>{intro} The machine-readable form is at <a href="/openapi.json">/openapi.json</a>.</p>
{operations}
<h2>Schemas</h2>{schemas}
</body></html>
"""


def _render_operation(path: str, method: str, op: dict[str, Any]) -> str:
    e = html.escape
    parts = [f'<h2><span class="m">{e(method.upper())}</span> <code>{e(path)}</code></h2>']
    parts.append(f"<p>{e(op.get('summary', ''))}. {e(op.get('description', ''))}</p>")
    params = op.get("parameters", [])
    if params:
        rows = "".join(
            f"<tr><td><code>{e(p['name'])}</code></td><td>{e(p['in'])}</td>"
            f"<td><code>{e(json.dumps(p['schema']))}</code></td><td>{e(p['description'])}</td></tr>"
            for p in params
        )
        parts.append(f"<table>{rows}</table>")
    body = op.get("requestBody")
    if body:
        parts.append(f"<p>Body: <code>{e(body['content'][JSON]['schema']['$ref'])}</code></p>")
    answers = ", ".join(
        f"{e(code)} {e(answer['description'])}" for code, answer in op["responses"].items()
    )
    parts.append(f"<p>Answers: {answers}</p>")
    return "\n".join(parts)


def render_docs(document: dict[str, Any]) -> str:
    operations = "\n".join(
        _render_operation(path, method, op)
        for path, item in document["paths"].items()
        for method, op in item.items()
    )
    schemas = "\n".join(
        f'<h3 id="{html.escape(name)}">{html.escape(name)}</h3>'
        f"<pre>{html.escape(json.dumps(schema, indent=2))}</pre>"
        for name, schema in document["components"]["schemas"].items()
    )
    return _PAGE.format(
        intro=html.escape(document["info"]["description"]),
        operations=operations,
        schemas=schemas,
    )


_DOCUMENT = web.AppKey("openapi_document", bytes)
_DOCS_PAGE = web.AppKey("openapi_docs_page", bytes)


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[_DOCUMENT], content_type=JSON)


async def docs(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[_DOCS_PAGE],
        content_type="text/html",
        charset="utf-8",
        headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"},
    )


def setup(app: web.Application) -> None:
    """Serves ``/openapi.json`` and ``/docs``; the document is built once, here."""
    document = build_document()
    app[_DOCUMENT] = json.dumps(document, indent=2).encode()
    app[_DOCS_PAGE] = render_docs(document).encode()
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs)
