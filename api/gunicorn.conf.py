"""gunicorn settings, read from the same environment as everything else.

Threads, not processes, carry the concurrency: a synchronous call mostly waits on Redis, so a
few processes with many threads hold many calls open cheaply.
"""

import logging
import os
import tempfile
from pathlib import Path

# Prometheus multiprocess mode: every gunicorn process writes its metrics under this folder. It
# must be set before prometheus_client is first imported (in the workers, after the fork).
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="rerank-metrics-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
for _stale in Path(_metrics_dir).glob("*.db"):
    _stale.unlink()

from shared.logs import configure_logging  # noqa: E402
from shared.settings import get_settings  # noqa: E402

_settings = get_settings()
configure_logging(_settings)

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.api_workers
worker_class = "gthread"
threads = _settings.api_threads
timeout = int(_settings.sync_timeout) + 30
graceful_timeout = int(_settings.sync_timeout) + 5
keepalive = 5
accesslog = "-"
# The access log line carries no headers, so a bearer token never reaches a log.
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms rid=%({x-request-id}o)s'
wsgi_app = "api.app:create_app()"
# No control socket: it lives at one path per user, and several servers on one host would collide.
control_socket_disable = True


def when_ready(server):
    host = "HOST" if _settings.host in ("0.0.0.0", "::") else _settings.host
    logging.getLogger("api").info("FastGPT rerank URL: http://%s:%d/v1/rerank", host, _settings.port)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
