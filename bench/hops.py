"""Where a 1-document call's time goes, hop by hop, on the real stack.

    python -m bench.hops --device sim        # the simulated H100 (every figure labelled so)
    python -m bench.hops --device cpu

Starts the service as the launcher lays it out (Redis, one engine process, one feeder, the API
under gunicorn), then times, in turns and in the same run, the whole call and each hop it is made
of, each from the outside with the service's own parts: an HTTP round trip that does nothing
(`/health`), the admission script that also queues the call (the direct path), the feeder's
BLMOVE, tokenizing, the feeder's round trip to the engine (a real connection to the service's
engine socket, the forward pass included), the forward pass alone (the same engine code in this
process), and the answer's pipeline. What is left of the whole call is the wake-ups of the
processes and threads on the way and the handlers' own Python. A Celery publish (how
REALTIME_PATH=celery sends a call) is timed too, for comparison. Prints a table of p50s and
writes it as JSON under bench/results/ (docs/performance.md keeps the current one).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from bench.measure import http_caller
from bench.report import RESULTS, machine
from bench.stack import Service, model_dir


def p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="sim", help="cpu or sim (a simulated H100)")
    parser.add_argument("--calls", type=int, default=200, help="samples per hop and turn")
    parser.add_argument("--turns", type=int, default=3, help="turns over all hops (the best p50 of each counts)")
    parser.add_argument("--out", help="JSON file (default bench/results/hops-<device>-<date>.json)")
    args = parser.parse_args(argv)

    import redis

    from engine import Engine, EngineConfig
    from engine.batcher import REALTIME
    from engine.transport import EngineClient
    from shared import names
    from shared.celery_config import make_celery
    from shared.pending import PendingWork
    from shared.schemas import ScoreTask
    from shared.settings import Settings

    path = model_dir("base", weights=args.device != "sim")
    log_dir = Path(tempfile.mkdtemp(prefix="rerank-hops-"))
    service = Service(path, log_dir, args.device, feeders=1)
    local = Engine.start(EngineConfig(source=str(path), device=args.device))
    try:
        query, document = "what is a reranker", "A reranker scores each document against the query. " * 8
        call = http_caller(service.url)  # the load generator's lean client (bench/measure.py)
        where = urlsplit(service.url)
        health = http.client.HTTPConnection(where.hostname, where.port, timeout=30)

        def get_health() -> None:
            health.request("GET", "/health")
            response = health.getresponse()
            response.read()
            assert response.status == 200, response.status

        client = redis.Redis.from_url(service.env["REDIS_URL"])
        pending = PendingWork(client)
        celery = make_celery(Settings(redis_url=service.env["REDIS_URL"], models=f"bench={path}"), "hops")
        feeder = EngineClient(str(Path(service._sockets) / "e.sock"), hello={"id": "bench.hops"})
        feeder.connect(30)
        encoded = local.encoder.encode(query, [document])
        scratch = f"bench.hops.{uuid.uuid4().hex[:6]}"

        message = ScoreTask(call_id="x", request_id="x", query=query, documents=[document],
                            deadline=time.time() + 30).model_dump_json(exclude_defaults=True)
        calls: list[str] = []

        def admission() -> None:  # the direct path: admitted and on the list in one script
            call = uuid.uuid4().hex
            pending.admit("bench-hops", call, 100, time.time() + 30, time.time(), 1e12, push=(scratch, message, 60))
            calls.append(call)

        def take() -> None:  # what a feeder's realtime thread does: one BLMOVE onto its held list
            client.blmove(scratch, scratch + ".held", 1, "RIGHT", "LEFT")

        def publish() -> None:  # REALTIME_PATH=celery instead
            celery.send_task(names.RERANK_TASK, args=[{"call_id": "x", "query": query, "documents": [document]}],
                             queue=scratch + ".celery", declare=[])

        def reply() -> None:  # the answer, the release and the call off the held list; the API's BLPOP
            pipe = client.pipeline(transaction=False)
            pipe.rpush("bench.hops.reply", '{"logits":[0.5],"input_tokens":80}')
            pipe.expire("bench.hops.reply", 60)
            pending.release("bench-hops", calls.pop() if calls else "none", pipe)
            pipe.lrem(scratch + ".held", 1, message)
            pipe.execute()
            client.blpop(["bench.hops.reply"], timeout=1)

        hops = {
            "call": lambda: call(query, [document]),
            "http": get_health,
            "redis_round_trip": client.ping,
            "admission": admission,
            "take": take,
            "publish": publish,
            "tokenize": lambda: local.encoder.encode(query, [document]),
            "engine_round_trip": lambda: feeder.submit(encoded, priority=REALTIME).wait(30),
            "forward": lambda: local.run(encoded),
            "reply_and_blpop": reply,
        }
        for fn in hops.values():  # warm every path
            timed(fn, 20)
        best: dict[str, float] = {}
        for _ in range(args.turns):
            for name, fn in hops.items():
                best[name] = min(best.get(name, float("inf")), p50(timed(fn, args.calls)))
        client.delete(scratch, scratch + ".held", scratch + ".celery")
        feeder.stop()
    finally:
        local.stop()
        service.close()
        shutil.rmtree(log_dir, ignore_errors=True)

    named = ["http", "admission", "take", "tokenize", "engine_round_trip", "reply_and_blpop"]
    rest = best["call"] - sum(best[k] for k in named)
    rows = [
        ("the whole 1-document call (POST /v1/rerank, the direct path)", best["call"]),
        ("  HTTP round trip and the client (GET /health)", best["http"]),
        ("  admission and queueing (one Lua script: admit, LPUSH)", best["admission"]),
        ("  the feeder takes it (one BLMOVE onto its held list)", best["take"]),
        ("  tokenizing (in the feeder)", best["tokenize"]),
        ("  feeder -> engine -> feeder, forward included", best["engine_round_trip"]),
        ("    of which the forward pass", best["forward"]),
        ("    of which the socket and the batcher", best["engine_round_trip"] - best["forward"]),
        ("  the answer: one pipeline (RPUSH, EXPIRE, release, LREM), BLPOP", best["reply_and_blpop"]),
        ("  the rest: wake-ups, the handlers' Python", rest),
        ("over the forward pass", best["call"] - best["forward"]),
        ("(one Redis round trip, for scale)", best["redis_round_trip"]),
        ("(a Celery publish, as REALTIME_PATH=celery sends a call)", best["publish"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name.ljust(width)}  {value:6.2f} ms" for name, value in rows]
    if args.device == "sim":
        lines.insert(0, "SIMULATED H100 (DEVICE=sim): the forward pass is replayed from measured H100 timings; "
                        "every other cost is real on this machine.")
    text = "\n".join(lines)
    print("\n" + text)
    report = {"machine": machine(), "device": args.device, "simulated": args.device == "sim",
              "p50_ms": best, "rest_ms": rest, "table": text}
    kind = "sim" if args.device == "sim" else args.device
    out = Path(args.out) if args.out else RESULTS / f"hops-{kind}-{datetime.now(timezone.utc):%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
