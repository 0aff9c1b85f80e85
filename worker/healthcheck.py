"""`python -m worker.healthcheck`: exit 0 while a worker on this host heartbeats for its model.

For container health checks: it asks Redis, not the worker process, so a worker that is alive but
no longer announcing itself (Redis lost, consumer stuck) is reported unhealthy too.
"""

from __future__ import annotations

import socket
import sys

import redis

from shared.settings import get_settings
from shared.workers import WorkerRegistry


def main() -> int:
    settings = get_settings()
    registry = WorkerRegistry(redis.Redis.from_url(settings.broker_url, socket_connect_timeout=3))
    host = socket.gethostname()
    for spec in settings.served_models:
        if any(w.get("host") == host for w in registry.alive(spec.name, fresh=True)):
            return 0
    print(f"no live worker on {host}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
