"""Logging set-up: plain text for people, JSON lines for aggregators.

Structured fields travel in ``extra=`` under the names in ``controller.logfields``;
the text format appends them as ``key=value``, the JSON format as keys. A record made
while a span is current (a task being dispatched, a reconcile pass) also carries that
span's ``trace_id``, so a task's lines can be found from its trace and back.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from controller import logfields
from controller.telemetry import current_trace_id

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class TraceContextFilter(logging.Filter):
    """Adds the current span's trace id to every record that does not carry one yet."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, logfields.TRACE_ID, None) is None:
            trace_id = current_trace_id()
            if trace_id is not None:
                setattr(record, logfields.TRACE_ID, trace_id)
        return True


# Shown on a task's text lines at every level: they tie the line to the task's trace.
_TASK_FIELDS = (logfields.TASK_ID, logfields.TRACE_ID)


class TextFormatter(logging.Formatter):
    """One line per record; structured fields are appended only at debug level,
    since every info message already names what it is about. A task's lines get its
    task id and trace id at every level: they are what a reader greps for."""

    def __init__(self, *, with_fields: bool = False) -> None:
        super().__init__()
        self.with_fields = with_fields

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: "
        line += record.getMessage()
        fields = _extras(record)
        if not self.with_fields:
            on_task = logfields.TASK_ID in fields
            fields = {k: v for k, v in fields.items() if on_task and k in _TASK_FIELDS}
        if fields:
            line += "  " + " ".join(f"{k}={v}" for k, v in sorted(fields.items()))
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(*, level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    debug = level.lower() == "debug"
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(with_fields=debug))
    handler.addFilter(TraceContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The docker SDK and urllib3 are chatty at debug; keep them at warning.
    for noisy in ("urllib3", "docker", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
