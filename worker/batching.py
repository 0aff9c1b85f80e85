"""Cutting encoded pairs into forward passes by a token budget, within and across requests.

`plan_batches` is the pure rule (length-sorted items, padded tokens = rows x longest row).
`Batcher` applies it across requests: Celery task threads hand in encoded pairs, one model thread
per device runs them, realtime work before bulk work, and each request gets its scores back in its
own input order. Like TEI's queue/batcher split, the batcher knows nothing of Celery or Redis.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

REALTIME = 0
BULK = 1

#: Candidates for a batch: a FIFO window of this many token budgets (bounded in items too).
#: Bulk work is not waiting on anyone, so its window is wider: less padding (96 % -> 98 % real
#: tokens on FastGPT-like lengths) for a little more sorting.
WINDOW_BUDGETS = {REALTIME: 8, BULK: 64}
WINDOW_ITEMS = 4096


#: Width beyond which attention, quadratic in length, outweighs the rest of a forward pass.
ATTENTION_KNEE = 512


def padded_cost(rows: int, width: int) -> float:
    """What a batch costs against MAX_BATCH_TOKENS: its padded tokens (rows x width), scaled by
    width / 512 beyond 512 tokens because attention grows with the square of the length (v2-m3 at
    8192 tokens: one pair counts 131 072, as much as 256 pairs of 512)."""
    return rows * width * max(1.0, width / ATTENTION_KNEE)


def plan_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group item indices into batches whose padded cost fits `max_tokens`.

    Items are taken longest first, so each batch holds items of similar length and little
    padding is computed. An item longer than the budget gets a batch of its own.
    """
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


def pick_around(lengths: Sequence[int], anchor: int, max_tokens: int) -> list[int]:
    """Indices of a batch that holds `anchor` and the items closest to it in length.

    The batch grows over a contiguous run of the length-sorted items, one neighbour at a time,
    on the side nearer in length, while the padded cost fits `max_tokens`. Serving the anchor
    (the oldest item) in every batch keeps the queue moving in order; choosing its neighbours
    in length keeps padding low (about 95 % of computed tokens are real with an 8-budget window
    of FastGPT-like lengths, against 73 % for longest-first).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    a = order.index(anchor)
    lo = hi = a
    while True:
        grow_up = lo > 0 and padded_cost(hi + 2 - lo, lengths[order[lo - 1]]) <= max_tokens
        grow_down = hi < len(order) - 1 and padded_cost(hi + 2 - lo, lengths[order[lo]]) <= max_tokens
        if grow_up and grow_down:
            up_gap = lengths[order[lo - 1]] - lengths[order[a]]
            down_gap = lengths[order[a]] - lengths[order[hi + 1]]
            grow_up, grow_down = up_gap < down_gap, up_gap >= down_gap
        if grow_up:
            lo -= 1
        elif grow_down:
            hi += 1
        else:
            return [order[p] for p in range(lo, hi + 1)]


class Expired(Exception):
    """The request's deadline passed before it was scored: nobody waits for the answer."""


class OutOfMemory(Exception):
    """Raised by `run` when a batch does not fit the device: the batcher retries it in halves."""


@dataclass(eq=False)
class Ticket:
    """One request's pairs in the batcher; `wait()` returns their logits in input order."""

    sequences: list[list[int]]
    priority: int
    deadline: float | None
    results: list[float | None] = field(init=False)
    remaining: int = field(init=False)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.sequences)
        self.remaining = len(self.sequences)
        if not self.sequences:
            self.done.set()

    def wait(self, timeout: float | None = None) -> list[float]:
        if not self.done.wait(timeout):
            self.fail(Expired("not scored before the deadline"))  # its queued pairs are skipped
        if self.error is not None:
            raise self.error
        return self.results  # type: ignore[return-value]

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


@dataclass
class _Item:
    ticket: Ticket
    index: int

    @property
    def length(self) -> int:
        return len(self.ticket.sequences[self.index])


