"""Request bodies of the HTTP API, validated with pydantic at the edge.

Every model refuses unknown fields, so a misspelt option is an error rather
than silently ignored. Handlers turn ``ValidationError`` into a 400 that names
the field and the reason.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_KEY_LENGTH = 200


class _Body(BaseModel):
    # strict: `true` is not 1 second and "3" is not 3 attempts.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)


class EnqueueBody(_Body):
    pool: str = Field(default="default", min_length=1, max_length=64)
    payload: Any = None
    work_seconds: float | None = Field(default=None, ge=0, le=86400, alias="work_seconds")
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=MAX_KEY_LENGTH)
    max_attempts: int | None = Field(default=None, ge=1, le=100)


class DispatchBody(EnqueueBody):
    timeout_s: float = Field(default=30.0, gt=0, le=3600)


class DequeueBody(_Body):
    pool: str = Field(default="default", min_length=1, max_length=64)
    worker: str = Field(min_length=1, max_length=128)
    lease_s: float | None = Field(default=None, gt=0, le=86400)


class ResultBody(_Body):
    worker: str = Field(min_length=1, max_length=128)
    result: Any = None
    error: str | None = Field(default=None, max_length=10_000)
    permanent: bool = False


class ActivateBody(_Body):
    """Optional: the balancer's requests in flight to the pool, counted as work."""

    in_flight: int | None = Field(default=None, ge=0, le=1_000_000, alias="inFlight")
    # How long the ask for capacity holds; without it a load report asks for none.
    hold_s: float | None = Field(default=None, gt=0, le=3600, alias="holdS")


class HeartbeatBody(_Body):
    worker: str = Field(min_length=1, max_length=128)
    lease_s: float | None = Field(default=None, gt=0, le=86400)


def describe_validation_error(exc: ValidationError) -> list[dict[str, str]]:
    problems = []
    for item in exc.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(body)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append({"field": field, "reason": message})
    return problems
