"""Bulk jobs on the API side: take the input, cut it into pieces, queue them; report and stream.

Invalid input is rejected up front: every line (or item, or row) is validated while the input is
written to storage, and if any is invalid the whole job is refused with the line numbers and
nothing is queued. A job either runs in full or not at all, so its results never have holes.

Intake is a stream from end to end: the body (or the input URL) is read in 1 MiB blocks, each
line validated by the same pydantic `JobItem` model and written into the current piece, so memory
stays flat whatever the input's size. Stored pieces are always JSON Lines of normalised items
(`{"index", "id", "query", "documents": [text, ...], "top_n"}`), whatever format came in: the
workers read one format.
"""

from __future__ import annotations

import bisect
import errno
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pydantic_core
import redis
from celery import Celery

from api import job_results
from api.admission import chars_per_token, estimate_cost, served_length, workers_layout
from api.dispatch import check_instruction
from api.errors import ApiError
from api.job_inputs import Entry, Truncated
from shared import names, redis_client, tracing
from shared.feed import Feeder
from shared.jobs import Job, JobStore, Refusal, new_job_id, owner_of
from shared.schemas import JobItem, ScoreOptions
from shared.settings import ModelSpec, Settings
from shared.storage import JobStorage
from shared.workers import WorkerRegistry, per_engine

log = logging.getLogger(__name__)

#: Pieces hold about this much model time, so a realtime call never waits long behind one.
PIECE_SECONDS = 1.0
PIECE_PAIRS_DEFAULT, PIECE_PAIRS_MIN, PIECE_PAIRS_MAX = 256, 16, 4096
MAX_REPORTED_ERRORS = 20
SWEEP_EVERY_SECONDS = 600
#: Stored folders without job state are deleted once their marker is this old (crash leftovers).
SWEEP_MIN_AGE_SECONDS = 3600
#: The API tops up the fair turns this often per model (any API process; in case a feed was missed).
FEED_EVERY_SECONDS = 5

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat() if ts else None


@dataclass
class PieceSize:
    """How much a piece holds: at most `pairs` pairs and, when `cost` is set, about that much
    model work (batcher cost units, engine/cost.py), each item priced by `item_cost`."""

    pairs: int
    cost: float | None = None
    item_cost: Callable[[JobItem, list[str]], int] | None = None


@dataclass
class _Cutter:
    """Writes validated items into pieces of at most `size` (pairs, and model work), in input order."""

    storage: JobStorage
    job_id: str
    size: PieceSize
    max_documents: int
    on_piece: Callable[[int], None]  # called with the bytes stored so far after each piece
    pieces: int = 0
    items: int = 0
    pairs: int = 0
    bytes_stored: int = 0
    piece_starts: list[int] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    error_count: int = 0
    _buffer: list[bytes] = field(default_factory=list)
    _buffer_pairs: int = 0
    _buffer_cost: float = 0.0
    _buffer_start: int = 0

    def error(self, where: str, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"field": where, "message": message})

    def add(self, where: str, item: JobItem) -> None:
        texts = item.texts()
        if len(texts) > self.max_documents:
            self.error(where, f"{len(texts)} documents; at most {self.max_documents} (MAX_DOCUMENTS)")
            return
        if self.error_count:
            return  # the job will be refused: stop writing, keep validating
        cost = self.size.item_cost(item, texts) if self.size.cost is not None else 0
        if self._buffer and (self._buffer_pairs + len(texts) > self.size.pairs
                             or (self.size.cost is not None and self._buffer_cost + cost > self.size.cost)):
            self.flush()
        if not self._buffer:
            self._buffer_start = self.items
        self._buffer.append(pydantic_core.to_json({"index": self.items, "id": item.id, "query": item.query,
                                                   "documents": texts, "top_n": item.top_n}))
        self._buffer_pairs += len(texts)
        self._buffer_cost += cost
        self.items += 1
        self.pairs += len(texts)

    def flush(self) -> None:
        if self._buffer:
            data = b"\n".join(self._buffer) + b"\n"
            self.storage.write_bytes(self.storage.input_path(self.job_id, self.pieces), data)
            self.piece_starts.append(self._buffer_start)
            self.pieces += 1
            self.bytes_stored += len(data)
            self._buffer, self._buffer_pairs, self._buffer_cost = [], 0, 0.0
            self.on_piece(self.bytes_stored)


