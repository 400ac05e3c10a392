"""The WorkerPool policy: what a user declares in ``manifests/*.yaml``.

This module owns the schema (pydantic models, strict: unknown fields are refused)
and turning YAML files into validated ``WorkerPool`` objects. It does no I/O
beyond reading the files it is given; watching them for changes is the store's
job (``controller.store``), acting on them the reconciler's.

Durations are written as in Kubernetes manifests (``1s``, ``250ms``, ``5m``,
``1h``) or as plain numbers of seconds, and are held as float seconds.
Memory sizes take the Kubernetes suffixes (``128Mi``, ``1G``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from controller.errors import PolicyError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|k|K|M|G|T)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}


def parse_duration_s(value: Any) -> float:
    """``"1.5s"``, ``"250ms"``, ``"5m"``, ``30`` -> seconds. Negative values are refused."""
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or a string like '30s'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(
                f"{value!r} is not a duration; write e.g. '500ms', '30s', '5m' or '1h'"
            )
        seconds = float(match.group(1)) * _DURATION_UNITS_S[match.group(2)]
    else:
        raise ValueError("a duration must be a number of seconds or a string like '30s'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size_bytes(value: Any) -> int:
    """``"128Mi"`` -> 134217728. Kubernetes quantity suffixes; plain numbers are bytes."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '128Mi'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a size; write e.g. '128Mi' or '1Gi'")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    else:
        raise ValueError("a size must be a number of bytes or a string like '128Mi'")
    if size <= 0:
        raise ValueError("a size must be positive")
    return size


