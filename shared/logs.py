"""Log set-up shared by the API, the workers and the launcher: plain lines or JSON lines."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from shared.settings import Settings

PLAIN = "%(asctime)s %(levelname)s [%(process)d %(name)s] %(message)s"


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(
            JsonFormatter("%(asctime)s %(levelname)s %(process)d %(name)s %(message)s")
        )
    else:
        handler.setFormatter(logging.Formatter(PLAIN))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
