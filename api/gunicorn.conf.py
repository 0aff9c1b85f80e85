"""gunicorn settings, read from the same environment as everything else.

An event loop carries the concurrency (api/http_worker.py: gevent): a synchronous call mostly
waits on Redis, and a connection that waits for a slow or stalled client must not hold a thread.
"""

import logging
import os
import shutil
import tempfile
from pathlib import Path

# Prometheus multiprocess mode: every gunicorn process writes its metrics under this folder. It
# must be set before prometheus_client is first imported (in the workers, after the fork). Unless
# the operator names one, the folder is ours: named after this master's pid, removed when it
# exits (on_exit), and left-overs of masters that died without cleaning up are removed here.
_OWN_PREFIX = f"rerank-metrics-{os.getpid()}-"


def _remove_orphaned_metrics_folders() -> None:
    for folder in Path(tempfile.gettempdir()).glob("rerank-metrics-*-*"):
        pid = folder.name.split("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _remove_orphaned_metrics_folders()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=_OWN_PREFIX)
_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
for _stale in Path(_metrics_dir).glob("*.db"):
    _stale.unlink()

from shared import tracing  # noqa: E402
from shared.logs import configure_logging  # noqa: E402
from shared.settings import get_settings  # noqa: E402

_settings = get_settings()
configure_logging(_settings)

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.api_workers
worker_class = "api.http_worker.ApiWorker"
worker_connections = _settings.api_connections
timeout = int(_settings.sync_timeout) + 30
graceful_timeout = int(_settings.sync_timeout) + 5
# Seconds a kept-alive connection may idle; under gevent also the most a client may take to send
# its request line and headers (then the connection is closed).
keepalive = 5
accesslog = "-"
# The access log line carries no headers, so a bearer token never reaches a log.
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms rid=%({x-request-id}o)s'
if tracing.wanted():  # the call's trace (00-<trace id>-<span id>-<flags>), from the answer's header
    access_log_format += " trace=%({traceresponse}o)s"
wsgi_app = "api.app:create_app()"
# No control socket: it lives at one path per user, and several servers on one host would collide.
control_socket_disable = True


def when_ready(server):
    host = "HOST" if _settings.host in ("0.0.0.0", "::") else _settings.host
    logging.getLogger("api").info("FastGPT rerank URL: http://%s:%d/v1/rerank", host, _settings.port)


def worker_exit(server, worker):
    tracing.shutdown()  # what is still buffered leaves before the process does


def on_exit(server):
    if Path(_metrics_dir).name.startswith(_OWN_PREFIX):
        shutil.rmtree(_metrics_dir, ignore_errors=True)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
