"""Pair inputs of many requests -> forward passes under a token budget, on one model thread.

Requests arrive as tickets (packed pair inputs, a priority, maybe a deadline and a tag). The
model thread forms each batch from a window at the head of the queue: the oldest pending pair
and the pairs nearest to it in length, while rows x longest row fits `max_batch_tokens`, so
padding stays low and the queue moves in order. Realtime pairs always form the next batch
before any bulk pair. A lone request on an idle device is launched at once; batches form while
the device is busy with the previous one (the next batch is chosen and collated while it runs).

Refill: the batch chosen while the device runs may have been chosen from a few requests, the ones
that had arrived when the pass started. When the pass ends, if more came meanwhile and that batch
is not full (or is bulk work and a realtime call came), it is put back and chosen again from
everything waiting. Behind the service's feeders requests trickle in while a pass runs, and
batches chosen at a pass's start were about half the size of those the same load made in-process
(simulated H100, W2: 80 pairs a batch against 144). The cost is one more collation, on the host,
when it happens.

Everything per pair is numpy, per batch or per ticket Python: the model's process spends
microseconds per pair outside the forward pass. Like TEI's queue/batcher, this module knows
nothing of Celery, Redis or processes; the backend is behind the small protocol in backends/.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.backends import Backend, PaddedBatch
from engine.cost import ATTENTION_KNEE, padded_cost  # noqa: F401 - the one definition (engine/cost.py)
from engine.errors import Cancelled, EngineFailed, Expired, OutOfMemory  # noqa: F401  (Cancelled, Expired re-exported)

log = logging.getLogger(__name__)

REALTIME = 0
BULK = 1

#: Candidates for a batch: a FIFO window of this many token budgets (bounded in pairs too).
#: Bulk work is not waiting on anyone, so its window is wider: less padding (96 % -> 98 % real
#: tokens on FastGPT-like lengths) for a little more sorting.
WINDOW_BUDGETS = {REALTIME: 8, BULK: 64}
WINDOW_PAIRS = 4096
#: A batch chosen while the device was busy is chosen again when it finishes if requests came
#: meanwhile and the batch is under this share of the token budget (docstring, "refill").
REFILL_BELOW = 0.9



def plan_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group item indices into batches whose padded cost fits `max_tokens`, longest first (the
    global order the in-process ceiling uses; the batcher reaches it for one large request)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and padded_cost(len(current) + 1, width) > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pick_around(lengths: Sequence[int] | np.ndarray, anchor: int, max_tokens: int) -> list[int]:
    """Indices of a batch that holds `anchor` and the items closest to it in length.

    The batch grows over a contiguous run of the length-sorted items, one neighbour at a time,
    on the side nearer in length, while the padded cost fits `max_tokens`. Serving the anchor
    (the oldest item) in every batch keeps the queue moving in order; choosing its neighbours
    in length keeps padding low (about 95 % of computed tokens are real with an 8-budget window
    of FastGPT-like lengths, against 73 % for longest-first).
    """
    lens = np.asarray(lengths)
    order = np.argsort(-lens, kind="stable")
    s = lens[order].tolist()
    a = int(np.flatnonzero(order == anchor)[0])
    lo = hi = a
    n = len(s)
    while True:
        up = lo > 0 and padded_cost(hi + 2 - lo, s[lo - 1]) <= max_tokens
        down = hi < n - 1 and padded_cost(hi + 2 - lo, s[lo]) <= max_tokens
        if up and down:
            up, down = s[lo - 1] - s[a] < s[a] - s[hi + 1], s[lo - 1] - s[a] >= s[a] - s[hi + 1]
        if up:
            lo -= 1
        elif down:
            hi += 1
        else:
            return order[lo : hi + 1].tolist()


@dataclass
class Timings:
    """When a request's batches ran, for a trace (asked for with `timed=True`; shared/tracing.py
    turns it into spans in the worker). Wall-clock seconds (time.time(), comparable across the
    host's processes); 0.0 until its first batch ran. rows and tokens are those of the batches
    it rode in, summed: a request scored in one batch gets that batch's size and tokens."""

    started: float = 0.0  # first batch launched
    finished: float = 0.0  # last batch's logits back
    batches: int = 0
    rows: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0


class Ticket:
    """One request's pair inputs in the batcher; its logits fill in as batches finish."""

    __slots__ = ("lengths", "ids", "starts", "pending", "pending_tokens", "results", "remaining", "priority",
                 "deadline", "tag", "error", "done", "on_done", "timings")

    def __init__(self, lengths: np.ndarray, ids: np.ndarray, *, priority: int = REALTIME,
                 deadline: float | None = None, tag: str | None = None,
                 on_done: Callable[[Ticket], None] | None = None, timed: bool = False) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int32)
        self.ids = np.asarray(ids, dtype=np.int32)
        self.starts = np.cumsum(self.lengths, dtype=np.int64) - self.lengths
        # Longest first inside a request: neighbours in the queue then pad little together.
        self.pending = np.argsort(-self.lengths, kind="stable")
        self.pending_tokens = int(self.lengths.sum())
        self.results = np.zeros(len(self.lengths), dtype=np.float32)
        self.remaining = len(self.lengths)
        self.priority = priority
        self.deadline = deadline
        self.tag = tag
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.on_done = on_done
        self.timings = Timings() if timed else None
        if self.remaining == 0:
            self._finish()

    def wait(self, timeout: float | None = None) -> np.ndarray:
        """The logits in input order; raises the request's error (Expired when it timed out)."""
        if not self.done.wait(timeout):
            self.fail(Expired("not scored before the deadline"))  # its queued pairs are skipped
        if self.error is not None:
            raise self.error
        return self.results

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self._finish()

    def _finish(self) -> None:
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)


