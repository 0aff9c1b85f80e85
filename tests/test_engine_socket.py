"""One engine process, several feeders on its Unix socket (engine/transport.py): the real engine
process, real sockets, the tiny model. What each side sees when the other dies."""

from __future__ import annotations

import dataclasses
import json
import random
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

from engine import EngineConfig
from engine.batcher import BULK, REALTIME
from engine.errors import EngineFailed
from engine.transport import EngineClient
from rerank.random_model import sentence
from tests.procs import Proc, base_env, wait_for


def start_engine(model_dir, socket_path: str, log_dir) -> Proc:
    config = EngineConfig(source=str(model_dir), device="cpu", dtype="float32", torch_threads=1)
    return Proc(f"engine-{os.path.basename(socket_path)}",
                [sys.executable, "-m", "engine", "--socket", socket_path,
                 "--config", json.dumps(dataclasses.asdict(config))], base_env(), log_dir)


@pytest.fixture
def socket_path(tmp_path_factory):
    import tempfile

    folder = tempfile.mkdtemp(prefix="eng-")  # short: a Unix socket path holds at most 107 bytes
    yield os.path.join(folder, "e.sock")
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def test_two_feeders_share_one_engine_and_survive_each_other_and_its_restart(model_dir, engine, log_dir,
                                                                             socket_path):
    proc = start_engine(model_dir, socket_path, log_dir)
    states: list[bool] = []
    feeders = [EngineClient(socket_path, hello={"id": f"f{i}", "pid": os.getpid()}, reconnect=True,
                            on_state=states.append) for i in range(2)]
    try:
        infos = [f.connect(60) for f in feeders]
        assert infos[0]["engine_id"] == infos[1]["engine_id"] and infos[0]["pid"] == proc.pid
        assert infos[1]["feeders"] == 2 and infos[0]["shared"] is True

        rng = random.Random(5)
        docs = [sentence(rng, rng.randint(1, 60)) for _ in range(10)]
        encoded = engine.encoder.encode("a query", docs)
        here = engine.run(encoded)
        # Both feed at once, realtime and bulk mixed: every answer is the in-process one.
        results: list[np.ndarray] = []
        errors: list[BaseException] = []

        def feed(client: EngineClient, priority: int) -> None:
            try:
                for _ in range(5):
                    results.append(client.submit(encoded, priority=priority).wait(30))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=feed, args=(f, p)) for f in feeders for p in (REALTIME, BULK)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and len(results) == 20
        assert max(float(np.max(np.abs(r - here))) for r in results) < 1e-6

        # A feeder that leaves takes only its own requests with it.
        big = engine.encoder.encode("a query", docs * 30)
        leaving = feeders[1].submit(big, priority=BULK)
        feeders[1].stop()
        with pytest.raises(EngineFailed):
            leaving.wait(10)
        assert np.allclose(feeders[0].submit(encoded, priority=REALTIME).wait(30), here, atol=1e-6)

        # The engine dies: what was in flight fails clearly, and once it is back the feeder
        # rejoins by itself.
        in_flight = feeders[0].submit(big, priority=BULK)
        proc.signal(signal.SIGKILL)
        with pytest.raises(EngineFailed):
            in_flight.wait(10)
        wait_for(lambda: states == [False], 10, "the feeder to see the engine gone")
        with pytest.raises(EngineFailed):
            feeders[0].submit(encoded, priority=REALTIME)  # at once, not after a timeout
        proc.stop()
        proc = start_engine(model_dir, socket_path, log_dir)
        wait_for(lambda: states == [False, True], 60, "the feeder to rejoin the restarted engine", proc)
        assert feeders[0].info["pid"] == proc.pid
        assert np.allclose(feeders[0].submit(encoded, priority=REALTIME).wait(30), here, atol=1e-6)
    finally:
        for f in feeders:
            f.stop()
        proc.stop()
    assert not os.path.exists(socket_path)  # the engine removed its socket on the way out


def test_a_feeder_waits_for_an_engine_that_is_still_loading(model_dir, log_dir, socket_path):
    client = EngineClient(socket_path)
    started = time.monotonic()
    proc = None
    try:
        thread = threading.Thread(target=lambda: client.connect(60))
        thread.start()
        time.sleep(1.0)  # nothing listens yet
        assert not client.connected
        proc = start_engine(model_dir, socket_path, log_dir)
        thread.join(60)
        assert client.connected and client.info["pid"] == proc.pid and time.monotonic() - started > 1
    finally:
        client.stop()
        if proc is not None:
            proc.stop()


def test_an_engine_that_cannot_load_tells_its_waiting_feeders(tmp_path, log_dir, socket_path):
    proc = start_engine(tmp_path / "missing", socket_path, log_dir)
    client = EngineClient(socket_path)
    try:
        with pytest.raises(EngineFailed, match="missing"):
            client.connect(60)
        assert proc.popen.wait(30) == 3  # EXIT_MODEL_FAILED: the launcher retries with back-off
    finally:
        client.stop()
        proc.stop()
