"""Cutting encoded pairs into forward passes by a token budget, within and across requests.

`plan_batches` is the pure rule (length-sorted items, padded tokens = rows x longest row).
`Batcher` applies it across requests: Celery task threads hand in encoded pairs, one model thread
per device runs them, realtime work before bulk work, and each request gets its scores back in its
own input order. Like TEI's queue/batcher split, the batcher knows nothing of Celery or Redis.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

REALTIME = 0
BULK = 1


def plan_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group item indices into batches whose padded size (rows x longest) fits `max_tokens`.

    Items are taken longest first, so each batch holds items of similar length and little
    padding is computed. An item longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * width > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class Expired(Exception):
    """The request's deadline passed before it was scored: nobody waits for the answer."""


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
    order: int  # arrival order, to put back what a batch left out

    @property
    def length(self) -> int:
        return len(self.ticket.sequences[self.index])


class Batcher:
    """Merges pairs from concurrent requests into forward passes on one model thread."""

    def __init__(
        self,
        forward: Callable[[list[list[int]]], list[float]],
        *,
        max_batch_tokens: int,
        max_wait: float = 0.002,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        self._forward = forward
        self._max_tokens = max_batch_tokens
        self._max_wait = max_wait
        self._on_batch = on_batch
        self._queues: dict[int, collections.deque[_Item]] = {
            REALTIME: collections.deque(),
            BULK: collections.deque(),
        }
        self._cond = threading.Condition()
        self._counter = itertools.count()
        self._incoming = 0  # requests being tokenized right now: company worth waiting for
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)

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
            self._queues[priority].extend(_Item(ticket, i, next(self._counter)) for i in order)
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

    # --- model thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._stopped and not any(self._queues.values()):
                self._cond.wait()
            if self._stopped:
                for q in self._queues.values():
                    for item in q:
                        item.ticket.fail(RuntimeError("worker is shutting down"))
                    q.clear()
                return None
            # Wait a moment for company only while other requests are being tokenized.
            waited_until = time.monotonic() + self._max_wait
            while self._incoming and self._queued_tokens() < self._max_tokens:
                left = waited_until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._take()

    def _queued_tokens(self) -> int:
        return sum(item.length for q in self._queues.values() for item in q)

    def _take(self) -> list[_Item]:
        """The next batch: a FIFO window of up to twice the budget, longest items first.

        The window keeps old requests from being overtaken for ever; picking the longest items of
        it groups similar lengths. Realtime items come before any bulk item.
        """
        now = time.time()
        window: list[_Item] = []
        tokens = 0
        for priority in (REALTIME, BULK):
            q = self._queues[priority]
            while q and tokens < 2 * self._max_tokens:
                item = q.popleft()
                if item.ticket.done.is_set():
                    continue  # its request already failed or gave up
                if item.ticket.expired(now):
                    item.ticket.fail(Expired("deadline passed while queued"))
                    continue
                window.append(item)
                tokens += item.length
        window.sort(key=lambda it: (it.ticket.priority, -it.length))
        batch: list[_Item] = []
        width = 0
        for item in window:
            wider = max(width, item.length)
            if batch and (len(batch) + 1) * wider > self._max_tokens:
                break
            batch.append(item)
            width = wider
        # What did not fit goes back to the front, in its original order.
        rest = window[len(batch) :]
        rest.sort(key=lambda it: it.order)
        for item in reversed(rest):
            self._queues[item.ticket.priority].appendleft(item)
        return batch

    def _execute(self, batch: list[_Item]) -> None:
        if not batch:
            return
        started = time.perf_counter()
        try:
            logits = self._forward([it.ticket.sequences[it.index] for it in batch])
        except Exception as exc:  # one bad batch must not take the worker down
            log.exception("forward pass failed for %d pairs", len(batch))
            for it in batch:
                it.ticket.fail(exc)
            return
        elapsed = time.perf_counter() - started
        if self._on_batch is not None:
            width = max(it.length for it in batch)
            self._on_batch(len(batch), len(batch) * width, elapsed)
        for it, value in zip(batch, logits):
            ticket = it.ticket
            ticket.results[it.index] = value
            ticket.remaining -= 1
            if ticket.remaining == 0 and not ticket.done.is_set():
                ticket.done.set()
