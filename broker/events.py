"""Events: one JSON object a line on standard output (`ts`, `level`, `event`, ...).

Lifecycle events (docs/contract.md, "Metrics and logs"): tenant.activated, tenant.key_rotated,
tenant.activation_failed, tenant.broken, tenant.recovered, tenant.disconnected.
Fields are plain values chosen by the caller; a key is never one of them.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

LOGGER_NAME = "broker"
_logger = logging.getLogger(LOGGER_NAME)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object with its event fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None) or record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info and record.exc_info[0] is not None:
            line["error_type"] = record.exc_info[0].__name__
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """A human-readable line: time, level, event, then key=value fields."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S")
        event = getattr(record, "event", None) or record.getMessage()
        fields = " ".join(
            f"{name}={value}" for name, value in getattr(record, "fields", {}).items()
        )
        return f"{ts} {record.levelname.lower():7} {event} {fields}".rstrip()


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Send the broker's events to standard output in the chosen format."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    _logger.handlers[:] = [handler]
    _logger.setLevel(level)
    _logger.propagate = False


def emit(event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with its fields (never pass a key)."""
    if _logger.isEnabledFor(level):
        _logger.log(level, event, extra={"event": event, "fields": fields})
