"""`python -m rerank jobs …`: submit bulk jobs to a (remote) server, follow them, fetch results.

    python -m rerank jobs submit input.jsonl --wait -o results.jsonl
    python -m rerank jobs submit items.parquet --wait -o results.parquet --format parquet
    python -m rerank jobs submit s3://bucket/items.jsonl      # read by the server (JOB_INPUT_PREFIXES)
    python -m rerank jobs status JOB_ID
    python -m rerank jobs results JOB_ID -o results.jsonl     # again with --resume after a cut
    python -m rerank jobs cancel JOB_ID                       # an ended job: deletes it

The server is `--url` (or RERANK_URL, default http://127.0.0.1:6006) and the token `--token`
(or RERANK_TOKEN, else ACCESS_TOKEN); these and `--quiet` go before or after the verb. Input is
JSON Lines, one item per line ({"id": "q1", "query": "...", "documents": ["...", ...], "top_n": 10}),
or Parquet (.parquet: columns id, query, documents, top_n).

A results download that breaks off is taken up again where it stopped (up to 5 times); `--resume`
does the same for a file a previous run left: lines already in it are not fetched again.
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

PARQUET = "application/vnd.apache.parquet"
FINISHED = ("succeeded", "failed", "cancelled")
DOWNLOAD_TRIES = 5


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

    @staticmethod
    def _options(model: str | None, return_documents: bool, raw_scores: bool) -> dict[str, object]:
        options: dict[str, object] = {"return_documents": return_documents, "raw_scores": raw_scores}
        if model:
            options["model"] = model
        return options

    def submit(self, stream: IO[bytes], *, model: str | None = None, return_documents: bool = False,
               raw_scores: bool = False, parquet: bool = False) -> dict:
        params = {k: str(v).lower() if isinstance(v, bool) else v
                  for k, v in self._options(model, return_documents, raw_scores).items()}
        media = PARQUET if parquet else "application/jsonl"
        response = self.session.post(f"{self.url}/v1/rerank/jobs", params=params, data=stream,
                                     headers={"Content-Type": media}, timeout=None)
        return self._check(response).json()

    def submit_url(self, input_url: str, *, model: str | None = None, return_documents: bool = False,
                   raw_scores: bool = False) -> dict:
        body = {"input_url": input_url, **self._options(model, return_documents, raw_scores)}
        return self._check(self.session.post(f"{self.url}/v1/rerank/jobs", json=body, timeout=None)).json()

    def status(self, job_id: str) -> dict:
        return self._check(self.session.get(f"{self.url}/v1/rerank/jobs/{job_id}", timeout=self.timeout)).json()

    def cancel(self, job_id: str) -> dict:
        return self._check(self.session.delete(f"{self.url}/v1/rerank/jobs/{job_id}", timeout=self.timeout)).json()

    def results(self, job_id: str, *, start: int = 0, fmt: str = "jsonl") -> Iterator[bytes]:
        params = {"start": start, "format": fmt}
        response = self._check(self.session.get(f"{self.url}/v1/rerank/jobs/{job_id}/results",
                                                params=params, stream=True, timeout=self.timeout))
        yield from response.iter_content(chunk_size=1 << 16)

    def download(self, job_id: str, out: str | None, *, fmt: str = "jsonl", resume: bool = False) -> int:
        """Write a job's results; a JSON Lines download that breaks off goes on from the last
        whole line (to a file), a Parquet one starts again. Returns the lines (items) written."""
        import requests

        if fmt == "parquet" or not out or out == "-":
            target = open(out, "wb") if out and out != "-" else sys.stdout.buffer
            try:
                for chunk in self.results(job_id, fmt=fmt):
                    target.write(chunk)
            finally:
                if target is not sys.stdout.buffer:
                    target.close()
            return -1
        seen = _lines_in(out) if resume else set()
        if not resume:
            open(out, "wb").close()
        for attempt in range(DOWNLOAD_TRIES):
            start = _first_missing(seen)
            try:
                with open(out, "ab") as target:
                    _append(self.results(job_id, start=start), target, seen)
                return len(seen)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                if attempt == DOWNLOAD_TRIES - 1:
                    raise SystemExit(f"download of {job_id} failed {DOWNLOAD_TRIES} times: {exc}") from None
                print(f"download cut off ({type(exc).__name__}); going on from item {_first_missing(seen)}",
                      file=sys.stderr)
                time.sleep(1 + attempt)
        return len(seen)

    def wait(self, job_id: str, poll: float = 1.0, quiet: bool = False) -> dict:
        """Poll until the job ends, with a progress bar of scored pairs."""
        from tqdm import tqdm

        status = self.status(job_id)
        with tqdm(total=status["progress"]["pairs_total"], unit="pair", disable=quiet, file=sys.stderr,
                  desc="scoring") as bar:
            while True:
                bar.update(status["progress"]["pairs_done"] - bar.n)
                if status["status"] in FINISHED:
                    return status
                time.sleep(poll)
                status = self.status(job_id)


class _Progress:
    """A file whose reads move a progress bar: requests streams the upload through it."""

    def __init__(self, file: IO[bytes], bar) -> None:
        self._file = file
        self._bar = bar
        self._size = os.fstat(file.fileno()).st_size - file.tell()

    def __len__(self) -> int:  # requests sends a Content-Length, not a chunked body
        return self._size

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._bar.update(len(data))
        return data


def _lines_in(path: str) -> set[int]:
    """Item indexes of the whole lines in a results file; a cut-off last line is removed."""
    seen: set[int] = set()
    if not os.path.exists(path):
        return seen
    with open(path, "rb+") as f:
        data = f.read()
        whole = data.rfind(b"\n") + 1
        if whole < len(data):
            f.truncate(whole)
    for line in data[:whole].splitlines():
        if line.strip():
            seen.add(json.loads(line)["index"])
    return seen


def _first_missing(seen: set[int]) -> int:
    n = 0
    while n in seen:
        n += 1
    return n


def _append(chunks: Iterator[bytes], target: IO[bytes], seen: set[int]) -> None:
    """Write whole lines not seen yet, as they arrive."""
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            if line.strip():
                index = json.loads(line)["index"]
                if index not in seen:
                    target.write(line + b"\n")
                    seen.add(index)
        target.flush()


def _common(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Flags accepted before and after the verb (a value after it wins)."""
    keep = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("--url", **(keep or {"default": os.environ.get("RERANK_URL", "http://127.0.0.1:6006")}),
                        help="server (RERANK_URL)")
    parser.add_argument("--token", **(keep or {"default": os.environ.get("RERANK_TOKEN") or
                                                os.environ.get("ACCESS_TOKEN")}), help="token (RERANK_TOKEN)")
    parser.add_argument("--quiet", action="store_true", **(keep or {"default": False}), help="no progress bars")


