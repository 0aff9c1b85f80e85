"""Scale check of bulk jobs: one job of 1 000 000 pairs on the tiny model through the real stack.

    .venv/bin/python -m bench.jobs_scale                 # 1 000 000 pairs (minutes on 2 CPU cores)
    .venv/bin/python -m bench.jobs_scale --pairs 20000   # a quick pass

Starts its own Redis, one worker and one gunicorn API with job storage in a temporary folder, and
reports: intake time (upload to 202), scoring throughput, Redis memory before, at its highest
during and after the job (what Redis holds grows per piece, never per item), the storage the job
used, and the time to download its results (JSON Lines, and Parquet where pyarrow is installed).
Figures go to stdout and to bench/results/jobs-scale-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import redis
import requests

from bench.report import RESULTS
from rerank.procs import ROOT, base_env, start_api, start_redis, start_worker, wait_for
from rerank.random_model import build_model, sentence

DOCS_PER_ITEM = 10


def make_input(path: Path, pairs: int, seed: int = 0) -> tuple[int, int]:
    rng = random.Random(seed)
    items = pairs // DOCS_PER_ITEM
    with open(path, "w", encoding="utf-8") as f:
        for i in range(items):
            f.write(json.dumps({"id": f"q{i}", "query": sentence(rng, rng.randint(2, 6)),
                                "documents": [sentence(rng, rng.randint(3, 12)) for _ in range(DOCS_PER_ITEM)],
                                "top_n": 3}, ensure_ascii=False) + "\n")
    return path.stat().st_size, items


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    report: dict[str, object] = {"pairs": args.pairs, "cpus": os.cpu_count(),
                                 "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory(prefix="bench-jobs-scale-") as tmp:
        work = Path(tmp)
        model = build_model(work / "tiny", "tiny")
        source = work / "items.jsonl"
        size, items = make_input(source, args.pairs)
        report.update(input_bytes=size, items=items)
        print(f"input: {items} items, {args.pairs} pairs, {size / 1e6:.1f} MB", flush=True)
        redis_proc, redis_url = start_redis(work)
        client = redis.Redis.from_url(redis_url)
        env = base_env(REDIS_URL=redis_url, MODELS=f"tiny={model}", DATA_DIR=str(work / "data"), LOG_LEVEL="WARNING",
                       TORCH_THREADS="1")
        worker = start_worker("worker", env, work, "tiny")
        api, url = start_api("api", env, work)
        try:
            used = lambda: client.info("memory")["used_memory"]  # noqa: E731
            report["redis_before_bytes"] = before = used()
            started = time.perf_counter()
            with open(source, "rb") as body:
                r = requests.post(f"{url}/v1/rerank/jobs", data=body, timeout=3600,
                                  headers={"Content-Type": "application/jsonl"})
            report["intake_seconds"] = round(time.perf_counter() - started, 2)
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            print(f"accepted in {report['intake_seconds']} s ({size / 1e6 / report['intake_seconds']:.1f} MB/s)",
                  flush=True)
            peak = [used()]
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(1.0):
                    peak.append(used())

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            scoring_started = time.perf_counter()

            def finished():
                s = requests.get(f"{url}/v1/rerank/jobs/{job_id}", timeout=10).json()
                return s if s["status"] in ("succeeded", "failed", "cancelled") else None

            last_print = [0.0]

            def progress():
                s = finished()
                if s is None and time.monotonic() - last_print[0] > 30:
                    last_print[0] = time.monotonic()
                    p = requests.get(f"{url}/v1/rerank/jobs/{job_id}", timeout=10).json()["progress"]
                    print(f"  {p['percent']}% ({p['pairs_done']} pairs), Redis {used() / 2**20:.1f} MiB", flush=True)
                return s

            final = wait_for(progress, 6 * 3600, "the job")
            wall = time.perf_counter() - scoring_started
            stop.set()
            sampler.join()
            report.update(status=final["status"], scoring_wall_seconds=round(wall, 1),
                          pairs_per_second=final["pairs_per_second"], redis_peak_bytes=max(peak))
            job_keys = [k.decode() for k in client.keys(f"rerank:job:{job_id}*")]
            report["redis_job_keys"] = {k: client.memory_usage(k) for k in job_keys}
            pieces = int(client.hget(f"rerank:job:{job_id}", "pieces_total"))
            report["pieces"] = pieces
            storage = work / "data" / "jobs" / job_id
            report["storage_bytes"] = du(storage)
            report["storage_input_bytes"] = du(storage / "input")
            report["storage_result_bytes"] = du(storage / "results")

            out = work / "results.jsonl"
            started = time.perf_counter()
            with requests.get(f"{url}/v1/rerank/jobs/{job_id}/results", stream=True, timeout=600) as resp, \
                    open(out, "wb") as f:
                for chunk in resp.iter_content(1 << 20):
                    f.write(chunk)
            report["download_jsonl_seconds"] = round(time.perf_counter() - started, 2)
            report["download_jsonl_bytes"] = out.stat().st_size
            with open(out, "rb") as f:
                report["download_jsonl_lines"] = sum(1 for _ in f)
            try:
                import pyarrow  # noqa: F401

                started = time.perf_counter()
                with requests.get(f"{url}/v1/rerank/jobs/{job_id}/results?format=parquet", stream=True,
                                  timeout=600) as resp, open(work / "results.parquet", "wb") as f:
                    for chunk in resp.iter_content(1 << 20):
                        f.write(chunk)
                report["download_parquet_seconds"] = round(time.perf_counter() - started, 2)
                report["download_parquet_bytes"] = (work / "results.parquet").stat().st_size
            except ImportError:
                pass
            report["redis_after_bytes"] = used()
        finally:
            api.stop()
            worker.stop()
            redis_proc.stop()
    report["load_average_end"] = [round(x, 1) for x in os.getloadavg()]
    mib = 2**20
    print(json.dumps(report, indent=2))
    print(f"\n{args.pairs} pairs ({items} items, {size / 1e6:.0f} MB JSON Lines) in {report['pieces']} pieces")
    print(f"intake: {report['intake_seconds']} s to the 202 ({size / 1e6 / report['intake_seconds']:.1f} MB/s)")
    print(f"scoring: {report['scoring_wall_seconds']} s wall, {report['pairs_per_second']} pairs/s (one worker)")
    print(f"Redis used_memory: before {before / mib:.2f} MiB, highest during {report['redis_peak_bytes'] / mib:.2f} MiB, "
          f"after {report['redis_after_bytes'] / mib:.2f} MiB; the job's own keys "
          f"{sum(v or 0 for v in report['redis_job_keys'].values()) / 1024:.0f} KiB")
    print(f"storage: {report['storage_bytes'] / 1e6:.0f} MB (input {report['storage_input_bytes'] / 1e6:.0f}, "
          f"results {report['storage_result_bytes'] / 1e6:.0f})")
    print(f"download: JSON Lines {report['download_jsonl_bytes'] / 1e6:.0f} MB in {report['download_jsonl_seconds']} s"
          + (f", Parquet {report['download_parquet_bytes'] / 1e6:.0f} MB in {report['download_parquet_seconds']} s"
             if "download_parquet_seconds" in report else ""))
    out = RESULTS / f"jobs-scale-{report['date'][:10]}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}")
    return 0 if report["status"] == "succeeded" and report["download_jsonl_lines"] == items else 1


if __name__ == "__main__":
    sys.exit(main())