Duration = Annotated[float, BeforeValidator(parse_duration_s)]
Size = Annotated[int, BeforeValidator(parse_size_bytes)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Replicas(_Strict):
    min: int = Field(default=0, ge=0)
    max: int = Field(default=4, ge=0, le=256)

    @model_validator(mode="after")
    def _min_not_above_max(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class Resources(_Strict):
    memory: Size | None = 128 * 1024**2
    cpus: float | None = Field(default=0.5, gt=0, le=64)
    pids: int | None = Field(default=128, ge=16)


class Template(_Strict):
    image: str = Field(default="shoal/worker:latest", min_length=1)
    port: int = Field(default=8080, ge=1, le=65535)
    concurrency: int = Field(default=1, ge=1, le=1024)
    env: dict[str, str] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)

    def template_hash(self) -> str:
        """A short, stable digest of everything that defines a worker.

        NB: it is stored as a container label and compared across controller
        restarts, so it must not depend on dict order or Python's hash seed.
        """
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


class Targets(_Strict):
    backlog_per_replica: float | None = Field(default=2.0, gt=0, alias="backlogPerReplica")
    utilization: float | None = Field(default=None, gt=0, le=1)
    tolerance: float = Field(default=0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _one_target(self) -> Targets:
        if self.backlog_per_replica is None and self.utilization is None:
            raise ValueError("set at least one of backlogPerReplica and utilization")
        return self


class ScaleUp(_Strict):
    stabilization_window: Duration = Field(default=0.0, alias="stabilizationWindow")
    max_step: int = Field(default=4, ge=1, alias="maxStep")
    period: Duration = Field(default=15.0)


class ScaleDown(_Strict):
    stabilization_window: Duration = Field(default=60.0, alias="stabilizationWindow")
    max_step: int | None = Field(default=None, ge=1, alias="maxStep")
    period: Duration = Field(default=15.0)
    drain_timeout: Duration = Field(default=300.0, alias="drainTimeout")
    grace_period: Duration = Field(default=10.0, alias="gracePeriod")


class Spawn(_Strict):
    max_in_flight: int = Field(default=1, ge=1, le=32, alias="maxInFlight")
    min_interval: Duration = Field(default=1.0, alias="minInterval")


class ScaleToZero(_Strict):
    after: Duration = Field(default=120.0)


class Panic(_Strict):
    enabled: bool = True
    window: Duration = Field(default=6.0)
    threshold: float = Field(default=2.0, gt=1)


class Predictive(_Strict):
    enabled: bool = False
    # "auto": the measured start-up time of a worker.
    horizon: Literal["auto"] | Duration = "auto"


class Scaling(_Strict):
    evaluation_interval: Duration = Field(default=1.0, alias="evaluationInterval")
    targets: Targets = Field(default_factory=Targets)
    scale_up: ScaleUp = Field(default_factory=ScaleUp, alias="scaleUp")
    scale_down: ScaleDown = Field(default_factory=ScaleDown, alias="scaleDown")
    spawn: Spawn = Field(default_factory=Spawn)
    scale_to_zero: ScaleToZero = Field(default_factory=ScaleToZero, alias="scaleToZero")
    panic: Panic = Field(default_factory=Panic)
    predictive: Predictive = Field(default_factory=Predictive)

    @model_validator(mode="after")
    def _interval_positive(self) -> Scaling:
        if self.evaluation_interval <= 0:
            raise ValueError("evaluationInterval must be greater than 0")
        return self


class Backoff(_Strict):
    initial: Duration = 1.0
    max: Duration = 60.0
    jitter: bool = True


class Delivery(_Strict):
    lease_timeout: Duration = Field(default=30.0, alias="leaseTimeout")
    max_attempts: int = Field(default=5, ge=1, le=100, alias="maxAttempts")
    backoff: Backoff = Field(default_factory=Backoff)

    @model_validator(mode="after")
    def _lease_positive(self) -> Delivery:
        if self.lease_timeout <= 0:
            raise ValueError("leaseTimeout must be greater than 0")
        return self


class BalancerSpec(_Strict):
    strategy: Literal["least-connections", "round-robin", "power-of-two"] = "least-connections"


class PoolSpec(_Strict):
    replicas: Replicas = Field(default_factory=Replicas)
    template: Template = Field(default_factory=Template)
    scaling: Scaling = Field(default_factory=Scaling)
    delivery: Delivery = Field(default_factory=Delivery)
    balancer: BalancerSpec = Field(default_factory=BalancerSpec)


class Metadata(_Strict):
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
    labels: dict[str, str] = Field(default_factory=dict)


class WorkerPool(_Strict):
    api_version: Literal["shoal/v1"] = Field(alias="apiVersion")
    kind: Literal["WorkerPool"]
    metadata: Metadata
    spec: PoolSpec = Field(default_factory=PoolSpec)

    @property
    def name(self) -> str:
        return self.metadata.name


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(document)"


def _describe(err: ValidationError, *, doc_index: int) -> list[str]:
    lines = []
    for item in err.errors():
        loc = tuple(p for p in item["loc"] if not str(p).startswith("function-"))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"document {doc_index}: {_field_path(loc)}: {message}")
    return lines


def parse_pools(text: str, *, source: str) -> list[WorkerPool]:
    """Parses and validates every ``WorkerPool`` document in ``text``.

    Raises ``PolicyError`` naming ``source``, the field path and the reason of
    each problem; it never returns a partial list.
    """
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise PolicyError(source, [f"not valid YAML: {exc}"]) from exc

    pools: list[WorkerPool] = []
    problems: list[str] = []
    for index, document in enumerate(documents):
        if not isinstance(document, dict):
            problems.append(f"document {index}: expected a mapping, got {type(document).__name__}")
            continue
        try:
            pools.append(WorkerPool.model_validate(document))
        except ValidationError as exc:
            problems.extend(_describe(exc, doc_index=index))

    names = [p.name for p in pools]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"metadata.name: pool {name!r} is declared more than once")
    if problems:
        raise PolicyError(source, problems)
    return pools


def load_pools(path: Path) -> list[WorkerPool]:
    """Loads the pools from one YAML file or from every ``*.yaml``/``*.yml`` in a folder.

    Files under a folder named ``examples`` are not loaded.
    """
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in {".yaml", ".yml"} and p.is_file())
    else:
        files = [path]
    if not files:
        raise PolicyError(str(path), ["no *.yaml manifests found"])

    pools: list[WorkerPool] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(str(file), [f"cannot read: {exc.strerror or exc}"]) from exc
        except UnicodeDecodeError as exc:
            raise PolicyError(
                str(file), [f"not UTF-8 text: {exc.reason} at byte {exc.start}"]
            ) from exc
        found = parse_pools(text, source=str(file))
        if not found:
            # An editor that truncates before writing must not tear the pools down.
            raise PolicyError(str(file), ["declares no WorkerPool (empty or only comments)"])
        pools.extend(found)

    names = [p.name for p in pools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PolicyError(
            str(path), [f"pool {n!r} is declared in more than one file" for n in duplicates]
        )
    return pools