def add_parser(sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser("jobs", help="bulk rerank jobs against a running server",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(jobs, defaults=True)
    verbs = jobs.add_subparsers(dest="verb", required=True)
    submit = verbs.add_parser("submit", help="upload a JSON Lines or Parquet file (- for stdin), or name a URL")
    submit.add_argument("input", help="a file, - for standard input, or a URL the server reads (s3://…)")
    submit.add_argument("--model")
    submit.add_argument("--return-documents", action="store_true")
    submit.add_argument("--raw-scores", action="store_true")
    submit.add_argument("--wait", action="store_true", help="wait for the job and write its results")
    submit.add_argument("-o", "--output", help="results file (default: standard output)")
    submit.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl", help="of the results")
    _common(submit, defaults=False)
    for name in ("status", "cancel"):
        verb = verbs.add_parser(name)
        verb.add_argument("job_id")
        _common(verb, defaults=False)
    results = verbs.add_parser("results", help="write a job's results (input order once it has ended)")
    results.add_argument("job_id")
    results.add_argument("--wait", action="store_true", help="wait until the job has ended")
    results.add_argument("-o", "--output")
    results.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    results.add_argument("--resume", action="store_true", help="keep the lines already in the output file")
    _common(results, defaults=False)


def _upload(client: Client, path: str, args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    parquet = path.lower().endswith((".parquet", ".pq"))
    options = {"model": args.model, "return_documents": args.return_documents, "raw_scores": args.raw_scores}
    if path == "-":
        return client.submit(sys.stdin.buffer, parquet=parquet, **options)
    with open(path, "rb") as f, tqdm(total=os.fstat(f.fileno()).st_size, unit="B", unit_scale=True,
                                     disable=args.quiet, file=sys.stderr, desc="upload") as bar:
        return client.submit(_Progress(f, bar), parquet=parquet, **options)


def run(args: argparse.Namespace) -> int:
    client = Client(args.url, args.token)
    if args.verb == "submit":
        if "://" in args.input and not args.input.startswith("file://"):
            job = client.submit_url(args.input, model=args.model, return_documents=args.return_documents,
                                    raw_scores=args.raw_scores)
        else:
            job = _upload(client, args.input, args)
        print(job["id"], file=sys.stderr if args.wait else sys.stdout)
        if not args.wait:
            return 0
        status = client.wait(job["id"], quiet=args.quiet)
        client.download(job["id"], args.output, fmt=args.format)
        return 0 if status["status"] == "succeeded" else 1
    if args.verb == "status":
        print(json.dumps(client.status(args.job_id), indent=2))
    elif args.verb == "cancel":
        print(json.dumps(client.cancel(args.job_id), indent=2))
    elif args.verb == "results":
        if args.wait:
            client.wait(args.job_id, quiet=args.quiet)
        client.download(args.job_id, args.output, fmt=args.format, resume=args.resume)
    return 0
