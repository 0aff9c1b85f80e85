"""The batcher and its backend in a process of their own, spoken to over a pipe.

On a GPU the model's thread spends its time launching kernels with the GIL held; any other
Python work in the same process (Celery's threads, JSON, tokenizing the next requests, writing
results) waits for that GIL or makes the model wait for it (docs/gpu.md#the-whole-service-on-the-h100: the service
delivered 40-60 % of what its model does alone). So the worker keeps Celery and the tokenizer in
its own process and runs only this in the child: a thread reading requests off the pipe and the
model thread. Requests cross as packed arrays (a small header, int32 lengths and ids) and come
back as float32 logits: no pickling and no per-token Python work on either side.

Messages (first byte is the kind):
  parent -> child  S submit(ticket id, priority, deadline, tag, timed, lengths, ids)   C cancel(tag)
  child -> parent  I ready(info JSON)   F failed(reason)   R result(ticket id, logits)
                   E error(ticket id, kind, message)   B batch statistics
                   T timings(ticket id, when its batches ran: only if timed; just before its R)
The child exits when the pipe closes, so it never outlives its worker; the worker learns of the
child's death the same way (`on_exit`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import json
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from engine.backends import OutOfMemory
from engine.batcher import BatchStats, Cancelled, Expired, Ticket, Timings
from engine.encoding import Encoded

log = logging.getLogger(__name__)

_SUBMIT = struct.Struct("<QBdIHB")  # ticket id, priority, deadline (NaN: none), pairs, tag bytes, timed
_RESULT = struct.Struct("<Q")
_ERROR = struct.Struct("<QB")
_STATS = struct.Struct("<IIIdddd")  # pairs, real tokens, padded tokens, cost, seconds, forward cpu, unused
_TIMINGS = struct.Struct("<QddIIII")  # ticket id, then engine.batcher.Timings' fields in order



class EngineFailed(RuntimeError):
    """The engine process could not start (model not loadable, device missing) or died."""


class ScoringError(RuntimeError):
    """A batch failed in the engine process; the message says why."""


class OutOfMemoryError(ScoringError):
    """Even a single pair of the request did not fit in device memory."""


#: A failed request's error on the wire: (code, the engine's exception, what the worker raises).
_ERRORS = ((1, Expired, Expired), (2, Cancelled, Cancelled), (3, OutOfMemory, OutOfMemoryError))


def _code_of(error: BaseException) -> int:
    return next((code for code, kind, _ in _ERRORS if isinstance(error, kind)), 0)


def _error_of(code: int, text: str) -> Exception:
    return next((raised for c, _, raised in _ERRORS if c == code), ScoringError)(text)


class Pending:
    """A request sent to the engine process; `wait()` gives its logits in input order."""

    __slots__ = ("done", "logits", "error", "timings")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.logits: np.ndarray | None = None
        self.error: BaseException | None = None
        self.timings: Timings | None = None  # when its batches ran, if asked for (submit's `timed`)

    def wait(self, timeout: float | None = None) -> np.ndarray:
        if not self.done.wait(timeout):
            raise Expired("not scored before the deadline")
        if self.error is not None:
            raise self.error
        return self.logits  # type: ignore[return-value]


class EngineProcess:
    """The parent's side: start the child, send requests, route answers back to their waiters."""

    def __init__(self, config, *, on_batch: Callable[[BatchStats], None] | None = None,
                 on_exit: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.on_batch = on_batch
        self.on_exit = on_exit
        self.info: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._stopping = False
        self._conn: Connection | None = None
        self._socket: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> dict[str, Any]:
        """Start the child and wait until its model is loaded and warm; its description."""
        # A fresh interpreter running only engine code (not the worker's __main__, as
        # multiprocessing's spawn would import): no Celery, no inherited threads or CUDA state.
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "engine.process", str(theirs.fileno()),
             json.dumps(dataclasses.asdict(self.config))],
            pass_fds=[theirs.fileno()], preexec_fn=_die_with_parent,
        )
        theirs.close()
        self._socket = ours  # kept to shut down: that wakes the reader thread and tells the child
        self._conn = parent = Connection(os.dup(ours.fileno()))
        try:
            message = parent.recv_bytes()
        except EOFError:
            code = self._proc.wait(10)
            raise EngineFailed(f"the engine process exited ({code}) before it was ready") from None
        if message[:1] == b"F":
            self._proc.wait(10)
            raise EngineFailed(message[1:].decode(errors="replace"))
        self.info = json.loads(message[1:])
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()
        return self.info

    def submit(self, encoded: Encoded, *, priority: int, deadline: float | None = None,
               tag: str | None = None, timed: bool = False) -> Pending:
        pending = Pending()
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
        except (OSError, EOFError):
            pass

    def stop(self) -> None:
        self._stopping = True
        if self._conn is not None:
            try:
                self._socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._socket.close()
        if self._proc is not None:
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.terminate()
                self._proc.wait(5)

    def _read(self) -> None:
        conn = self._conn
        while True:
            try:
                message = conn.recv_bytes()
            except (EOFError, OSError):
                break
            kind = message[:1]
            if kind == b"R":
                (ticket,) = _RESULT.unpack_from(message, 1)
                self._settle(ticket, logits=np.frombuffer(message, dtype=np.float32, offset=1 + _RESULT.size))
            elif kind == b"E":
                ticket, code = _ERROR.unpack_from(message, 1)
                text = message[1 + _ERROR.size :].decode(errors="replace")
                error = _error_of(code, text)
                self._settle(ticket, error=error)
            elif kind == b"T":
                ticket, *values = _TIMINGS.unpack_from(message, 1)
                with self._lock:
                    pending = self._pending.get(ticket)
                if pending is not None:
                    pending.timings = Timings(*values)
            elif kind == b"B" and self.on_batch is not None:
                pairs, real, padded, cost, seconds, cpu, _ = _STATS.unpack_from(message, 1)
                self.on_batch(BatchStats(pairs, real, padded, cost, seconds, cpu))
        with self._lock:
            waiting, self._pending = list(self._pending.values()), {}
        for pending in waiting:
            pending.error = EngineFailed("the engine process exited")
            pending.done.set()
        if not self._stopping:
            code = self._proc.poll() if self._proc is not None else None
            log.critical("the engine process exited unexpectedly (exit code %s)", code)
            if self.on_exit is not None:
                self.on_exit(f"engine exited ({code})")

    def _settle(self, ticket: int, *, logits: np.ndarray | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            pending = self._pending.pop(ticket, None)
        if pending is not None:
            pending.logits, pending.error = logits, error
            pending.done.set()


# --- the child ------------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """The child ignores SIGTERM and SIGINT (sent to the whole process group on Ctrl-C or a stop):
    the worker's graceful shutdown still needs it to finish the tasks in flight. It ends when the
    pipe closes, and (Linux) is killed if the worker itself is killed."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def child_main(config, conn: Connection) -> None:
    """Entry point of the engine process: load, warm up, then serve the pipe until it closes."""
    from engine.engine import build_runtime, configure_child

    configure_child(config)
    send_lock = threading.Lock()

    def send(data: bytes) -> None:
        with send_lock:
            try:
                conn.send_bytes(data)
            except (OSError, EOFError):
                pass  # the worker is gone; the read loop below ends too

    try:
        batcher, info = build_runtime(config, on_batch=lambda s: send(
            b"B" + _STATS.pack(s.pairs, s.real_tokens, s.padded_tokens, s.cost, s.seconds, s.forward_cpu, 0.0)))
    except BaseException as exc:  # noqa: BLE001 - report any failure to load, then exit
        logging.getLogger("engine").error("could not start the engine: %s", exc)
        send(b"F" + f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}".encode())
        conn.close()
        return
    info["pid"] = os.getpid()
    send(b"I" + json.dumps(info).encode())

    def answer(ticket_id: int) -> Callable[[Ticket], None]:
        def done(ticket: Ticket) -> None:
            error = ticket.error
            if ticket.timings is not None:
                send(b"T" + _TIMINGS.pack(ticket_id, *dataclasses.astuple(ticket.timings)))
            if error is None:
                send(b"R" + _RESULT.pack(ticket_id) + ticket.results.tobytes())
            else:
                send(b"E" + _ERROR.pack(ticket_id, _code_of(error)) + f"{type(error).__name__}: {error}".encode())

        return done

    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            break
        kind = message[:1]
        if kind == b"S":
            ticket_id, priority, deadline, pairs, tag_len, timed = _SUBMIT.unpack_from(message, 1)
            at = 1 + _SUBMIT.size
            tag = message[at : at + tag_len].decode() or None
            at += tag_len
            lengths = np.frombuffer(message, dtype=np.int32, count=pairs, offset=at)
            ids = np.frombuffer(message, dtype=np.int32, offset=at + 4 * pairs)
            batcher.submit(lengths, ids, priority=priority, deadline=None if math.isnan(deadline) else deadline,
                           tag=tag, on_done=answer(ticket_id), timed=bool(timed))
        elif kind == b"C":
            batcher.cancel(message[1:].decode())
    batcher.stop()


if __name__ == "__main__":  # python -m engine.process FD CONFIG_JSON (started by EngineProcess)
    from engine.engine import EngineConfig

    child_main(EngineConfig(**json.loads(sys.argv[2])), Connection(int(sys.argv[1])))
