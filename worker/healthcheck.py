"""`python -m worker.healthcheck [--model NAME ...]`: exit 0 while this host has a live worker for
every model it serves (the models named, else every model of MODELS).

For container health checks. Per model, because a container serving two models whose worker of
one died still looks alive by the other's heartbeat. It asks Redis, not the worker process, so a
worker that is alive but no longer announcing itself (Redis lost, consumer stuck) is reported
unhealthy too.
"""

from __future__ import annotations

import argparse
import socket
import sys

import redis

from shared import redis_client
from shared.settings import get_settings
from shared.workers import WorkerRegistry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.healthcheck", description=__doc__)
    parser.add_argument("--model", action="append", help="a model this container serves (repeatable)")
    args = parser.parse_args(argv)
    settings = get_settings()
    models = args.model or [spec.name for spec in settings.served_models]
    host = socket.gethostname()
    registry = WorkerRegistry(redis_client.connect(settings, socket_connect_timeout=3, socket_timeout=3))
    try:
        missing = [m for m in models if not any(w.get("host") == host for w in registry.alive(m, fresh=True))]
    except redis.RedisError as exc:
        print(f"Redis unreachable: {exc}", file=sys.stderr)
        return 1
    if missing:
        print(f"no live worker on {host} for: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
