"""A model server's logs: one JSON object per line, on stderr.

Every line has `time` (UTC, ISO 8601), `level`, `logger` and `message`; an exception adds
`exception` (the traceback). At DEBUG (`AIMESH_LOG_LEVEL=DEBUG`) each call that ended
adds one line, `"message": "call"`, with what the server knows of it: method, model,
version, pool, status, reason, duration_ms, time to first output, units, tenant, request
id and the trace id of the caller's W3C `traceparent`. Never the call's content: a
prompt, an image or audio is not in any log line, at any level.

The `[aimesh-server] ...` life-cycle lines stay plain text on stdout (runner.announce):
`aimesh up` and the tests read them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .accounting import CallAccount

LEVEL_ENV = "AIMESH_LOG_LEVEL"
# Libraries whose INFO lines are noise in a server's log.
QUIET_LOGGERS = ("httpx", "alembic", "urllib3", "filelock")
call_log = logging.getLogger("aimesh.calls")


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(default_level: str = "INFO", stream: IO[str] | None = None) -> None:
    """JSON lines at `AIMESH_LOG_LEVEL` (else `default_level`) for the whole process."""
    level = os.environ.get(LEVEL_ENV, "").upper() or default_level
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


def trace_id_of(traceparent: str) -> str:
    """The trace id of a W3C `traceparent` (version-traceid-spanid-flags); "" if malformed."""
    parts = traceparent.strip().split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
        return ""
    try:
        int(parts[1], 16)
    except ValueError:
        return ""
    return parts[1].lower()


class CallLog:
    """An accounting sink: the per-call DEBUG line. Costs one level check at INFO."""

    def submit(self, account: CallAccount) -> None:
        if not call_log.isEnabledFor(logging.DEBUG):
            return
        fields = {
            "method": account.method.lstrip("/"),
            "model": account.served_model or account.requested_model,
            "version": account.served_version,
            "pool": account.pool,
            "status": account.status,
            "reason": account.reason,
            "duration_ms": round(account.duration_s * 1000, 3),
            "first_output_ms": (None if account.first_output_s is None
                                else round(account.first_output_s * 1000, 3)),
            "unit": account.unit,
            "input_units": account.input_units,
            "output_units": account.output_units,
            "tenant": account.tenant,
            "request_id": account.request_id,
            "trace_id": account.trace_id,
        }
        call_log.debug("call", extra={"fields": fields})
