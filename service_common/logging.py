"""Structured logs: one line per record, ``key=value`` (for people and grep) or JSON (for collectors).

Every line carries the request id of the RPC it was logged from: a handler calls
:func:`bind_request_id` once, and every log call in that RPC's task (grpc.aio runs each RPC in its own
task, so the binding never leaks into another RPC) carries it without passing it around. Fields given
with ``extra={...}`` are appended as their own keys.

Lines are bounded: a field longer than ``MAX_FIELD_CHARS`` (``MAX_EXC_CHARS`` for a traceback) is cut
and says how much was left out, so a multi-megabyte request id or body never lands whole in a log.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import IO, Any, Literal

MAX_FIELD_CHARS = 2048
MAX_EXC_CHARS = 16384

_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra`` and is logged as a field.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def bind_request_id(request_id: str) -> None:
    """Tag every later log line of the current RPC (task) with ``request_id``."""
    _request_id.set(request_id)


def current_request_id() -> str | None:
    """The request id bound in the current RPC (task), if any."""
    return _request_id.get()


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields of one log line, in order: time, level, logger, request id, message, extras, exception."""
    fields: dict[str, Any] = {
        "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "logger": record.name,
    }
    request_id = getattr(record, "request_id", None) or current_request_id()
    if request_id:
        fields["request_id"] = truncate(str(request_id))
    fields["msg"] = truncate(record.getMessage())
    for key, value in vars(record).items():
        if key not in _RECORD_ATTRS and key != "request_id":
            fields[key] = _bounded(value)
    if record.exc_info:
        fields["exc"] = truncate(logging.Formatter().formatException(record.exc_info), MAX_EXC_CHARS)
    return fields


def _bounded(value: Any) -> Any:
    """A field value as is (numbers, short values: JSON keeps their type), or cut to MAX_FIELD_CHARS."""
    if isinstance(value, (int, float, bool, type(None))):
        return value
    text = value if isinstance(value, str) else str(value)
    return value if len(text) <= MAX_FIELD_CHARS else truncate(text)


def truncate(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """``text``, or its first ``limit`` characters and how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more chars]"


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=x request_id=r msg="..." key=value``; values with spaces are quoted."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_kv_value(value)}" for key, value in record_fields(record).items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the same keys as :class:`KeyValueFormatter`."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(record_fields(record), default=str, ensure_ascii=False)


def _kv_value(value: Any) -> str:
    text = str(value)
    if text and not any(c.isspace() or c in '"=' for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)  # quoted, with newlines and quotes escaped


def configure_logging(
    level: str | int = "INFO", fmt: Literal["kv", "json"] = "kv", stream: IO[str] | None = None
) -> None:
    """Send every logger's records to ``stream`` (stderr) as structured lines; replaces root handlers."""
    if fmt not in ("kv", "json"):
        raise ValueError(f"fmt must be 'kv' or 'json', got {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
