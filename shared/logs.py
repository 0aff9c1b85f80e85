"""Log set-up shared by the API, the workers and the launcher: plain lines or JSON lines.

Every line logged while a request is handled carries its request id (the API's `X-Request-Id`,
passed to the worker inside the task), so one call can be followed API -> Redis -> worker; with
tracing on (shared/tracing.py) also its trace id, to find the call's trace from a log line.
Tokens are never logged: the settings object redacts them and no handler logs headers.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

from shared import tracing
from shared.settings import Settings

request_id: ContextVar[str] = ContextVar("request_id", default="")

PLAIN = "%(asctime)s %(levelname)s [%(process)d %(name)s] %(message)s%(rid)s"
JSON = "%(asctime)s %(levelname)s %(process)d %(name)s %(message)s %(request_id)s %(trace_id)s"


class _RequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        trace = tracing.trace_id()
        record.request_id = rid or None
        record.trace_id = trace or None
        record.rid = (f" rid={rid}" if rid else "") + (f" trace={trace}" if trace else "")
        return True


def configure_logging(settings: Settings) -> None:
    setup_logging(settings.log_level, settings.log_json)


def setup_logging(level: str, json_lines: bool) -> None:
    """The same set-up from plain values (the engine process has no settings object)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestId())
    handler.setFormatter(JsonFormatter(JSON) if json_lines else logging.Formatter(PLAIN))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if root.level > logging.DEBUG:
        # One line per task received and per task done is noise at thousands of calls a second.
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
