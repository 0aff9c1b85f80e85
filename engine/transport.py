"""How feeders speak to an engine process: one Unix socket, many feeders, packed arrays.

One engine process holds a device's only batcher and only copy of the weights; the feeders (the
worker processes that run Celery and tokenize) connect to its socket, each over a connection
of its own. Requests cross as packed arrays (a small header, int32 lengths and ids) and come
back as float32 logits: nothing is pickled and nothing on the engine's side is per token.

Framing is multiprocessing's (`Connection.send_bytes`: a length, then the bytes). Messages, first
byte the kind:

  feeder -> engine  H hello(JSON: who the feeder is)
                    S submit(ticket, priority, deadline, pairs, tag, timed, lengths, ids)
                    C cancel(tag)
  engine -> feeder  I ready(JSON: the engine's description)   F failed(reason: it cannot start)
                    R result(ticket, pairs, extra length, logits, extra JSON)
                    E error(ticket, code, message)   B batch statistics

A result's `extra` is a JSON object of per-request facts, empty unless the request was `timed`:
then `{"timings": [...]}`, engine.batcher.Timings' fields in order (when its batches ran, for a
trace: shared/tracing.py), which `Pending.timings` gives back. Ticket
ids are the feeder's own, one counter per connection. Batch statistics go to one feeder only
(the longest connected), so a model's pace summed over its feeders counts each batch once.

A feeder whose connection drops gets `EngineFailed` for every request in flight on it (the
caller answers 503 or hands the work back to its queue) and, when the engine is shared
(`reconnect=True`), connects again as soon as the restarted engine listens. An engine whose
feeder drops fails that feeder's queued requests, so their pairs are never computed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from engine.batcher import Batcher, BatchStats, Ticket, Timings
from engine.encoding import Encoded
from engine.errors import EngineFailed, Expired, code_of, error_of

log = logging.getLogger(__name__)

_SUBMIT = struct.Struct("<QBdIHB")  # ticket id, priority, deadline (NaN: none), pairs, tag bytes, timed
_RESULT = struct.Struct("<QII")  # ticket id, pairs, extra bytes
_ERROR = struct.Struct("<QB")  # ticket id, error code (engine/errors.py)
_STATS = struct.Struct("<IIIdddd")  # pairs, real tokens, padded tokens, cost, seconds, forward cpu, unused


def _connection(sock: socket.socket) -> Connection:
    """A Connection on a duplicate of the socket's descriptor: the socket itself is kept to
    `shutdown()`, which wakes a thread blocked reading the Connection."""
    return Connection(os.dup(sock.fileno()))


def _shutdown(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# --- the feeder's side ---------------------------------------------------------------------------------------


class Pending:
    """A request sent to the engine; `wait()` gives its logits in input order."""

    __slots__ = ("done", "logits", "error", "extra")

    @property
    def timings(self) -> Timings | None:
        """When its batches ran (a `timed` request's; None otherwise)."""
        values = self.extra.get("timings")
        return Timings(*values) if values else None

    def __init__(self) -> None:
        self.done = threading.Event()
        self.logits: np.ndarray | None = None
        self.error: BaseException | None = None
        self.extra: dict[str, Any] = {}

    def wait(self, timeout: float | None = None) -> np.ndarray:
        if not self.done.wait(timeout):
            raise Expired("not scored before the deadline")
        if self.error is not None:
            raise self.error
        return self.logits  # type: ignore[return-value]


class EngineClient:
    """A feeder's connection to an engine process: send requests, route answers to their waiters.

    `connect(timeout)` returns once the engine is ready (its model loaded and warm). With
    `reconnect`, a lost engine is waited for and joined again in the background; `on_state(up)`
    is told each time the engine goes away or comes back. Without it, `on_exit(reason)` is told
    once and the client stays down (a worker's own engine: the worker exits).
    """

    def __init__(self, path: str, *, hello: dict[str, Any] | None = None,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_state: Callable[[bool], None] | None = None,
                 on_exit: Callable[[str], None] | None = None, reconnect: bool = False) -> None:
        self.path = path
        self.hello = hello or {}
        self.on_batch = on_batch
        self.on_state = on_state
        self.on_exit = on_exit
        self.reconnect = reconnect
        self.info: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._ready = threading.Event()
        self._stopping = False
        self._sock: socket.socket | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None) -> bool:
        return self._ready.wait(timeout)

    def connect(self, timeout: float | None = None, *, log_every: float = 10.0) -> dict[str, Any]:
        """Connect (retrying while nothing listens yet) and wait for the engine's description."""
        deadline = None if timeout is None else time.monotonic() + timeout
        said = time.monotonic()
        while True:
            try:
                self._open()
                break
            except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, EOFError) as exc:
                if self._stopping or (deadline is not None and time.monotonic() > deadline):
                    raise EngineFailed(f"no engine answers on {self.path}: {exc}") from None
                if time.monotonic() - said > log_every:
                    log.info("waiting for the engine on %s", self.path)
                    said = time.monotonic()
                time.sleep(0.2)
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()
        return self.info

    def _open(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
            conn = _connection(sock)
            conn.send_bytes(b"H" + json.dumps(self.hello).encode())
            message = conn.recv_bytes()  # waits while the engine loads its model
        except BaseException:
            sock.close()
            raise
        if message[:1] == b"F":
            conn.close()
            sock.close()
            raise EngineFailed(message[1:].decode(errors="replace"))
        self.info = json.loads(message[1:])
        self._sock, self._conn = sock, conn
        self._ready.set()

    def submit(self, encoded: Encoded, *, priority: int, deadline: float | None = None,
               tag: str | None = None, timed: bool = False) -> Pending:
        pending = Pending()
        if not self._ready.is_set():
            raise EngineFailed("the engine is not connected (restarting?)")
        ticket = next(self._ids)
        tag_bytes = (tag or "").encode()
        header = b"S" + _SUBMIT.pack(ticket, priority, math.nan if deadline is None else deadline,
                                     encoded.pairs, len(tag_bytes), timed) + tag_bytes
        with self._lock:
            self._pending[ticket] = pending
        try:
            with self._send_lock:
                self._conn.send_bytes(header + encoded.lengths.astype(np.int32, copy=False).tobytes()
                                      + encoded.ids.astype(np.int32, copy=False).tobytes())
        except (OSError, EOFError, AttributeError) as exc:
            with self._lock:
                self._pending.pop(ticket, None)
            raise EngineFailed(f"the engine process is gone: {exc}") from None
        return pending

    def cancel(self, tag: str) -> None:
        try:
            with self._send_lock:
                self._conn.send_bytes(b"C" + tag.encode())
        except (OSError, EOFError, AttributeError):
            pass

    def stop(self) -> None:
        self._stopping = True
        self._ready.clear()
        _shutdown(self._sock)

    def _read(self) -> None:
        while True:
            self._serve_connection()
            self._ready.clear()
            with self._lock:
                waiting, self._pending = list(self._pending.values()), {}
            for pending in waiting:
                pending.error = EngineFailed("the engine process exited while scoring this request")
                pending.done.set()
            if self._stopping:
                return
            if not self.reconnect:
                log.critical("the engine process exited unexpectedly")
                if self.on_exit is not None:
                    self.on_exit("engine exited")
                return
            log.error("lost the engine on %s (%d requests in flight failed); reconnecting", self.path, len(waiting))
            if self.on_state is not None:
                self.on_state(False)
            while not self._stopping:
                try:
                    self._open()
                    break
                except (OSError, EOFError, EngineFailed):
                    time.sleep(0.2)
            if self._stopping:
                return
            log.info("engine on %s is back (pid %s)", self.path, self.info.get("pid"))
            if self.on_state is not None:
                self.on_state(True)

    def _serve_connection(self) -> None:
        conn, on_batch = self._conn, self.on_batch
        while True:
            try:
                message = conn.recv_bytes()
            except (EOFError, OSError):
                break
            kind = message[:1]
            if kind == b"R":
                ticket, pairs, extra = _RESULT.unpack_from(message, 1)
                at = 1 + _RESULT.size
                logits = np.frombuffer(message, dtype=np.float32, count=pairs, offset=at)
                with self._lock:
                    pending = self._pending.pop(ticket, None)
                if pending is not None:
                    if extra:
                        pending.extra = json.loads(message[at + 4 * pairs :])
                    pending.logits = logits
                    pending.done.set()
            elif kind == b"E":
                ticket, code = _ERROR.unpack_from(message, 1)
                with self._lock:
                    pending = self._pending.pop(ticket, None)
                if pending is not None:
                    pending.error = error_of(code, message[1 + _ERROR.size :].decode(errors="replace"))
                    pending.done.set()
            elif kind == b"B" and on_batch is not None:
                pairs, real, padded, cost, seconds, cpu, _ = _STATS.unpack_from(message, 1)
                on_batch(BatchStats(pairs, real, padded, cost, seconds, cpu))
        conn.close()
        _shutdown(self._sock)


# --- the engine's side ---------------------------------------------------------------------------------------


def listen(path: str) -> socket.socket:
    """The engine's listening socket, owner-only (a stale one from a dead engine is replaced).
    Feeders may connect at once: they wait in the backlog while the model loads."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(64)
    return sock


def refuse(listener: socket.socket, reason: str, wait: float = 1.0) -> None:
    """Tell whoever connected while the model loaded that it could not load."""
    listener.settimeout(wait)
    while True:
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        try:
            conn = _connection(sock)
            conn.recv_bytes()  # the hello
            conn.send_bytes(b"F" + reason.encode())
            conn.close()
        except (OSError, EOFError):
            pass
        sock.close()


class _Feeder:
    """One connected feeder: its requests in the batcher, and a lock on its socket's writes."""

    def __init__(self, sock: socket.socket, number: int) -> None:
        self.sock = sock
        self.conn = _connection(sock)
        self.number = number
        self.about: dict[str, Any] = {}
        self.tickets: dict[int, Ticket] = {}
        self.lock = threading.Lock()
        self.gone = False

    def send(self, data: bytes) -> None:
        with self.lock:
            if self.gone:
                return
            try:
                self.conn.send_bytes(data)
            except (OSError, EOFError):
                self.gone = True  # the reader sees the end too


class EngineServer:
    """Serves one batcher to every feeder that connects to `listener`.

    With `single`, it serves the first feeder only and returns when it leaves (a worker's own
    engine process); otherwise it serves until `stop()`.
    """

    def __init__(self, listener: socket.socket, batcher: Batcher, info: dict[str, Any], *,
                 single: bool = False) -> None:
        self.listener = listener
        self.batcher = batcher
        self.info = info
        self.single = single
        self._feeders: list[_Feeder] = []
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._stopping = False

    def on_batch(self, stats: BatchStats) -> None:
        """Batch statistics to the longest-connected feeder only (each batch counted once)."""
        with self._lock:
            first = self._feeders[0] if self._feeders else None
        if first is not None:
            first.send(b"B" + _STATS.pack(stats.pairs, stats.real_tokens, stats.padded_tokens, stats.cost,
                                          stats.seconds, stats.forward_cpu, 0.0))

    def feeders(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(f.about, connection=f.number) for f in self._feeders]

    def serve(self) -> None:
        self.listener.settimeout(None)
        while not self._stopping:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                break
            feeder = _Feeder(sock, next(self._numbers))
            thread = threading.Thread(target=self._serve_feeder, args=(feeder,), name=f"feeder-{feeder.number}",
                                      daemon=True)
            if self.single:
                self._serve_feeder(feeder)
                break
            thread.start()

    def stop(self) -> None:
        self._stopping = True
        _shutdown(self.listener)
        with self._lock:
            feeders = list(self._feeders)
        for feeder in feeders:
            _shutdown(feeder.sock)

    def _serve_feeder(self, feeder: _Feeder) -> None:
        conn, batcher = feeder.conn, self.batcher
        try:
            hello = conn.recv_bytes()
            feeder.about = json.loads(hello[1:]) if hello[:1] == b"H" and len(hello) > 1 else {}
            with self._lock:
                self._feeders.append(feeder)
                count = len(self._feeders)
            feeder.send(b"I" + json.dumps(dict(self.info, feeders=count)).encode())
            log.info("feeder %d connected (%s); %d feeding this engine", feeder.number,
                     feeder.about.get("id", "?"), count)
            while True:
                message = conn.recv_bytes()
                kind = message[:1]
                if kind == b"S":
                    ticket_id, priority, deadline, pairs, tag_len, timed = _SUBMIT.unpack_from(message, 1)
                    at = 1 + _SUBMIT.size
                    tag = message[at : at + tag_len].decode() or None
                    at += tag_len
                    lengths = np.frombuffer(message, dtype=np.int32, count=pairs, offset=at)
                    ids = np.frombuffer(message, dtype=np.int32, offset=at + 4 * pairs)
                    with feeder.lock:
                        feeder.tickets[ticket_id] = None  # type: ignore[assignment]  (placed below)
                    ticket = batcher.submit(lengths, ids, priority=priority,
                                            deadline=None if math.isnan(deadline) else deadline, tag=tag,
                                            on_done=self._answer(feeder, ticket_id), timed=bool(timed))
                    with feeder.lock:
                        if ticket_id in feeder.tickets:
                            feeder.tickets[ticket_id] = ticket
                elif kind == b"C":
                    batcher.cancel(message[1:].decode())
        except (EOFError, OSError, ValueError):
            pass
        finally:
            with feeder.lock:
                feeder.gone = True
                left = [t for t in feeder.tickets.values() if t is not None]
                feeder.tickets.clear()
            for ticket in left:  # nobody waits for them: their pairs are skipped
                ticket.fail(EngineFailed("the feeder left"))
            with self._lock:
                if feeder in self._feeders:
                    self._feeders.remove(feeder)
                count = len(self._feeders)
            conn.close()
            feeder.sock.close()
            if not self._stopping:
                log.info("feeder %d left (%d requests dropped); %d feeding this engine", feeder.number,
                         len(left), count)

    @staticmethod
    def _answer(feeder: _Feeder, ticket_id: int) -> Callable[[Ticket], None]:
        def done(ticket: Ticket) -> None:
            with feeder.lock:
                feeder.tickets.pop(ticket_id, None)
            error = ticket.error
            if error is None:
                extra = b"" if ticket.timings is None else json.dumps(
                    {"timings": dataclasses.astuple(ticket.timings)}).encode()
                feeder.send(b"R" + _RESULT.pack(ticket_id, len(ticket.results), len(extra)) + ticket.results.tobytes()
                            + extra)
            else:
                feeder.send(b"E" + _ERROR.pack(ticket_id, code_of(error)) + f"{type(error).__name__}: {error}".encode())

        return done