@dataclass
class _Batch:
    """A chosen batch: per ticket, which of its pairs, in row order."""

    groups: list[tuple[Ticket, np.ndarray]]
    rows: int
    width: int
    real_tokens: int


@dataclass
class BatchStats:
    pairs: int
    real_tokens: int
    padded_tokens: int
    cost: float  # padded_cost of the batch
    seconds: float  # wall time from launch to logits
    forward_cpu: float  # CPU seconds of this thread inside the backend's launch and finish


class Batcher:
    """Merges pairs from concurrent requests into forward passes on one model thread."""

    def __init__(self, backend: Backend, *, max_batch_tokens: int,
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        self.backend = backend
        self.max_tokens = max_batch_tokens
        self._on_batch = on_batch
        self._queues: dict[int, collections.deque[Ticket]] = {REALTIME: collections.deque(), BULK: collections.deque()}
        self._cond = threading.Condition()
        self._arrivals = 0  # requests submitted so far: has anything come since a batch was chosen?
        self._stopped = False
        self._thread = threading.Thread(target=self._model_loop, name="model", daemon=True)

    # --- producer side ---------------------------------------------------------------------------------
    def submit(self, lengths: np.ndarray, ids: np.ndarray, *, priority: int = REALTIME,
               deadline: float | None = None, tag: str | None = None,
               on_done: Callable[[Ticket], None] | None = None, timed: bool = False) -> Ticket:
        ticket = Ticket(lengths, ids, priority=priority, deadline=deadline, tag=tag, on_done=on_done, timed=timed)
        if ticket.remaining:
            with self._cond:
                if self._stopped:
                    ticket.fail(EngineFailed("the engine is shutting down"))
                    return ticket
                self._queues[priority].append(ticket)
                self._arrivals += 1
                self._cond.notify()
        return ticket

    def cancel(self, tag: str) -> int:
        """Fail every queued request carrying `tag`; its pairs not yet scored are skipped."""
        with self._cond:
            hit = [t for q in self._queues.values() for t in q if t.tag == tag and not t.done.is_set()]
        for ticket in hit:
            ticket.fail(Cancelled(f"{tag} was cancelled"))
        return len(hit)

    def pending_pairs(self) -> int:
        with self._cond:
            return sum(len(t.pending) for q in self._queues.values() for t in q)

    # --- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # --- choosing a batch -----------------------------------------------------------------------------------
    def _take(self) -> _Batch | None:
        """The next batch, from the window at the head of the highest-priority queue; None when
        nothing is pending. Called with the lock held."""
        now = time.time()
        for priority in (REALTIME, BULK):
            q = self._queues[priority]
            window: list[Ticket] = []
            tokens = 0
            pairs = 0
            limit = WINDOW_BUDGETS[priority] * self.max_tokens
            i = 0
            while i < len(q) and tokens < limit and pairs < WINDOW_PAIRS:
                ticket = q[i]
                if ticket.done.is_set() or not len(ticket.pending):
                    del q[i]  # failed, gave up, or fully taken: nothing left to batch
                    continue
                if ticket.deadline is not None and now > ticket.deadline:
                    del q[i]
                    ticket.fail(Expired("deadline passed while queued"))
                    continue
                window.append(ticket)
                tokens += ticket.pending_tokens
                pairs += len(ticket.pending)
                i += 1
            if window:
                return self._choose(window)
        return None

    def _choose(self, window: list[Ticket]) -> _Batch:
        if len(window) == 1:
            lens = window[0].lengths[window[0].pending]
        else:
            lens = np.concatenate([t.lengths[t.pending] for t in window])
        # The anchor is the oldest ticket's longest pending pair: position 0 of the window.
        chosen = np.zeros(len(lens), dtype=bool)
        chosen[pick_around(lens, 0, self.max_tokens)] = True
        groups: list[tuple[Ticket, np.ndarray]] = []
        start = 0
        for ticket in window:
            n = len(ticket.pending)
            mask = chosen[start : start + n]
            start += n
            if mask.any():
                taken = ticket.pending[mask]
                ticket.pending = ticket.pending[~mask]
                ticket.pending_tokens -= int(ticket.lengths[taken].sum())
                groups.append((ticket, taken))
        picked = lens[chosen]
        return _Batch(groups, rows=int(chosen.sum()), width=int(picked.max()), real_tokens=int(picked.sum()))

    def _next(self, *, wait: bool) -> _Batch | None | bool:
        """The next batch; None when nothing waits (and `wait` is False); False once stopped."""
        with self._cond:
            while True:
                if self._stopped:
                    for q in self._queues.values():
                        for ticket in q:
                            ticket.fail(EngineFailed("the engine is shutting down"))
                        q.clear()
                    return False
                batch = self._take()
                if batch is not None or not wait:
                    return batch
                self._cond.wait()

    # --- the model thread ------------------------------------------------------------------------------------
    def _model_loop(self) -> None:
        batch = self._next(wait=True)
        prepared = self._prepare(batch) if batch else None
        while batch:
            started = time.perf_counter()
            cpu = time.thread_time()
            handle = self._launch(batch, prepared) if prepared is not None else None
            cpu = time.thread_time() - cpu
            # While the device works: choose and collate the next batch, without waiting for more.
            seen = self._arrivals
            upcoming = self._next(wait=False)
            upcoming_prepared = self._prepare(upcoming) if upcoming else None
            if handle is not None:
                self._complete(batch, handle, started, cpu)
            if upcoming is not None and self._arrivals != seen and self._refill(upcoming):
                # Requests came while the device worked, and the batch chosen before they did is
                # not full, or is bulk work with realtime calls now waiting: choose again from all
                # that waits now (module docstring, "refill").
                upcoming = self._retake(upcoming)
                upcoming_prepared = self._prepare(upcoming) if upcoming else None
            if upcoming is None:  # nothing was waiting: sleep until something is, then go at once
                upcoming = self._next(wait=True)
                upcoming_prepared = self._prepare(upcoming) if upcoming else None
            batch, prepared = upcoming, upcoming_prepared

    def _refill(self, batch: _Batch) -> bool:
        if padded_cost(batch.rows, batch.width) < REFILL_BELOW * self.max_tokens:
            return True
        with self._cond:
            realtime_waits = any(not t.done.is_set() and len(t.pending) for t in self._queues[REALTIME])
        return realtime_waits and all(t.priority == BULK for t, _ in batch.groups)

    def _retake(self, batch: _Batch) -> _Batch | None:
        """Put a chosen, unlaunched batch's pairs back in their requests and choose anew."""
        with self._cond:
            for ticket, taken in batch.groups:
                pending = np.concatenate([taken, ticket.pending])
                ticket.pending = pending[np.argsort(-ticket.lengths[pending], kind="stable")]  # longest first again
                ticket.pending_tokens += int(ticket.lengths[taken].sum())
            # Its requests are still queued (only the model thread takes them off, and it has not
            # looked since), so the next batch is chosen as if this one had never been.
            return self._take()

    def _padded(self, batch: _Batch) -> PaddedBatch:
        ids = np.full((batch.rows, batch.width), self.backend.pad_id, dtype=np.int64)
        lengths = np.empty(batch.rows, dtype=np.int32)
        row = 0
        for ticket, taken in batch.groups:
            for start, n in zip(ticket.starts[taken].tolist(), ticket.lengths[taken].tolist()):
                ids[row, :n] = ticket.ids[start : start + n]
                lengths[row] = n
                row += 1
        return PaddedBatch(ids=ids, lengths=lengths)

    def _prepare(self, batch: _Batch) -> Any:
        try:
            return self.backend.prepare(self._padded(batch))
        except Exception as exc:
            log.exception("could not collate a batch of %d pairs", batch.rows)
            self._fail(batch, exc)
            return None

    def _launch(self, batch: _Batch, prepared: Any) -> Any:
        """Launch a batch; on failure the batch is dealt with here and None is returned."""
        try:
            return self.backend.launch(prepared)
        except OutOfMemory:
            self._split(batch)
        except Exception as exc:  # one bad batch must not take the engine down
            log.exception("forward pass failed for %d pairs", batch.rows)
            self._fail(batch, exc)
        return None

    def _complete(self, batch: _Batch, handle: Any, started: float, launch_cpu: float) -> None:
        cpu = time.thread_time()
        try:
            logits = self.backend.finish(handle)
        except OutOfMemory:
            self._split(batch)
            return
        except Exception as exc:
            log.exception("forward pass failed for %d pairs", batch.rows)
            self._fail(batch, exc)
            return
        cpu = time.thread_time() - cpu + launch_cpu
        if self._on_batch is not None:
            self._on_batch(BatchStats(pairs=batch.rows, real_tokens=batch.real_tokens,
                                      padded_tokens=batch.rows * batch.width,
                                      cost=padded_cost(batch.rows, batch.width),
                                      seconds=time.perf_counter() - started, forward_cpu=cpu))
        if any(ticket.timings is not None for ticket, _ in batch.groups):
            self._time(batch, started)
        row = 0
        for ticket, taken in batch.groups:
            n = len(taken)
            if not ticket.done.is_set():
                ticket.results[taken] = logits[row : row + n]
                ticket.remaining -= n
                if ticket.remaining == 0:
                    ticket._finish()
            row += n

    @staticmethod
    def _time(batch: _Batch, started: float) -> None:
        """Record the batch in the timings of the requests that asked (before any is finished)."""
        end = time.time()
        start = end - (time.perf_counter() - started)
        for ticket, _ in batch.groups:
            t = ticket.timings
            if t is not None:
                t.started = t.started or start
                t.finished = end
                t.batches += 1
                t.rows += batch.rows
                t.padded_tokens += batch.rows * batch.width
                t.real_tokens += batch.real_tokens

    def _split(self, batch: _Batch) -> None:
        """Out of memory: run the two halves one after the other (recursively)."""
        if batch.rows == 1:
            log.error("one pair of %d tokens does not fit in device memory", batch.width)
            self._fail(batch, OutOfMemory("the pair does not fit in device memory"))
            return
        log.warning("out of memory on %d pairs; retrying in halves", batch.rows)
        flat = [(t, i) for t, taken in batch.groups for i in taken.tolist()]
        half = len(flat) // 2
        for part in (flat[:half], flat[half:]):
            groups: dict[int, tuple[Ticket, list[int]]] = {}
            for t, i in part:
                groups.setdefault(id(t), (t, []))[1].append(i)
            sub_groups = [(t, np.asarray(idx, dtype=np.int64)) for t, idx in groups.values()]
            widths = [int(t.lengths[idx].max()) for t, idx in sub_groups]
            sub = _Batch(sub_groups, rows=len(part), width=max(widths),
                         real_tokens=sum(int(t.lengths[idx].sum()) for t, idx in sub_groups))
            prepared = self._prepare(sub)
            if prepared is None:
                continue
            started, cpu = time.perf_counter(), time.thread_time()
            handle = self._launch(sub, prepared)
            if handle is not None:
                self._complete(sub, handle, started, time.thread_time() - cpu)

    @staticmethod
    def _fail(batch: _Batch, error: BaseException) -> None:
        for ticket, _ in batch.groups:
            ticket.fail(error)
