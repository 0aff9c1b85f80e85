"""`python -m worker [--model NAME]`: join (or start) one model's engine, then serve its queues.

A worker is a feeder: Celery's threads, tokenizing, results, heartbeat; the model is in an engine
process. With ENGINE_SOCKET (set by the launcher) it feeds the device's shared engine, which
several workers feed at once; it waits for that engine to be ready before Celery takes a task,
and rejoins it whenever it restarts. Without it, the worker starts an engine process of its own
(`ENGINE_PROCESS`, on by default; off: the model in this process, for comparisons) and exits
with EXIT_ENGINE_DIED if that engine dies. Either way the model is loaded, warm and its capacity
measured before the first task. Tasks find the engine on the Celery app.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from celery import signals

from engine import Engine, EngineConfig
from engine.runtime import limit_openmp_spinning
from shared import names, redis_client, tracing
from shared.celery_config import make_celery
from shared.feed import Feeder
from shared.jobs import JobStore
from shared.logs import configure_logging
from shared.pending import PendingWork
from shared.lifecycle import EXIT_ENGINE_DIED, EXIT_MODEL_FAILED
from shared.settings import ModelSpec, Settings, choose_model, get_settings
from shared.storage import JobStorage
from worker.celery_workarounds import BulkGate, apply_kombu_fixes
from worker.context import WorkerContext
from worker.heartbeat import Heartbeat
from worker.metrics import CharsPerToken, Pace, WorkerMetrics
from worker.reaper import Reaper
from worker.realtime_consumer import RealtimeConsumer

log = logging.getLogger("worker")

def build_context(settings: Settings, spec: ModelSpec) -> WorkerContext:
    """Start or join the engine, and everything the tasks share; exits with EXIT_MODEL_FAILED if
    the model cannot load."""
    metrics, pace = WorkerMetrics(spec.name), Pace()
    worker_id = WorkerContext.new_id()
    built: list[WorkerContext] = []

    def on_batch(stats) -> None:
        pace.record(stats.pairs, stats.cost, stats.seconds)
        metrics.on_batch(stats)

    def on_exit(reason: str) -> None:
        # Nothing can be scored any more: leave now. Messages held unacknowledged go back to the
        # queue for another worker; the launcher (or the orchestrator) starts a new one.
        log.critical("%s: this worker stops", reason)
        os._exit(EXIT_ENGINE_DIED)

    def on_state(up: bool) -> None:
        # A shared engine went away or came back: say so in the heartbeat at once, so the API
        # answers 503 meanwhile instead of queueing calls nobody can score.
        if built and built[0].heartbeat is not None:
            built[0].heartbeat.wake()

    if settings.engine_process or settings.engine_socket:
        limit_openmp_spinning()
    try:
        engine = Engine.start(EngineConfig.from_settings(settings, spec), process=settings.engine_process,
                              socket=settings.engine_socket, on_batch=on_batch, on_exit=on_exit, on_state=on_state,
                              hello={"id": worker_id, "pid": os.getpid()}, wait=settings.engine_wait)
    except Exception:
        log.exception("could not load model %s from %s; this worker takes no work", spec.name, spec.source)
        sys.exit(EXIT_MODEL_FAILED)
    client = redis_client.connect(settings, socket_connect_timeout=2, socket_timeout=10, health_check_interval=30)
    ctx = WorkerContext(spec=spec, settings=settings, engine=engine, redis=client, worker_id=worker_id,
                        job_store=JobStore(client, settings.job_ttl), job_storage=JobStorage(settings.job_storage_url),
                        metrics=metrics, pace=pace, chars_per_token=CharsPerToken(), pending=PendingWork(client))
    built.append(ctx)
    info = engine.info
    log.info("model %s from %s on %s (%s: %s; %s, max_length %d, %d tokens per batch, capacity %.0f tokens/s) "
             "ready in %.1fs%s", spec.name, spec.source, info["device"], info["dtype"],
             info.get("dtype_reason") or "as configured", info.get("backend"),
             info["max_length"], info["max_batch_tokens"], info["capacity"], info["start_seconds"],
             "; SIMULATED device: scores are placeholders" if info.get("simulated") else "")
    return ctx


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--model", help="served model name (needed when MODELS lists several)")
    parser.add_argument("--concurrency", type=int, help="Celery threads (default WORKER_CONCURRENCY)")
    args = parser.parse_args(argv)

    settings = get_settings()
    configure_logging(settings)
    tracing.setup("rerank-worker", celery=True)  # off unless OTEL_EXPORTER_OTLP_ENDPOINT is set
    spec = choose_model(settings, args.model)
    ctx = build_context(settings, spec)

    app = make_celery(settings, "rerank-worker")
    app.worker_context = ctx  # where worker.tasks.WorkerTask finds it
    ctx.feeder = Feeder(ctx.redis, app, settings.visibility_timeout, worker=True)
    import worker.tasks  # noqa: F401  (registers the tasks with the app)

    gate = BulkGate(names.bulk_queue(spec.name))
    gate.connect()
    reaper = Reaper(app, ctx.redis, ctx.worker_id, settings.redeliver_after)  # dead workers' messages
    reaper.connect()
    heartbeat = ctx.heartbeat = Heartbeat(ctx, on_beat=lambda: (gate.sync(), reaper.beat()))
    # Synchronous calls on the direct path (worker/realtime_consumer.py), beside Celery's threads.
    direct = RealtimeConsumer(ctx, args.concurrency or settings.worker_concurrency)

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        reaper.takes_realtime(direct.list)
        direct.start()
        ctx.realtime_direct = True  # the heartbeat tells the API, which then sends calls that way
        heartbeat.start()
        log.info("worker %s ready for %s", ctx.worker_id, spec.name)

    @signals.worker_shutdown.connect(weak=False)
    def _shutdown(**_: object) -> None:
        heartbeat.stop()
        direct.stop(settings.sync_timeout)
        ctx.engine.stop()

    apply_kombu_fixes()
    # Realtime first: the broker is read in this order (queue_order_strategy=priority).
    queues = [names.realtime_queue(spec.name), names.bulk_queue(spec.name)]
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={args.concurrency or settings.worker_concurrency}",
            f"--queues={','.join(queues)}",
            f"--hostname={spec.name}-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
            # Celery's worker-heartbeat events go to monitors we do not run (worker/heartbeat.py
            # is ours): 3 % of a feeder's CPU, sampled while it answered 1-document calls.
            "--without-heartbeat",
            f"--loglevel={settings.log_level.upper()}",
        ]
    )


if __name__ == "__main__":
    main()
