"""The engine process: a device's batcher and backend in a process of their own.

On a GPU the model's thread spends its time launching kernels with the GIL held; any other
Python work in the same process (Celery's threads, JSON, tokenizing the next requests, writing
results) waits for that GIL or makes the model wait for it (docs/gpu.md#the-whole-service-on-the-h100:
the service delivered 40-60 % of what its model did alone when they shared one). So the engine process runs only the model thread and
one thread per connected feeder, reading requests off a Unix socket (engine/transport.py).

Two ways to run it:
- shared (`python -m engine --model NAME --socket PATH`, engine/__main__.py, started by the
  launcher once per model and device): it serves every feeder that connects, until SIGTERM. If it dies, the launcher
  starts it again and the feeders reconnect.
- a worker's own (`EngineProcess`, when no ENGINE_SOCKET is given): started by the worker on a
  private socket, it serves that worker alone, ignores SIGTERM/SIGINT (the worker's graceful
  shutdown still needs it) and ends when its worker's connection closes or the worker dies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
import uuid
from collections.abc import Callable
from typing import Any

from engine.batcher import BatchStats
from engine.errors import EngineFailed
from engine.transport import EngineClient, EngineServer, listen, refuse
from shared.lifecycle import EXIT_MODEL_FAILED, die_with_parent

log = logging.getLogger(__name__)


class EngineProcess(EngineClient):
    """A worker's own engine process on a private socket, and the worker's connection to it."""

    def __init__(self, config, *, on_batch: Callable[[BatchStats], None] | None = None,
                 on_exit: Callable[[str], None] | None = None, hello: dict[str, Any] | None = None) -> None:
        self._dir = tempfile.mkdtemp(prefix="rerank-engine-")
        super().__init__(os.path.join(self._dir, "engine.sock"), hello=hello, on_batch=on_batch, on_exit=on_exit)
        self.config = config
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> dict[str, Any]:
        """Start the child and wait until its model is loaded and warm; its description."""
        # A fresh interpreter running only engine code (not the worker's __main__, as
        # multiprocessing's spawn would import): no Celery, no inherited threads or CUDA state.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "--socket", self.path, "--single",
             "--config", json.dumps(dataclasses.asdict(self.config))],
            preexec_fn=lambda: die_with_parent(signal.SIGKILL, ignore_stop_signals=True),
        )
        try:
            while True:
                try:
                    return self.connect(timeout=1.0)
                except EngineFailed as exc:
                    if "no engine answers" not in str(exc):
                        raise
                    if self._proc.poll() is not None:
                        raise EngineFailed(f"the engine process exited ({self._proc.returncode}) "
                                           "before it was ready") from None
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        super().stop()
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        shutil.rmtree(self._dir, ignore_errors=True)


def serve(config, path: str, *, single: bool = False) -> int:
    """Load, warm up, then serve feeders on `path`; the process's exit status."""
    from engine.runtime import build_runtime, configure_engine_process, settle

    configure_engine_process(config)
    listener = listen(path)  # feeders may connect now; they wait while the model loads
    holder: dict[str, EngineServer] = {}
    try:
        _, config = settle(config)  # the family and context length the model's folder implies
        batcher, info = build_runtime(config, on_batch=lambda s: holder["server"].on_batch(s) if holder else None)
    except BaseException as exc:  # noqa: BLE001 - report any failure to load, then exit
        logging.getLogger("engine").error("could not start the engine: %s", exc)
        refuse(listener, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
        listener.close()
        _unlink(path)
        return EXIT_MODEL_FAILED
    info.update(pid=os.getpid(), engine_id=f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                socket=path, shared=not single)
    server = holder["server"] = EngineServer(listener, batcher, info, single=single)
    if not single:
        def _stop(signum: int, _frame: object) -> None:
            log.info("engine stopping (signal %d)", signum)
            threading.Thread(target=server.stop, daemon=True).start()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        log.info("engine %s serving feeders on %s", info["engine_id"], path)
    server.serve()
    server.stop()
    batcher.stop()
    _unlink(path)
    return 0


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
