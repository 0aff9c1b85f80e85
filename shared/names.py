"""Names both sides of Redis must agree on: Celery task names, queues and our own keys.

Kept in one place because a typo on either side would not fail, it would just never meet.
"""

from __future__ import annotations

from typing import NamedTuple

#: Celery task that scores one synchronous request.
RERANK_TASK = "rerank.realtime"

#: Celery task that scores one piece of a bulk job.
BULK_TASK = "rerank.bulk_piece"

#: Every key we write ourselves starts with this, so a shared Redis stays tidy.
PREFIX = "rerank"


def realtime_queue(model: str) -> str:
    return f"{PREFIX}.{model}.realtime"


def bulk_queue(model: str) -> str:
    return f"{PREFIX}.{model}.bulk"


def realtime_list(model: str) -> str:
    """List of a model's synchronous calls on the direct path (api/dispatch.py LPUSHes a ScoreTask
    as JSON, worker/realtime_consumer.py's threads BLMOVE it from the other end): no Celery
    envelope, no kombu delivery record, two Redis round trips a call instead of five."""
    return f"{PREFIX}:realtime:{model}"


def realtime_held_key(worker_id: str) -> str:
    """List of the direct-path calls a worker is scoring (BLMOVE puts each here as it is taken;
    the answer's pipeline removes it): a dead worker's calls go back to `realtime_list`."""
    return f"{PREFIX}:realtime-held:{worker_id}"


def realtime_lists_key() -> str:
    """Hash: worker id -> the realtime list it takes calls from (where its held calls go back)."""
    return f"{PREFIX}:realtime-lists"


def reply_key(call_id: str) -> str:
    """List the worker pushes a synchronous call's answer onto (the API waits with BLPOP)."""
    return f"{PREFIX}:reply:{call_id}"


def workers_key(model: str) -> str:
    """Set of the ids of workers that announced themselves for a model."""
    return f"{PREFIX}:workers:{model}"


def worker_key(worker_id: str) -> str:
    """A worker's heartbeat: its description, expiring unless refreshed."""
    return f"{PREFIX}:worker:{worker_id}"


class PendingKeys(NamedTuple):
    """Realtime calls admitted but not yet answered (backpressure, shared/pending.py), in the
    order the Lua scripts take them. A call leaves when its caller stops waiting, so a worker can
    tell whether anyone still wants an answer (`HEXISTS` on `costs`)."""

    deadlines: str  # sorted set: call id by deadline
    costs: str  # hash: call id -> its cost
    total: str  # the running total cost


def pending_keys(model: str) -> PendingKeys:
    base = f"{PREFIX}:pending:{model}"
    return PendingKeys(f"{base}:deadlines", f"{base}:pairs", f"{base}:total")


def job_key(job_id: str) -> str:
    """Hash of a bulk job's state and counters."""
    return f"{PREFIX}:job:{job_id}"


def job_pieces_key(job_id: str) -> str:
    """Set of the pieces of a job whose results are written and counted."""
    return f"{PREFIX}:job:{job_id}:pieces"


def owner_jobs_key(owner: str) -> str:
    """Sorted set of a token's kept jobs, scored by the bytes of input each stored (limits)."""
    return f"{PREFIX}:owner:{owner}:jobs"


class FeedKeys(NamedTuple):
    """Fair turns of bulk pieces (shared/feed.py), in the order its Lua script takes them."""

    inflight: str  # sorted set: pieces in flight, scored by when they were handed out
    owners: str  # sorted set: owners in rotation, scored by their last turn
    turn: str  # the turn counter
    sending: str  # sorted set: pieces handed out, not yet confirmed sent to the broker


def feed_keys(model: str) -> FeedKeys:
    base = f"{PREFIX}:feed:{model}"
    return FeedKeys(f"{base}:inflight", f"{base}:owners", f"{base}:turn", f"{base}:sending")


def feed_stale_after_key(model: str) -> str:
    """Seconds after which a piece in flight counts as lost, as the workers publish it."""
    return f"{PREFIX}:feed:{model}:inflight:stale-after"


def feed_topup_key(model: str) -> str:
    """Held for a few seconds by the API process that last topped the model's fair turns up."""
    return f"{PREFIX}:feed:{model}:turn:api"


def feed_owner_key(model: str, owner: str) -> str:
    """Sorted set of one owner's jobs with pieces still to hand out, oldest first."""
    return f"{PREFIX}:feed:{model}:owner:{owner}"


def sweep_lock_key() -> str:
    """Held while one API process deletes the stored files of expired jobs."""
    return f"{PREFIX}:jobs:sweep"


def worker_metrics_key(worker_id: str) -> str:
    """A worker's latest metric snapshot (JSON), refreshed with its heartbeat."""
    return f"{PREFIX}:worker:{worker_id}:metrics"


def probe_key() -> str:
    """A tiny expiring key /ready writes: Redis may answer PING yet refuse writes (disk full, OOM)."""
    return f"{PREFIX}:probe"


def held_key(worker_id: str) -> str:
    """Set of the Celery delivery tags a worker holds (shared/redelivery.py)."""
    return f"{PREFIX}:held:{worker_id}"


def holders_key() -> str:
    """Sorted set: workers that hold messages, scored by the Redis time of their last heartbeat."""
    return f"{PREFIX}:holders"


#: kombu's Redis transport keeps every delivered, unacknowledged message here (kombu's defaults;
#: shared/celery_config.py does not rename them): the hash of messages by delivery tag, and the
#: sorted set of delivery times that VISIBILITY_TIMEOUT is measured against.
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"
