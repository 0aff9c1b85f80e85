"""Job intake speed: MB/s of a JSON Lines upload to its 202 (validation and storage included), how
long after the last byte the 202 comes, and the API's memory before and after, side by side with
an older commit of this code (`--baseline REF`, run from `git archive` of that commit).

    .venv/bin/python -m bench.intake                          # 50 and 200 MB, baseline c123598 at 16 MB
    .venv/bin/python -m bench.intake --mb 20 --baseline ""    # quick, no baseline

Each run starts its own Redis and one gunicorn API (one process, as `API_WORKERS=1`) with local job
storage in a temporary folder; no worker is needed for a job to be accepted. The upload is the
`requests` client streaming a file, on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from rerank.launch import free_port
from rerank.random_model import sentence
from rerank.procs import ROOT, base_env, start_redis, wait_for

PIECE_PAIRS = 2048


def make_input(path: Path, megabytes: float, seed: int = 0) -> tuple[int, int]:
    """JSON Lines of FastGPT-like items (a short query, 4-12 documents of 10-60 words); (bytes, lines)."""
    rng = random.Random(seed)
    target, size, lines = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            item = {"id": f"item-{lines}", "query": sentence(rng, rng.randint(2, 8)),
                    "documents": [sentence(rng, rng.randint(10, 60)) for _ in range(rng.randint(4, 12))]}
            line = json.dumps(item, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode())
            lines += 1
    return size, lines


def prefix_of(source: Path, target: Path, megabytes: float) -> int:
    """The first whole lines of `source` up to `megabytes`."""
    limit, size = int(megabytes * 1e6), 0
    with open(source, "rb") as f, open(target, "wb") as out:
        for line in f:
            if size + len(line) > limit:
                break
            out.write(line)
            size += len(line)
    return size


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def gunicorn_worker(master: int) -> int:
    for _ in range(100):
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise RuntimeError("no gunicorn worker process")


class _Timed:
    """The upload's body: notes when its last byte was handed to the socket."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "rb")
        self.size = path.stat().st_size
        self.last_byte_at = 0.0

    def __len__(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        data = self.file.read(n)
        if data:
            self.last_byte_at = time.perf_counter()
        return data


class Server:
    """gunicorn serving the API of the code in `code` (its own folder is the working directory, so
    that commit's modules are the ones imported)."""

    def __init__(self, code: Path, env: dict[str, str], log: Path) -> None:
        port = free_port()
        env = dict(env, PORT=str(port), HOST="127.0.0.1", API_WORKERS="1", API_THREADS="8")
        self._log = open(log, "ab")
        self.popen = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(code / "api" / "gunicorn.conf.py")],
                                      env=env, cwd=code, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        wait_for(lambda: requests.get(self.url + "/health", timeout=1).ok, 60, f"the API in {code}")

    def stop(self) -> None:
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        self._log.close()


def measure(code: Path, label: str, inputs: list[tuple[Path, int]], redis_url: str, work: Path) -> list[dict]:
    data = work / f"data-{label}"
    env = base_env(REDIS_URL=redis_url, MODELS="intake=/models/none", DATA_DIR=str(data),
                   JOB_PIECE_PAIRS=str(PIECE_PAIRS), LOG_LEVEL="WARNING")
    server = Server(code, env, work / f"api-{label}.log")
    url = server.url
    rows = []
    try:
        pid = gunicorn_worker(server.popen.pid)
        requests.get(url + "/v1/models", timeout=10)  # warm the app's first-request paths
        for path, size in inputs:
            before, _ = rss_mib(pid)
            body = _Timed(path)
            started = time.perf_counter()
            r = requests.post(f"{url}/v1/rerank/jobs", data=body, timeout=3600,
                              headers={"Content-Type": "application/jsonl"})
            answered = time.perf_counter()
            body.file.close()
            assert r.status_code == 202, r.text[:300]
            after, peak = rss_mib(pid)
            seconds = answered - started
            rows.append({"code": label, "mb": round(size / 1e6, 1), "seconds": round(seconds, 2),
                         "mb_per_s": round(size / 1e6 / seconds, 2),
                         "after_last_byte_s": round(answered - body.last_byte_at, 3),
                         "rss_before_mib": round(before), "rss_after_mib": round(after), "rss_peak_mib": round(peak)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.stop()
    return rows


def table(rows: list[dict]) -> str:
    head = "code     | input MB | seconds | MB/s   | 202 after last byte | API RSS before -> after (peak) MiB"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['code']:<8} | {r['mb']:>8} | {r['seconds']:>7} | {r['mb_per_s']:>6} | "
                     f"{r['after_last_byte_s']:>17} s | {r['rss_before_mib']} -> {r['rss_after_mib']} ({r['rss_peak_mib']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", default="50,200", help="input sizes for this code, comma-separated")
    parser.add_argument("--baseline", default="c123598", help="git commit to compare with ('' for none)")
    parser.add_argument("--baseline-mb", type=float, default=16)
    args = parser.parse_args(argv)
    sizes = [float(x) for x in args.mb.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-intake-") as tmp:
        work = Path(tmp)
        source = work / "items.jsonl"
        total, lines = make_input(source, max(sizes + [args.baseline_mb]))
        print(f"input: {lines} lines, {total / 1e6:.1f} MB ({total / lines:.0f} bytes a line)", flush=True)
        inputs = []
        for mb in sizes:
            path = work / f"items-{mb:g}.jsonl"
            inputs.append((path, prefix_of(source, path, mb)))
        redis_proc, redis_url = start_redis(work)
        rows: list[dict] = []
        try:
            if args.baseline:
                old = work / "baseline"
                old.mkdir()
                subprocess.run(f"git archive {args.baseline} | tar -x -C {old}", shell=True, check=True, cwd=ROOT)
                path = work / "items-baseline.jsonl"
                rows += measure(old, args.baseline[:8], [(path, prefix_of(source, path, args.baseline_mb))],
                                redis_url, work)
            rows += measure(ROOT, "this", inputs, redis_url, work)
        finally:
            redis_proc.stop()
    print()
    print(table(rows))
    mine = [r for r in rows if r["code"] == "this"]
    old_rows = [r for r in rows if r["code"] != "this"]
    if old_rows and mine:
        print(f"\nspeed-up: x{max(r['mb_per_s'] for r in mine) / old_rows[0]['mb_per_s']:.0f} "
              f"(this code at {mine[-1]['mb']} MB against {old_rows[0]['code']} at {old_rows[0]['mb']} MB)")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load} at the end (other work on the machine slows "
          f"every figure); pieces of {PIECE_PAIRS} pairs; local storage in a temporary folder")
    return 0


if __name__ == "__main__":
    sys.exit(main())
