"""`python -m rerank jobs …`: submit bulk jobs to a (remote) server, follow them, fetch results.

    python -m rerank jobs submit input.jsonl --wait -o results.jsonl
    python -m rerank jobs status JOB_ID
    python -m rerank jobs results JOB_ID -o results.jsonl
    python -m rerank jobs cancel JOB_ID

The server is `--url` (or RERANK_URL, default http://127.0.0.1:6006) and the token `--token`
(or RERANK_TOKEN, else ACCESS_TOKEN). Input is JSON Lines, one item per line:
{"id": "q1", "query": "...", "documents": ["...", ...], "top_n": 10}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import IO

# requests and tqdm are imported where they are used: the worker image runs `python -m rerank
# workers` and carries neither.


class Client:
    def __init__(self, url: str, token: str | None, timeout: float = 60) -> None:
        import requests

        self.url = url.rstrip("/")
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def _check(self, response):
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise SystemExit(f"error {response.status_code}: {message}")
        return response

    def submit(self, stream: IO[bytes], *, model: str | None, return_documents: bool, raw_scores: bool) -> dict:
        params = {"return_documents": str(return_documents).lower(), "raw_scores": str(raw_scores).lower()}
        if model:
            params["model"] = model
        response = self.session.post(f"{self.url}/v1/rerank/jobs", params=params, data=stream,
                                     headers={"Content-Type": "application/jsonl"}, timeout=None)
        return self._check(response).json()

    def status(self, job_id: str) -> dict:
        return self._check(self.session.get(f"{self.url}/v1/rerank/jobs/{job_id}", timeout=self.timeout)).json()

    def cancel(self, job_id: str) -> dict:
        return self._check(self.session.delete(f"{self.url}/v1/rerank/jobs/{job_id}", timeout=self.timeout)).json()

    def results(self, job_id: str) -> Iterator[bytes]:
        response = self._check(self.session.get(f"{self.url}/v1/rerank/jobs/{job_id}/results",
                                                stream=True, timeout=self.timeout))
        yield from response.iter_content(chunk_size=1 << 16)

    def wait(self, job_id: str, poll: float = 1.0, quiet: bool = False) -> dict:
        """Poll until the job ends, with a progress bar of scored pairs."""
        from tqdm import tqdm

        status = self.status(job_id)
        with tqdm(total=status["progress"]["pairs_total"], unit="pair", disable=quiet, file=sys.stderr) as bar:
            while True:
                bar.update(status["progress"]["pairs_done"] - bar.n)
                if status["status"] in ("succeeded", "failed", "cancelled"):
                    return status
                time.sleep(poll)
                status = self.status(job_id)


def _write(chunks: Iterator[bytes], out: str | None) -> None:
    target = open(out, "wb") if out and out != "-" else sys.stdout.buffer
    try:
        for chunk in chunks:
            target.write(chunk)
    finally:
        if target is not sys.stdout.buffer:
            target.close()


def add_parser(sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser("jobs", help="bulk rerank jobs against a running server",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    jobs.add_argument("--url", default=os.environ.get("RERANK_URL", "http://127.0.0.1:6006"))
    jobs.add_argument("--token", default=os.environ.get("RERANK_TOKEN") or os.environ.get("ACCESS_TOKEN"))
    jobs.add_argument("--quiet", action="store_true", help="no progress bar")
    verbs = jobs.add_subparsers(dest="verb", required=True)
    submit = verbs.add_parser("submit", help="upload a JSON Lines file (- for stdin) as a job")
    submit.add_argument("input")
    submit.add_argument("--model")
    submit.add_argument("--return-documents", action="store_true")
    submit.add_argument("--raw-scores", action="store_true")
    submit.add_argument("--wait", action="store_true", help="wait for the job and write its results")
    submit.add_argument("-o", "--output", help="results file (default: standard output)")
    for name in ("status", "cancel"):
        verbs.add_parser(name).add_argument("job_id")
    results = verbs.add_parser("results", help="write a job's results (JSON Lines, input order)")
    results.add_argument("job_id")
    results.add_argument("--wait", action="store_true", help="wait until the job has ended")
    results.add_argument("-o", "--output")


def run(args: argparse.Namespace) -> int:
    client = Client(args.url, args.token)
    if args.verb == "submit":
        with (open(args.input, "rb") if args.input != "-" else sys.stdin.buffer) as stream:
            job = client.submit(stream, model=args.model, return_documents=args.return_documents,
                                raw_scores=args.raw_scores)
        print(job["id"], file=sys.stderr if args.wait else sys.stdout)
        if not args.wait:
            return 0
        status = client.wait(job["id"], quiet=args.quiet)
        _write(client.results(job["id"]), args.output)
        return 0 if status["status"] == "succeeded" else 1
    if args.verb == "status":
        print(json.dumps(client.status(args.job_id), indent=2))
    elif args.verb == "cancel":
        print(json.dumps(client.cancel(args.job_id), indent=2))
    elif args.verb == "results":
        if args.wait:
            client.wait(args.job_id, quiet=args.quiet)
        _write(client.results(args.job_id), args.output)
    return 0
