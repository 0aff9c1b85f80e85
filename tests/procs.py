"""The process helpers the tests use: defined once in rerank/procs.py (the benchmarks use them too)."""

from rerank.procs import (  # noqa: F401
    ROOT,
    Proc,
    base_env,
    free_port,
    redis_for,
    start_api,
    start_redis,
    start_worker,
    wait_for,
)
