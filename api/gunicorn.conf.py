"""gunicorn settings, read from the same environment as everything else.

Threads, not processes, carry the concurrency: a synchronous call mostly waits on Redis, so a
few processes with many threads hold many calls open cheaply.
"""

from shared.logs import configure_logging
from shared.settings import get_settings

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
