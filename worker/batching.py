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
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
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
    order: int  # arrival order, to put back what a batch left out

    @property
    def length(self) -> int:
        return len(self.ticket.sequences[self.index])


class Batcher:
    """Merges pairs from concurrent requests into forward passes on one model thread."""

    def __init__(
        self,
        run: Callable[[Any], list[float]],
        *,
        collate: Callable[[list[list[int]]], Any] = lambda batch: batch,
        max_batch_tokens: int,
        max_wait: float = 0.002,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        self._run_batch = run
        self._collate = collate
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
        self._queued_tokens = 0
        self._stopped = False
        # The next batch is chosen and collated while the current one runs; one slot of look-ahead
        # only, so realtime work arriving meanwhile waits behind at most one prepared batch.
        self._handoff: queue.Queue[tuple[list[_Item], Any] | None] = queue.Queue(maxsize=1)
        self._slot = threading.Semaphore(1)
        self._threads = [
            threading.Thread(target=self._prepare_loop, name="batch-prep", daemon=True),
            threading.Thread(target=self._model_loop, name="model", daemon=True),
        ]

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
            self._queued_tokens += sum(len(s) for s in sequences)
            self._cond.notify()
        return ticket

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Batcher:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._slot.release()  # let the preparing thread see the stop
        for thread in self._threads:
            thread.join(timeout=10)

    def pending(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    # --- the two threads -------------------------------------------------------------------------
    def _prepare_loop(self) -> None:
        while True:
            self._slot.acquire()  # wait until the model thread has taken the previous batch
            batch = self._next_batch()
            if batch is None:
                self._handoff.put(None)
                return
            if not batch:
                self._slot.release()
                continue
            try:
                prepared = self._collate([it.ticket.sequences[it.index] for it in batch])
            except Exception as exc:
                log.exception("could not collate a batch of %d pairs", len(batch))
                self._fail(batch, exc)
                self._slot.release()
                continue
            self._handoff.put((batch, prepared))

    def _model_loop(self) -> None:
        while True:
            job = self._handoff.get()
            self._slot.release()
            if job is None:
                return
            self._execute(*job)

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
            while self._incoming and self._queued_tokens < self._max_tokens:
                left = waited_until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._take()

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
                self._queued_tokens -= item.length
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
            self._queued_tokens += item.length
        return batch

    def _execute(self, batch: list[_Item], prepared: Any) -> None:
        started = time.perf_counter()
        try:
            logits = self._run_batch(prepared)
        except OutOfMemory:
            if len(batch) == 1:
                log.error("one pair of %d tokens does not fit in device memory", batch[0].length)
                self._fail(batch, OutOfMemory("the pair does not fit in device memory"))
                return
            half = len(batch) // 2
            log.warning("out of memory on %d pairs; retrying in halves", len(batch))
            for part in (batch[:half], batch[half:]):
                self._execute(part, self._collate([it.ticket.sequences[it.index] for it in part]))
            return
        except Exception as exc:  # one bad batch must not take the worker down
            log.exception("forward pass failed for %d pairs", len(batch))
            self._fail(batch, exc)
            return
        elapsed = time.perf_counter() - started
        if self._on_batch is not None:
            self._on_batch(len(batch), len(batch) * max(it.length for it in batch), elapsed)
        for it, value in zip(batch, logits):
            ticket = it.ticket
            ticket.results[it.index] = value
            ticket.remaining -= 1
            if ticket.remaining == 0 and not ticket.done.is_set():
                ticket.done.set()

    @staticmethod
    def _fail(batch: list[_Item], error: BaseException) -> None:
        for it in batch:
            it.ticket.fail(error)
