"""Bulk jobs on the API side: take the input, cut it into pieces, queue them; report and stream.

Invalid input is rejected up front: every line (or item) is validated while the input is written
to storage, and if any is invalid the whole job is refused with the line numbers and nothing is
queued. A job either runs in full or not at all, so its results never have holes.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import redis
from celery import Celery
from pydantic import ValidationError

from api.errors import ApiError
from shared import names
from shared.jobs import Job, JobStore, new_job_id, owner_of
from shared.schemas import JobItem, JobOptions, PieceTask, RerankRequest
from shared.settings import ModelSpec, Settings
from shared.storage import JobStorage
from shared.workers import WorkerRegistry

log = logging.getLogger(__name__)

#: Pieces hold about this much model time, so a realtime call never waits long behind one.
PIECE_SECONDS = 1.0
PIECE_PAIRS_DEFAULT, PIECE_PAIRS_MIN, PIECE_PAIRS_MAX = 256, 16, 4096
MAX_REPORTED_ERRORS = 20
SWEEP_EVERY_SECONDS = 600


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat() if ts else None


def _message(exc: ValidationError) -> str:
    errors = exc.errors(include_input=False, include_url=False)
    if errors[0]["type"] == "json_invalid":
        return f"not valid JSON ({errors[0].get('ctx', {}).get('error', '')})"
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'item'}: {e['msg']}" for e in errors[:3])


@dataclass
class _Cutter:
    """Writes validated items into pieces of at most `piece_pairs` pairs, in input order."""

    storage: JobStorage
    job_id: str
    piece_pairs: int
    max_documents: int
    pieces: int = 0
    items: int = 0
    pairs: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    error_count: int = 0
    _buffer: list[dict] = field(default_factory=list)
    _buffer_pairs: int = 0

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
        if self._buffer and self._buffer_pairs + len(texts) > self.piece_pairs:
            self.flush()
        self._buffer.append({"index": self.items, "id": item.id, "query": item.query,
                             "documents": texts, "top_n": item.top_n})
        self._buffer_pairs += len(texts)
        self.items += 1
        self.pairs += len(texts)

    def flush(self) -> None:
        if self._buffer:
            self.storage.write_lines(self.storage.input_path(self.job_id, self.pieces), self._buffer)
            self.pieces += 1
            self._buffer, self._buffer_pairs = [], 0


class JobService:
    def __init__(self, settings: Settings, client: redis.Redis, celery: Celery, workers: WorkerRegistry) -> None:
        self.settings = settings
        self.redis = client
        self.celery = celery
        self.workers = workers
        self.storage = JobStorage(settings.job_storage_url)
        self.store = JobStore(client, settings.job_ttl)

    # --- creating ---------------------------------------------------------------------------------
    def piece_pairs(self, model: ModelSpec) -> int:
        """About a second of model time at the workers' measured pace, within sane bounds."""
        if self.settings.job_piece_pairs:
            return self.settings.job_piece_pairs
        paces = [w.get("pairs_per_second") or 0 for w in self.workers.alive(model.name)]
        if not any(paces):
            return PIECE_PAIRS_DEFAULT
        return int(min(max(max(paces) * PIECE_SECONDS, PIECE_PAIRS_MIN), PIECE_PAIRS_MAX))

    def create_from_items(self, model: ModelSpec, items: Iterable[tuple[str, JobItem]], *, owner: str,
                          options: JobOptions | RerankRequest) -> Job:
        return self._create(model, ((w, i, None) for w, i in items), owner, options)

    def create_from_lines(self, model: ModelSpec, lines: Iterable[bytes], *, owner: str,
                          options: JobOptions) -> Job:
        def parsed() -> Iterator[tuple[str, JobItem | None, str | None]]:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {number}", JobItem.model_validate_json(line), None
                except ValidationError as exc:
                    yield f"line {number}", None, _message(exc)

        return self._create(model, parsed(), owner, options)

    def _create(self, model: ModelSpec, entries: Iterable[tuple[str, JobItem | None, str | None]],
                owner: str, options: JobOptions | RerankRequest) -> Job:
        self._maybe_sweep()
        job_id = new_job_id()
        cutter = _Cutter(self.storage, job_id, self.piece_pairs(model), self.settings.max_documents)
        try:
            for where, item, problem in entries:
                if item is None:
                    cutter.error(where, problem or "invalid")
                else:
                    cutter.add(where, item)
            if not cutter.error_count:
                cutter.flush()
        except BaseException:
            self.storage.delete_job(job_id)
            raise
        if cutter.error_count or not cutter.items:
            self.storage.delete_job(job_id)
            if not cutter.error_count:
                raise ApiError(422, "the job has no items", error_type="validation")
            raise ApiError(
                422,
                f"{cutter.error_count} invalid item(s); nothing was queued. First: "
                f"{cutter.errors[0]['field']}: {cutter.errors[0]['message']}",
                fields=cutter.errors,
            )
        job = Job(id=job_id, model=model.name, status="queued", owner=owner, items_total=cutter.items,
                  pairs_total=cutter.pairs, pieces_total=cutter.pieces, created_at=time.time(),
                  return_documents=options.return_documents, raw_scores=options.raw_scores,
                  return_chunks=options.return_chunks, options=options.score_options().model_dump_json())
        self.storage.write_lines(f"{self.storage.job_dir(job_id)}/job.json", [{"created_at": job.created_at}])
        try:
            self.store.create(job)
            with self.celery.producer_or_acquire() as producer:
                for piece in range(job.pieces_total):
                    self.celery.send_task(
                        names.BULK_TASK,
                        args=[PieceTask(job_id=job_id, piece=piece).model_dump()],
                        queue=names.bulk_queue(model.name),
                        producer=producer,
                    )
        except BaseException:
            self.redis.delete(names.job_key(job_id))
            self.storage.delete_job(job_id)
            raise
        log.info("job %s: %d items, %d pairs in %d pieces for %s", job_id, job.items_total,
                 job.pairs_total, job.pieces_total, model.name)
        return job

    # --- reading ----------------------------------------------------------------------------------
    def get(self, job_id: str, token: str | None) -> Job:
        """The job, if it exists and was created with this token (else 404: no hint it exists)."""
        job = self.store.get(job_id) if job_id.startswith("job_") else None
        if job is None or not hmac.compare_digest(job.owner, owner_of(token)):
            raise ApiError(404, f"no job {job_id!r} (unknown, expired, or created with another token)")
        return job

    def status(self, job: Job) -> dict:
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
            "errors": {"count": job.errors, "last": job.last_error or None},
            "results_url": f"/v1/rerank/jobs/{job.id}/results",
        }

    def result_chunks(self, job: Job) -> Iterator[bytes]:
        """Result lines in input order: every finished piece up to the first unfinished one."""
        done = self.store.done_pieces(job.id)
        for piece in range(job.pieces_total):
            if piece not in done:
                return
            yield self.storage.read_bytes(self.storage.result_path(job.id, piece))

    def complete_prefix(self, job: Job) -> bool:
        done = self.store.done_pieces(job.id)
        return all(p in done for p in range(job.pieces_total))

    # --- housekeeping -----------------------------------------------------------------------------
    def _maybe_sweep(self) -> None:
        """Delete stored files of jobs whose state expired (at most every 10 minutes, any API)."""
        try:
            if not self.redis.set(names.sweep_lock_key(), "1", nx=True, ex=SWEEP_EVERY_SECONDS):
                return
            cutoff = time.time() - 3600
            for job_id in self.storage.job_ids():
                if self.store.get(job_id) is not None:
                    continue
                marker = f"{self.storage.job_dir(job_id)}/job.json"
                created = json.loads(self.storage.read_bytes(marker))["created_at"] if self.storage.exists(marker) else 0
                if created < cutoff:
                    self.storage.delete_job(job_id)
        except (OSError, ValueError, KeyError, redis.RedisError) as exc:
            log.warning("job storage sweep failed: %s", exc)
