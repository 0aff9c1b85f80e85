"""`python -m worker [--model NAME]`: load one model, then serve its queues with Celery.

One process per model and device: the model is loaded before the Celery consumer starts, tasks
run on Celery's thread pool and meet in one batcher whose single thread drives the device.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from celery import signals

from shared import names
from worker import broker_fixes
from worker.bulk_gate import BulkGate
from worker.reaper import Reaper
from shared.celery_config import make_celery
from shared.logs import configure_logging
from shared.settings import ModelSpec, Settings, get_settings

log = logging.getLogger("worker")

#: Exit status of a worker whose model could not be loaded (the launcher reports it).
EXIT_MODEL_FAILED = 3


def choose_model(settings: Settings, name: str | None) -> ModelSpec:
    specs = settings.served_models
    if name is None:
        if len(specs) > 1:
            raise SystemExit(f"several models are served; pick one with --model: {[s.name for s in specs]}")
        return specs[0]
    for spec in specs:
        if name in spec.aliases:
            return spec
    raise SystemExit(f"model {name!r} is not served; MODELS gives {[s.name for s in specs]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--model", help="served model name (needed when MODELS lists several)")
    parser.add_argument("--concurrency", type=int, help="Celery threads (default WORKER_CONCURRENCY)")
    args = parser.parse_args(argv)

    settings = get_settings()
    configure_logging(settings)
    spec = choose_model(settings, args.model)

    # OpenMP threads spin for ~300k iterations after each parallel region by default. In a worker
    # that shares its cores with Celery's threads, Redis and often the API, that spinning steals
    # the CPU the reply path needs: 10k spins cut 3-4 ms off a 1-document call on 2 cores and
    # left model speed unchanged (bench/run.py W3). Must be set before torch loads libgomp.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    import torch  # only now: `--help` stays fast

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)

    from worker import runtime as worker_runtime

    try:
        rt = worker_runtime.Runtime.start(spec, settings)
    except Exception:
        log.exception("could not load model %s from %s; this worker takes no work", spec.name, spec.source)
        sys.exit(EXIT_MODEL_FAILED)
    worker_runtime.install(rt)

    app = make_celery(settings, "rerank-worker")
    import worker.tasks  # noqa: F401  (registers the tasks with the app)

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        rt.start_heartbeat()
        log.info("worker %s ready for %s", rt.worker_id, spec.name)

    @signals.worker_shutdown.connect(weak=False)
    def _shutdown(**_: object) -> None:
        rt.stop()

    broker_fixes.apply()
    # Realtime first: the broker is read in this order (queue_order_strategy=priority).
    queues = [names.realtime_queue(spec.name), names.bulk_queue(spec.name)]
    gate = BulkGate(names.bulk_queue(spec.name))
    gate.connect()
    reaper = Reaper(app, rt.redis, rt.worker_id, settings.redeliver_after)  # dead workers' messages
    reaper.connect()
    rt.on_heartbeat = lambda: (gate.sync(), reaper.beat())
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={args.concurrency or settings.worker_concurrency}",
            f"--queues={','.join(queues)}",
            f"--hostname={spec.name}-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
            f"--loglevel={settings.log_level.upper()}",
        ]
    )


if __name__ == "__main__":
    main()