class JobService:
    def __init__(self, settings: Settings, client: redis.Redis, celery: Celery, workers: WorkerRegistry) -> None:
        self.settings = settings
        self.redis = client
        self.celery = celery
        self.workers = workers
        self.storage = JobStorage(settings.job_storage_url)
        self.store = JobStore(client, settings.job_ttl)
        self.feeder = Feeder(client, celery, settings.visibility_timeout)
        self._feed_loop: threading.Thread | None = None
        self._feed_loop_lock = threading.Lock()

    # --- creating ---------------------------------------------------------------------------------
    def piece_size(self, model: ModelSpec, options: ScoreOptions) -> PieceSize:
        """About a second of model time for one engine, within sane bounds (JOB_PIECE_PAIRS: a
        fixed number of pairs instead).

        Priced as admission prices a call (each item's cost from its text, at the workers'
        characters per token) against the capacity an engine measured while it warmed up, so a
        job's pieces are right from its first one. Sized from the pace of scored traffic, which
        a fresh engine does not know yet, the first job after a start was cut into the default
        256 pairs, and 4 pieces in flight per worker held 0.2 s of model work: a 40 000-pair job
        was 167 pieces instead of 10, and the simulated engine idled between them (3 163 against
        3 448 pairs/s side by side, docs/performance.md). The pace stays the measure for workers
        that announce no capacity."""
        if self.settings.job_piece_pairs:
            return PieceSize(self.settings.job_piece_pairs)
        workers = self.workers.alive(model.name)
        engines = per_engine(workers)
        capacity = max((e.get("capacity") or 0.0 for e in engines), default=0.0)
        if capacity > 0:
            max_length = served_length(workers, model.max_length)
            ratio, layout = chars_per_token(workers), workers_layout(workers)

            def item_cost(item: JobItem, texts: list[str]) -> int:
                return estimate_cost(item.query, texts, options, max_length=max_length, chars_per_token=ratio,
                                     max_chunks=self.settings.max_chunks, pair_layout=layout)

            return PieceSize(PIECE_PAIRS_MAX, cost=capacity * PIECE_SECONDS, item_cost=item_cost)
        paces = [e.get("pairs_per_second") or 0 for e in engines]
        if not any(paces):
            return PieceSize(PIECE_PAIRS_DEFAULT)
        return PieceSize(int(min(max(max(paces) * PIECE_SECONDS, PIECE_PAIRS_MIN), PIECE_PAIRS_MAX)))

    def create_from_items(self, model: ModelSpec, items: Iterable[tuple[str, JobItem]], *, owner: str,
                          options: ScoreOptions) -> Job:
        return self.create(model, lambda: ((w, i, None) for w, i in items), owner=owner, options=options)

    def create(self, model: ModelSpec, entries: Callable[[], Iterable[Entry]], *, owner: str,
               options: ScoreOptions, expected_bytes: int | None = None) -> Job:
        """Store and queue a job. `entries` is called once the job is admitted (a body is not
        read for a job refused by a limit); `expected_bytes` is the upload's announced size."""
        check_instruction(model, options, self.workers.alive(model.name))
        self._maybe_sweep()
        self.keep_feeding()
        job_id = new_job_id()
        max_bytes = self.settings.max_stored_bytes_per_token
        refusal = self.store.reserve(job_id, owner=owner, model=model.name,
                                     max_jobs=self.settings.max_jobs_per_token, max_bytes=max_bytes)
        if refusal is not None:
            raise self._refused(refusal)
        try:
            return self._store_and_queue(job_id, model, entries, owner, options, expected_bytes)
        except BaseException as exc:
            self.store.forget(job_id, owner)
            try:
                self.storage.delete_job(job_id)
            except OSError as cleanup:
                log.warning("job %s: could not remove its stored input: %s", job_id, cleanup)
            if isinstance(exc, OSError) and exc.errno in NO_SPACE:
                raise ApiError(507, f"job storage is full ({exc.strerror}); nothing was stored or queued",
                               error_type="insufficient_storage") from None
            if isinstance(exc, Truncated):
                raise ApiError(408 if exc.stalled else 400, f"{exc.message()}; nothing was stored or queued",
                               error_type="timeout" if exc.stalled else "truncated_body") from None
            raise

    def _store_and_queue(self, job_id: str, model: ModelSpec, entries: Callable[[], Iterable[Entry]],
                         owner: str, options: ScoreOptions, expected_bytes: int | None) -> Job:
        created = time.time()
        self.storage.write_bytes(self.storage.marker_path(job_id), json.dumps({"created_at": created}).encode())
        before = self._stored_before(job_id, owner)
        limit = self.settings.max_stored_bytes_per_token
        if limit and expected_bytes is not None and before + expected_bytes > limit:
            raise self._over_bytes(before + expected_bytes, limit)

        def on_piece(stored: int) -> None:
            if limit and before + stored > limit:
                raise self._over_bytes(before + stored, limit)
            if not self.store.receiving(job_id, owner, stored):
                raise ApiError(503, "the job's upload state was lost (Redis restarted, or the upload "
                               "stalled too long); send it again", error_type="unavailable")

        cutter = _Cutter(self.storage, job_id, self.piece_size(model, options), self.settings.max_documents, on_piece)
        for where, item, problem in entries():
            if item is None:
                cutter.error(where, problem or "invalid")
            else:
                cutter.add(where, item)
        if cutter.error_count:
            raise ApiError(
                422,
                f"{cutter.error_count} invalid item(s); nothing was queued. First: "
                f"{cutter.errors[0]['field']}: {cutter.errors[0]['message']}",
                fields=cutter.errors,
            )
        cutter.flush()
        if not cutter.items:
            raise ApiError(422, "the job has no items", error_type="validation")
        self.storage.write_bytes(self.storage.index_path(job_id), json.dumps(cutter.piece_starts).encode())
        job = Job(id=job_id, model=model.name, status="queued", owner=owner, items_total=cutter.items,
                  pairs_total=cutter.pairs, pieces_total=cutter.pieces, created_at=created,
                  input_bytes=cutter.bytes_stored, options=options.model_dump_json(),
                  traceparent=tracing.traceparent())
        replicas = redis_client.replicas_to_wait_for(self.settings)
        accepted, held_by = self.store.accept(job, replicas, self.settings.redis_wait_timeout)
        if not accepted:
            raise ApiError(503, "the job's upload state was lost (Redis restarted, or the upload stalled "
                           "too long); send it again", error_type="unavailable")
        if held_by < replicas:  # a failover now could lose it: refuse it rather than send a 202
            raise ApiError(503, f"the job reached {held_by} of the {replicas} Redis replica(s) it must be on "
                           f"within {self.settings.redis_wait_timeout:g}s (REDIS_MIN_REPLICAS); nothing was "
                           "queued, send it again", error_type="unavailable")
        try:
            self.feeder.feed(model.name)
        except (redis.RedisError, OSError) as exc:  # accepted already: the next feed catches up
            log.warning("job %s: first pieces not handed out yet: %s", job_id, exc)
        log.info("job %s: %d items, %d pairs in %d pieces (%d bytes) for %s", job_id, job.items_total,
                 job.pairs_total, job.pieces_total, job.input_bytes, model.name)
        return job

    def _stored_before(self, job_id: str, owner: str) -> int:
        scores = self.redis.zrange(names.owner_jobs_key(owner), 0, -1, withscores=True)
        return int(sum(score for member, score in scores if member.decode() != job_id))

    def _refused(self, refusal: Refusal) -> ApiError:
        if refusal.limit == "jobs":
            return ApiError(429, f"this token has {refusal.jobs_in_flight} jobs in flight (being uploaded, "
                            f"queued or running); at most {self.settings.max_jobs_per_token} "
                            "(MAX_JOBS_PER_TOKEN). Send more when one has ended",
                            error_type="quota_exceeded", headers={"Retry-After": "30"})
        return self._over_bytes(refusal.bytes_stored, self.settings.max_stored_bytes_per_token)

    @staticmethod
    def _over_bytes(stored: int, limit: int) -> ApiError:
        return ApiError(429, f"this token's jobs would hold {stored} bytes of input; at most {limit} "
                        "(MAX_STORED_BYTES_PER_TOKEN). Delete ended jobs (DELETE /v1/rerank/jobs/<id>) "
                        "or wait for them to expire (JOB_TTL)", error_type="quota_exceeded")

    # --- reading ----------------------------------------------------------------------------------
    def get(self, job_id: str, token: str | None) -> Job:
        """The job, if it exists and was created with this token (else 404: no hint it exists)."""
        job = self.store.get(job_id) if job_id.startswith("job_") else None
        if job is None or not hmac.compare_digest(job.owner, owner_of(token)):
            raise ApiError(404, f"no job {job_id!r} (unknown, expired, or created with another token)")
        return job

    def status(self, job: Job) -> dict:
        if not job.finished:
            self.keep_feeding()
        total = job.items_total or 1
        return {
            "id": job.id,
            "model": job.model,
            "status": job.status,
            "progress": {
                "items_done": job.items_done, "items_total": job.items_total,
                "pairs_done": job.pairs_done, "pairs_total": job.pairs_total,
                "percent": round(100.0 * job.items_done / total, 2),
            },
            "created_at": iso(job.created_at),
            "started_at": iso(job.started_at),
            "finished_at": iso(job.finished_at),
            "pairs_per_second": job.pairs_per_second(),
            "errors": {"count": job.errors, "pieces_failed": job.pieces_failed, "last": job.last_error or None},
            "results_url": f"/v1/rerank/jobs/{job.id}/results",
        }

    def _feed_now_and_then(self, model: str) -> None:
        """Top up the fair turns, at most every few seconds per model across API processes: a piece
        whose sender died before it reached the broker is handed out again even when no worker is
        ending pieces (shared/feed.py)."""
        try:
            if self.redis.set(names.feed_topup_key(model), "1", nx=True, ex=FEED_EVERY_SECONDS):
                self.feeder.feed(model)
        except (redis.RedisError, OSError) as exc:
            log.warning("could not top up the bulk pieces of %s: %s", model, exc)

    def keep_feeding(self) -> None:
        """Start (once per process) the background top-up of every served model's fair turns."""
        with self._feed_loop_lock:
            if self._feed_loop is not None:
                return

            def loop() -> None:
                while True:
                    time.sleep(FEED_EVERY_SECONDS)
                    for spec in self.settings.served_models:
                        self._feed_now_and_then(spec.name)

            self._feed_loop = threading.Thread(target=loop, name="job-feed", daemon=True)
            self._feed_loop.start()

    def finished_pieces(self, job: Job, start: int = 0) -> tuple[list[int], int]:
        """The pieces whose results are written, in order, from the one holding item `start` on;
        and that first piece's first item index (lines before `start` are to be skipped)."""
        done = sorted(self.store.done_pieces(job.id))
        if start <= 0 or not done:
            return done, 0
        starts = json.loads(self.storage.read_bytes(self.storage.index_path(job.id)))
        first = max(bisect.bisect_right(starts, start) - 1, 0)
        return [p for p in done if p >= first], starts[first]

    def result_chunks(self, job: Job, start: int = 0) -> Iterator[bytes]:
        """JSON Lines of every finished piece, in input order (with holes while the job runs)."""
        pieces, first_index = self.finished_pieces(job, start)
        return job_results.jsonl(self.storage, job.id, pieces, start if start > first_index else 0)

    def complete(self, job: Job) -> bool:
        """Whether the results hold a line for every item (no piece missing, none failed for good)."""
        return job.finished and not job.pieces_failed and self.store.done_pieces(job.id) >= set(range(job.pieces_total))

    # --- cancelling and deleting -------------------------------------------------------------------
    def cancel_or_delete(self, job: Job) -> dict:
        """Cancel a job in flight; delete an ended one (its results and state)."""
        if job.finished:
            self.store.forget(job.id, job.owner)
            self.storage.delete_job(job.id)
            return {**self.status(job), "deleted": True}
        self.store.cancel(job.id)
        fresh = self.store.get(job.id) or job
        return {**self.status(fresh), "deleted": False}

    # --- housekeeping -----------------------------------------------------------------------------
    def _maybe_sweep(self) -> None:
        """Delete stored files of jobs whose state expired (at most every 10 minutes, any API).

        A job has state in Redis from before its first byte is stored until it expires, so a
        folder without state is a leftover (an API killed mid-upload, an expired job); it must
        also be an hour old, a second guard for uploads in progress."""
        try:
            if not self.redis.set(names.sweep_lock_key(), "1", nx=True, ex=SWEEP_EVERY_SECONDS):
                return
            self.sweep(SWEEP_MIN_AGE_SECONDS)
        except (OSError, ValueError, KeyError, redis.RedisError) as exc:
            log.warning("job storage sweep failed: %s", exc)

    def sweep(self, min_age: float) -> list[str]:
        cutoff = time.time() - min_age
        deleted = []
        for job_id in self.storage.job_ids():
            if self.redis.exists(names.job_key(job_id)):
                continue
            marker = self.storage.marker_path(job_id)
            if self.storage.exists(marker):
                created = json.loads(self.storage.read_bytes(marker))["created_at"]
            else:
                created = self.storage.modified(self.storage.job_dir(job_id)) or 0
            if created < cutoff:
                self.storage.delete_job(job_id)
                deleted.append(job_id)
        if deleted:
            log.info("job storage sweep: removed %d leftover job folder(s)", len(deleted))
        return deleted
