"""Logging set-up: plain text for people, JSON lines for aggregators.

Structured fields travel in ``extra=`` under the names in ``controller.logfields``;
the text format appends them as ``key=value``, the JSON format as keys.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """One line per record; structured fields are appended only at debug level,
    since every info message already names what it is about."""

    def __init__(self, *, with_fields: bool = False) -> None:
        super().__init__()
        self.with_fields = with_fields

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: "
        line += record.getMessage()
        if self.with_fields:
            fields = _extras(record)
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
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The docker SDK and urllib3 are chatty at debug; keep them at warning.
    for noisy in ("urllib3", "docker", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
