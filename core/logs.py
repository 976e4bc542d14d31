"""Log lines as text or JSON (`MODTAG_LOG_FORMAT`), carrying the request id, job id and tenant wherever known.

`log_context(request_id=..., job_id=...)` binds fields for the code it wraps (a request in the API, a job in the
worker); `add_log_fields` adds to the innermost binding (the tenant, once the job is read). In JSON every line is
one object: `time`, `level`, `logger`, `message`, the bound fields, and `exception` when there is one. The request
id travels with the job (its row's `request_id`), so one request can be followed through the API and the worker.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What a client may send as X-Request-ID; anything else is replaced by a fresh id (it ends up in logs and rows).
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_FIELDS: ContextVar[dict[str, str] | None] = ContextVar("modtag_log_fields", default=None)


@contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Bind `fields` (None values skipped) to every log line of the wrapped code, in this thread or task."""
    token = _FIELDS.set({**(_FIELDS.get() or {}), **{name: value for name, value in fields.items() if value}})
    try:
        yield
    finally:
        _FIELDS.reset(token)


def add_log_fields(**fields: str | None) -> None:
    """Add to the innermost `log_context`, in place: a request's worker threads share its binding (each runs in a
    copy of the request's context, which holds the same dict), so the tenant found by one shows in all."""
    given = {name: value for name, value in fields.items() if value}
    bound = _FIELDS.get()
    if bound is None:
        _FIELDS.set(given)
    else:
        bound.update(given)


def log_fields() -> dict[str, str]:
    return dict(_FIELDS.get() or {})


def request_id_from(header: str | None) -> str:
    """The caller's X-Request-ID when it is a plain token, else a new one."""
    if header and REQUEST_ID_PATTERN.match(header):
        return header
    return secrets.token_hex(16)


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **log_fields(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(log_format: str, level: str | int = "INFO") -> None:
    """The root logger writes `log_format` ("text" or "json") to stderr; every other handler on it is replaced."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
