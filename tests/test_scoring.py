"""The scoring path without any server: encoding, batching, backends, the engine process."""

from __future__ import annotations

import math
import random
import threading
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import BULK, REALTIME, Encoded, Engine, EngineConfig
from engine.backends import OutOfMemory, PaddedBatch, forward, load_backend
from engine.backends.buckets import Buckets, pad_to
from engine.batcher import Batcher, Cancelled, Expired, padded_cost, pick_around, plan_batches
from rerank.random_model import documents_of_length, sentence


@pytest.fixture(scope="module")
def pairs(tokenizer):
    rng = random.Random(7)
    docs = documents_of_length(tokenizer, [rng.randint(1, 300) for _ in range(40)], seed=3)
    queries = [sentence(rng, 4) for _ in range(3)]
    return [(queries[i % 3], d) for i, d in enumerate(docs)] + [("short query", "")]


def backend_of(engine: Engine):
    return engine.scorer.batcher.backend


def run(batcher: Batcher, encoded: Encoded, **kwargs) -> np.ndarray:
    return batcher.submit(encoded.lengths, encoded.ids, **kwargs).wait(30)


def test_scores_match_sentence_transformers_cross_encoder(model_dir, engine, pairs):
    from sentence_transformers import CrossEncoder

    expected = CrossEncoder(str(model_dir), device="cpu").predict(pairs)
    got = engine.score_pairs(pairs)
    assert len(got) == len(pairs)
    assert max(abs(a - float(b)) for a, b in zip(got, expected)) < 1e-5
    assert all(0.0 < s < 1.0 for s in got)


def test_raw_scores_are_logits_whose_sigmoid_is_the_score(engine, pairs):
    logits = engine.score_pairs(pairs, normalize=False)
    scores = engine.score_pairs(pairs)
    assert len(set(logits)) > 1
    assert all(abs(1 / (1 + math.exp(-x)) - s) < 1e-7 for x, s in zip(logits, scores))


def test_scores_do_not_depend_on_batch_composition(engine, pairs):
    encoded, _ = engine.encoder.encode_pairs(pairs)
    backend = backend_of(engine)
    sequences = encoded.sequences()
    alone = [float(forward(backend, PaddedBatch.of([s], backend.pad_id))[0]) for s in sequences]
    for budget in (64, 700, 5000, 10**9):
        batcher = Batcher(backend, max_batch_tokens=budget).start()
        try:
            mixed = run(batcher, encoded)
        finally:
            batcher.stop()
        assert np.max(np.abs(np.asarray(alone) - mixed)) < 1e-5, budget


def test_padding_up_to_a_graph_bucket_changes_no_score(engine, pairs):
    """CUDA graphs replay fixed shapes; a batch padded to its bucket (masked columns, one-token rows)
    must score exactly as it does unpadded. Checked with the real model on the CPU."""
    encoded, _ = engine.encoder.encode_pairs(pairs[:5])
    seqs = encoded.sequences()
    width = max(map(len, seqs))
    batch = PaddedBatch.of(seqs, backend_of(engine).pad_id)
    buckets = Buckets(max_tokens=8192, max_width=512)
    rows, bucket_width = buckets.fit(batch.rows, batch.width)
    assert rows == 8 and bucket_width >= width and bucket_width % 16 == 0
    backend = backend_of(engine)
    plain = forward(backend, batch)
    padded = forward(backend, pad_to(batch, rows, bucket_width, backend.pad_id))
    assert np.all(np.isfinite(padded)) and np.max(np.abs(padded[: batch.rows] - plain)) < 1e-5


def test_buckets_cover_small_shapes_and_leave_big_ones_eager():
    buckets = Buckets(max_tokens=8192, max_width=512)
    assert buckets.fit(1, 1) == (1, 16) and buckets.fit(3, 33) == (4, 64) and buckets.fit(16, 512) == (16, 512)
    assert buckets.fit(17, 512) is None and buckets.fit(1, 513) is None
    shapes = buckets.shapes()
    assert all(r * w <= 8192 for r, w in shapes) and len(shapes) == len(set(shapes))
    assert shapes[0][0] * shapes[0][1] == max(r * w for r, w in shapes)  # largest captured first