class Batcher:
    """Merges pairs from concurrent requests into forward passes on one model thread.

    The model is driven through three calls: `collate` (token ids -> device-ready input),
    `launch` (start the forward pass; on CUDA it returns before the device is done) and `finish`
    (wait for it, return float logits). Between `launch` and `finish` the model thread picks and
    collates the next batch, so the device never waits for Python and no second thread is needed.
    """

    def __init__(
        self,
        launch: Callable[[Any], Any],
        *,
        collate: Callable[[list[list[int]]], Any] = lambda batch: batch,
        finish: Callable[[Any], list[float]] = lambda handle: handle,
        max_batch_tokens: int,
        max_wait: float = 0.002,
        on_batch: Callable[[int, int, int, float], None] | None = None,
    ) -> None:
        self._launch = launch
        self._collate = collate
        self._finish = finish
        self._max_tokens = max_batch_tokens
        self._max_wait = max_wait
        self._on_batch = on_batch
        self._queues: dict[int, collections.deque[_Item]] = {
            REALTIME: collections.deque(),
            BULK: collections.deque(),
        }
        self._cond = threading.Condition()
        self._incoming = 0  # requests being tokenized right now: company worth waiting for
        self._queued_tokens = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._model_loop, name="model", daemon=True)

    # --- producer side (Celery task threads) ---------------------------------------------------
    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Wrap tokenization, so the model thread knows more pairs are about to arrive."""
        with self._cond:
            self._incoming += 1
        try:
            yield
        finally:
            with self._cond:
                self._incoming -= 1
                self._cond.notify()

    def submit(
        self, sequences: list[list[int]], *, priority: int = REALTIME, deadline: float | None = None
    ) -> Ticket:
        ticket = Ticket(sequences, priority, deadline)
        if not sequences:
            return ticket
        # Longest first inside a request: neighbours in the queue then pad little together.
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        with self._cond:
            if self._stopped:
                raise RuntimeError("batcher is stopped")
            self._queues[priority].extend(_Item(ticket, i) for i in order)
            self._queued_tokens += sum(len(s) for s in sequences)
            self._cond.notify()
        return ticket

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def pending(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def _take(self) -> list[_Item]:
        """The next batch: the oldest item of the highest priority and its nearest in length.

        Candidates are a FIFO window of a few budgets of realtime items, or of bulk items when no
        realtime item waits; what is not taken goes back in its place.
        """
        now = time.time()
        window: list[_Item] = []
        for priority in (REALTIME, BULK):
            q = self._queues[priority]
            tokens = 0
            while q and tokens < WINDOW_BUDGETS[priority] * self._max_tokens and len(window) < WINDOW_ITEMS:
                item = q.popleft()
                self._queued_tokens -= item.length
                if item.ticket.done.is_set():
                    continue  # its request already failed or gave up
                if item.ticket.expired(now):
                    item.ticket.fail(Expired("deadline passed while queued"))
                    continue
                window.append(item)
                tokens += item.length
            if window:
                break
        if not window:
            return []
        chosen = set(pick_around([it.length for it in window], 0, self._max_tokens))
        batch = [it for i, it in enumerate(window) if i in chosen]
        rest = [it for i, it in enumerate(window) if i not in chosen]
        for item in reversed(rest):  # back to the front, in their original order
            self._queues[item.ticket.priority].appendleft(item)
            self._queued_tokens += item.length
        return batch

    # --- the model thread --------------------------------------------------------------------------
    def _model_loop(self) -> None:
        batch = self._next_batch(wait=True)
        prepared = self._prepare(batch)
        while batch is not None:
            if not batch or prepared is None:
                batch = self._next_batch(wait=True)
                prepared = self._prepare(batch)
                continue
            started = time.perf_counter()
            handle = self._start(batch, prepared)
            # While the device works: choose and collate the next batch, without waiting.
            upcoming = self._next_batch(wait=False)
            upcoming_prepared = self._prepare(upcoming)
            if handle is not None:
                self._complete(batch, handle, started)
            batch, prepared = upcoming, upcoming_prepared
            if batch is not None and not batch:
                batch = self._next_batch(wait=True)
                prepared = self._prepare(batch)

    def _next_batch(self, *, wait: bool) -> list[_Item] | None:
        """The next batch; [] when nothing waits (and `wait` is False); None once stopped."""
        with self._cond:
            while wait and not self._stopped and not any(self._queues.values()):
                self._cond.wait()
            if self._stopped:
                for q in self._queues.values():
                    for item in q:
                        item.ticket.fail(RuntimeError("worker is shutting down"))
                    q.clear()
                return None
            if wait:  # the device is idle: wait a moment for requests being tokenized right now
                until = time.monotonic() + self._max_wait
                while self._incoming and self._queued_tokens < self._max_tokens:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            return self._take()

    def _prepare(self, batch: list[_Item] | None) -> Any:
        if not batch:
            return None
        try:
            return self._collate([it.ticket.sequences[it.index] for it in batch])
        except Exception as exc:
            log.exception("could not collate a batch of %d pairs", len(batch))
            self._fail(batch, exc)
            return None

    def _start(self, batch: list[_Item], prepared: Any) -> Any:
        """Launch a batch; on failure the batch is dealt with here and None is returned."""
        try:
            return self._launch(prepared)
        except OutOfMemory:
            self._split(batch)
        except Exception as exc:  # one bad batch must not take the worker down
            log.exception("forward pass failed for %d pairs", len(batch))
            self._fail(batch, exc)
        return None

    def _complete(self, batch: list[_Item], handle: Any, started: float) -> None:
        try:
            logits = self._finish(handle)
        except OutOfMemory:
            self._split(batch)
            return
        except Exception as exc:
            log.exception("forward pass failed for %d pairs", len(batch))
            self._fail(batch, exc)
            return
        if self._on_batch is not None:  # pairs, real tokens, padded tokens, seconds
            lengths = [it.length for it in batch]
            self._on_batch(len(batch), sum(lengths), len(batch) * max(lengths), time.perf_counter() - started)
        for it, value in zip(batch, logits):
            ticket = it.ticket
            ticket.results[it.index] = value
            ticket.remaining -= 1
            if ticket.remaining == 0 and not ticket.done.is_set():
                ticket.done.set()

    def _split(self, batch: list[_Item]) -> None:
        """Out of memory: run the two halves one after the other (recursively)."""
        if len(batch) == 1:
            log.error("one pair of %d tokens does not fit in device memory", batch[0].length)
            self._fail(batch, OutOfMemory("the pair does not fit in device memory"))
            return
        log.warning("out of memory on %d pairs; retrying in halves", len(batch))
        half = len(batch) // 2
        for part in (batch[:half], batch[half:]):
            prepared = self._prepare(part)
            if prepared is None:
                continue
            started = time.perf_counter()
            handle = self._start(part, prepared)
            if handle is not None:
                self._complete(part, handle, started)

    @staticmethod
    def _fail(batch: list[_Item], error: BaseException) -> None:
        for it in batch:
            it.ticket.fail(error)