def test_cpu_workers_use_the_eager_backend(model_dir):
    backend = load_backend(EngineConfig(source=str(model_dir), device="cpu", cuda_graphs=True, cpu_backend="torch"))
    assert backend.describe()["backend"] == "torch eager"


def test_cuda_graph_backend_falls_back_to_eager_when_capture_fails(engine, pairs, caplog):
    """Where graphs cannot be captured (here: no CUDA at all), the backend warns and runs eagerly."""
    from engine.backends.cuda_graphs import CudaGraphBackend

    graphs = CudaGraphBackend(backend_of(engine), max_tokens=4096)
    graphs.warm_up(4096)
    assert not graphs.graphs and "CUDA graph capture failed" in caplog.text
    assert graphs.describe()["cuda_graphs"] == 0 and graphs.describe()["cuda_graphs_error"]
    encoded, _ = engine.encoder.encode_pairs(pairs[:4])
    batcher = Batcher(graphs, max_batch_tokens=4096).start()
    try:
        assert np.max(np.abs(run(batcher, encoded) - engine.run(encoded))) < 1e-6
    finally:
        batcher.stop()


def test_truncation_follows_flagembedding(engine, tokenizer):
    long_query = documents_of_length(tokenizer, [400])[0]
    long_doc = documents_of_length(tokenizer, [900], seed=1)[0]
    enc = engine.encoder
    (seq,) = enc.encode(long_query, [long_doc], max_length=128).sequences()
    q_ids = tokenizer(long_query, add_special_tokens=False)["input_ids"][: 128 * 3 // 4]
    d_ids = tokenizer(long_doc, add_special_tokens=False)["input_ids"]
    assert len(seq) == 128
    # <s> q </s></s> p </s>: the query keeps its first 3/4 of max_length, the passage the rest.
    assert seq[: 1 + len(q_ids)] == enc.prefix + q_ids
    assert seq[1 + len(q_ids) : 3 + len(q_ids)] == enc.middle
    assert seq[3 + len(q_ids) : -1] == d_ids[: 128 - len(q_ids) - 4]
    assert seq[-1:] == enc.suffix
    (short,) = enc.encode("hi", [""]).sequences()
    assert short == enc.prefix + tokenizer("hi", add_special_tokens=False)["input_ids"] + enc.middle + enc.suffix


def test_max_length_is_capped_by_the_model(engine, tokenizer):
    doc = documents_of_length(tokenizer, [2000])[0]
    (seq,) = engine.encoder.encode("q", [doc], max_length=100_000).sequences()
    assert len(seq) == engine.encoder.limit == 512


def test_long_pairs_cost_quadratically():
    assert padded_cost(4, 512) == 2048 and padded_cost(1, 8192) == 8192 * 16
    assert plan_batches([8192] * 3 + [2048] * 8, 65536) == [[0], [1], [2], [3, 4, 5, 6, 7, 8, 9, 10]]


@pytest.mark.parametrize("budget", [1, 50, 100, 1000, 100_000])
def test_plan_batches_respects_the_padded_budget(budget):
    rng = random.Random(budget)
    lengths = [rng.randint(1, 2000) for _ in range(200)]
    batches = plan_batches(lengths, budget)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for batch in batches:
        assert padded_cost(len(batch), max(lengths[i] for i in batch)) <= budget or len(batch) == 1


@given(st.lists(st.integers(1, 600), min_size=1, max_size=200), st.data(), st.integers(1, 5000))
def test_pick_around_holds_the_anchor_and_its_nearest_lengths(lengths, data, budget):
    anchor = data.draw(st.integers(0, len(lengths) - 1))
    picked = pick_around(lengths, anchor, budget)
    assert anchor in picked and len(set(picked)) == len(picked)
    assert padded_cost(len(picked), max(lengths[i] for i in picked)) <= budget or picked == [anchor]
    # A contiguous run of the sorted lengths: nothing left out lies strictly inside its range.
    low, high = min(lengths[i] for i in picked), max(lengths[i] for i in picked)
    assert not [i for i in range(len(lengths)) if i not in picked and low < lengths[i] < high]


# --- the batcher with a stand-in backend ----------------------------------------------------------


class FakeBackend:
    """Logit = sum of the row's ids; `calls` records each batch's row lengths."""

    pad_id = 0

    def __init__(self, fail=lambda rows: None) -> None:
        self.calls: list[list[int]] = []
        self.fail = fail
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def hold(self) -> None:
        """Make the next forward pass block until `gate` is set, so requests queue behind it."""
        self.entered.clear()
        self.gate.clear()

    def prepare(self, batch: PaddedBatch):
        return [batch.ids[r, :n].tolist() for r, n in enumerate(batch.lengths)]

    def launch(self, rows):
        self.entered.set()
        self.gate.wait(5)
        self.fail(rows)
        self.calls.append([len(r) for r in rows])
        return np.asarray([float(sum(r)) for r in rows], dtype=np.float32)

    def finish(self, handle):
        return handle


def submit(batcher, seqs, **kwargs):
    enc = Encoded.from_sequences(seqs)
    return batcher.submit(enc.lengths, enc.ids, **kwargs)


def test_batcher_merges_requests_and_returns_each_in_its_own_order():
    backend = FakeBackend()
    batcher = Batcher(backend, max_batch_tokens=10_000).start()
    try:
        backend.hold()
        first = submit(batcher, [[1]])
        assert backend.entered.wait(5)
        tickets = [submit(batcher, [[r, i] * (i + 1) for i in range(5)]) for r in range(10)]
        backend.gate.set()
        assert first.wait(5).tolist() == [1.0]
        for r, ticket in enumerate(tickets):
            assert ticket.wait(5).tolist() == [float((r + i) * (i + 1)) for i in range(5)]
        assert len(backend.calls) == 2 and len(backend.calls[1]) == 50  # the 10 waiting requests ran as one batch
    finally:
        batcher.stop()


def test_batcher_serves_realtime_before_bulk_and_splits_large_requests():
    backend = FakeBackend()
    batcher = Batcher(backend, max_batch_tokens=40).start()
    try:
        backend.hold()
        blocker = submit(batcher, [[0] * 5])
        assert backend.entered.wait(5)
        bulk = submit(batcher, [[7] * 10 for _ in range(8)], priority=BULK)
        realtime = submit(batcher, [[1] * 20 for _ in range(2)], priority=REALTIME)
        backend.gate.set()
        assert realtime.wait(5).tolist() == [20.0, 20.0]
        assert bulk.wait(5).tolist() == [70.0] * 8
        blocker.wait(5)
        assert backend.calls[1] == [20, 20]  # realtime first, although bulk was queued earlier
        assert all(len(c) * max(c) <= 40 for c in backend.calls[2:])
        assert sum(len(c) for c in backend.calls[2:]) == 8
    finally:
        batcher.stop()


class AsyncBackend(FakeBackend):
    """Like the GPU: `launch` returns at once and `finish` waits for the device. The first pass
    can be held at its launch (`at_launch`) and at its finish (`at_finish`)."""

    def __init__(self) -> None:
        super().__init__()
        self.launched, self.at_launch = threading.Event(), threading.Event()
        self.finishing, self.at_finish = threading.Event(), threading.Event()

    def launch(self, rows):
        if not self.launched.is_set():
            self.launched.set()
            self.at_launch.wait(5)
        self.calls.append([len(r) for r in rows])
        return np.asarray([float(sum(r)) for r in rows], dtype=np.float32)

    def finish(self, handle):
        if not self.finishing.is_set():
            self.finishing.set()
            self.at_finish.wait(5)
        return handle


def test_batcher_chooses_again_when_requests_came_while_the_device_worked():
    backend = AsyncBackend()
    batcher = Batcher(backend, max_batch_tokens=10_000).start()
    try:
        first = submit(batcher, [[1]])
        assert backend.launched.wait(5)
        early = submit(batcher, [[2, 2]])  # waiting when the next batch is chosen, as the pass starts
        backend.at_launch.set()
        assert backend.finishing.wait(5)  # the next batch is chosen and collated; the device still works
        late = [submit(batcher, [[3, 3, 3]]), submit(batcher, [[4, 4, 4, 4]])]
        backend.at_finish.set()
        assert first.wait(5).tolist() == [1.0] and early.wait(5).tolist() == [4.0]
        assert [t.wait(5).tolist() for t in late] == [[9.0], [16.0]]
        # One second pass for all three, not the one chosen early and then the two that came later.
        assert [sorted(c) for c in backend.calls] == [[1], [2, 3, 4]]
    finally:
        batcher.stop()


def test_a_realtime_call_that_comes_while_a_bulk_pass_runs_goes_next():
    backend = AsyncBackend()
    batcher = Batcher(backend, max_batch_tokens=40).start()
    try:
        first = submit(batcher, [[1]])
        assert backend.launched.wait(5)
        bulk = submit(batcher, [[7] * 10 for _ in range(8)], priority=BULK)  # two full passes of 4 x 10
        backend.at_launch.set()
        assert backend.finishing.wait(5)  # a full bulk batch is chosen; then a call comes
        realtime = submit(batcher, [[5, 5]], priority=REALTIME)
        backend.at_finish.set()
        assert realtime.wait(5).tolist() == [10.0] and bulk.wait(5).tolist() == [70.0] * 8 and first.wait(5)
        assert [len(c) for c in backend.calls] == [1, 1, 4, 4]  # the call went before the chosen bulk batch
        assert backend.calls[1] == [2]
    finally:
        batcher.stop()


def test_batcher_drops_expired_work_and_survives_a_failing_batch():
    def fail(rows):
        if any(r[0] == 13 for r in rows):
            raise RuntimeError("boom")

    backend = FakeBackend(fail)
    batcher = Batcher(backend, max_batch_tokens=100).start()
    try:
        expired = submit(batcher, [[5]], deadline=time.time() - 1)
        with pytest.raises(Expired):
            expired.wait(5)
        bad = submit(batcher, [[13]])
        with pytest.raises(RuntimeError, match="boom"):
            bad.wait(5)
        assert submit(batcher, [[2, 2]]).wait(5).tolist() == [4.0]
        assert [1] not in backend.calls  # the expired pair never reached the model
    finally:
        batcher.stop()


def test_batcher_splits_a_batch_that_runs_out_of_memory():
    def fail(rows):
        if len(rows) > 2:
            raise OutOfMemory("too big")

    backend = FakeBackend(fail)
    batcher = Batcher(backend, max_batch_tokens=10_000).start()
    try:
        ticket = submit(batcher, [[i] * (i + 1) for i in range(9)])
        assert ticket.wait(5).tolist() == [float(i * (i + 1)) for i in range(9)]
        assert all(len(c) <= 2 for c in backend.calls) and sum(len(c) for c in backend.calls) == 9
    finally:
        batcher.stop()


def test_cancel_drops_the_pairs_of_a_tag_not_yet_scored():
    backend = FakeBackend()
    batcher = Batcher(backend, max_batch_tokens=20).start()  # two pairs of 10 per batch
    try:
        backend.hold()
        blocker = submit(batcher, [[0] * 3])
        assert backend.entered.wait(5)
        job = submit(batcher, [[9] * 10 for _ in range(40)], priority=BULK, tag="job_x")
        other = submit(batcher, [[8] * 10 for _ in range(2)], priority=BULK, tag="job_y")
        assert batcher.cancel("job_x") == 1
        backend.gate.set()
        with pytest.raises(Cancelled):
            job.wait(5)
        assert other.wait(5).tolist() == [80.0, 80.0]
        blocker.wait(5)
        assert sum(len(c) for c in backend.calls) == 1 + 2  # none of the 40 cancelled pairs ran
    finally:
        batcher.stop()


# --- the engine process ----------------------------------------------------------------------------------


def test_engine_process_scores_like_the_in_process_engine_and_reports_its_death(model_dir, engine, pairs):
    died = threading.Event()
    remote = Engine.start(EngineConfig(source=str(model_dir), device="cpu", dtype="float32", torch_threads=1),
                          process=True, on_exit=lambda reason: died.set())
    try:
        assert remote.info["engine_process"] and remote.info["pid"] != engine.info.get("pid")
        assert remote.info["capacity"] > 0 and remote.info["device"] == "cpu"
        docs = [d for _, d in pairs[:12]]
        here = engine.score("a query", docs)
        there = remote.score("a query", docs)
        assert np.max(np.abs(here.logits - there.logits)) < 1e-6 and here.input_tokens == there.input_tokens
        import os
        import signal

        os.kill(remote.info["pid"], signal.SIGKILL)
        assert died.wait(10)
        from engine.process import EngineFailed

        with pytest.raises(EngineFailed):
            remote.score("a query", docs[:1])
    finally:
        remote.stop()


def test_engine_process_that_cannot_load_its_model_says_why(tmp_path):
    from engine.process import EngineFailed, EngineProcess

    with pytest.raises(EngineFailed, match="missing"):
        EngineProcess(EngineConfig(source=str(tmp_path / "missing"), device="cpu")).start()


# --- the simulated GPU -------------------------------------------------------------------------------------


def test_sim_timings_follow_the_h100_table():
    from engine.backends.sim import GRAPH_LAUNCH_MS, Timing

    timing = Timing.load("base")
    import json

    from engine.backends.sim import TABLE

    measured = json.loads(TABLE.read_text())["archs"]["base"]
    for (rows, width), launch in (((m["rows"], m["width"]), m["launch_ms"]) for m in measured):
        got_launch, got_total = timing.eager(rows, width)
        assert got_launch == pytest.approx(launch / 1000) and got_total == pytest.approx(
            max(timing.total[(rows, width)], launch) / 1000)
    assert timing.graph(1, 64)[0] == GRAPH_LAUNCH_MS / 1000
    assert timing.graph(1, 64)[1] < timing.eager(1, 64)[1] / 5  # replay is launch-free: docs/gpu.md's 10x
    assert timing.graph(64, 256)[1] == pytest.approx(0.0084, rel=0.15)  # docs/gpu.md, CUDA graphs: 8.42 ms
    assert timing.eager(4096, 512)[1] > timing.eager(1024, 512)[1] * 3  # beyond the table: by cost
    # Between measured rows the time follows a power law, so the time a token never bows above
    # both neighbours' (interpolating the time itself did: 128 rows cost 25 % more a token than 64
    # or 256, a shape no device has and a batcher would chase).
    for width in (256, 400, 512):
        per_token = {rows: timing.eager(rows, width)[1] / (rows * width) for rows in (64, 96, 128, 192, 256)}
        assert all(per_token[r] <= max(per_token[64], per_token[256]) * 1.001 for r in (96, 128, 192)), per_token
    with pytest.raises(ValueError, match="SIM_PROFILE"):
        Timing.load("huge")


def test_sim_engine_uses_the_real_tokenizer_and_says_it_is_simulated(model_dir, engine):
    sim = Engine.start(EngineConfig(source=str(model_dir), device="sim", sim_profile="base"))
    try:
        assert sim.info["simulated"] and "placeholder" in sim.info["backend"] and sim.info["capacity"] > 0
        docs = ["a b c", "熊猫 panda", "a b c"]
        scores = sim.score("q", docs)
        assert scores.logits[0] == scores.logits[2] and scores.input_tokens == engine.score("q", docs).input_tokens
        assert sim.score("q", docs[:1]).logits[0] == scores.logits[0]  # placeholders ignore the batch
    finally:
        sim.stop()
    with pytest.raises(ValueError, match="SIM_PROFILE"):
        Engine.start(EngineConfig(source=str(model_dir), device="sim"))  # tiny matches no H100 table
