"""The scoring path without any server: loading, FlagEmbedding truncation, batching, parity."""

from __future__ import annotations

import random
import threading

import pytest

from rerank.random_model import documents_of_length, sentence
from hypothesis import given
from hypothesis import strategies as st

from worker.batching import BULK, REALTIME, Batcher, Expired, padded_cost, pick_around, plan_batches
from worker.scoring import ScoringSettings, encode_pairs, score_encoded, score_pairs


@pytest.fixture(scope="module")
def pairs(reranker):
    rng = random.Random(7)
    docs = documents_of_length(reranker.tokenizer, [rng.randint(1, 300) for _ in range(40)], seed=3)
    queries = [sentence(rng, 4) for _ in range(3)]
    return [(queries[i % 3], d) for i, d in enumerate(docs)] + [("short query", "")]


def test_scores_match_sentence_transformers_cross_encoder(model_dir, reranker, pairs):
    from sentence_transformers import CrossEncoder

    expected = CrossEncoder(str(model_dir), device="cpu").predict(pairs)
    got = score_pairs(reranker, pairs)
    assert len(got) == len(pairs)
    assert max(abs(a - float(b)) for a, b in zip(got, expected)) < 1e-5
    assert all(0.0 < s < 1.0 for s in got)


def test_raw_scores_are_logits_whose_sigmoid_is_the_score(reranker, pairs):
    import math

    logits = score_pairs(reranker, pairs, ScoringSettings(normalize=False))
    scores = score_pairs(reranker, pairs)
    assert any(x < 0 or x > 1 for x in logits) or len(set(logits)) > 1
    assert all(abs(1 / (1 + math.exp(-x)) - s) < 1e-7 for x, s in zip(logits, scores))


def test_scores_do_not_depend_on_batch_composition(reranker, pairs):
    encoded = encode_pairs(reranker, pairs)
    alone = [score_encoded(reranker, [seq], 10**9)[0] for seq in encoded]
    for budget in (64, 700, 5000, 10**9):
        mixed = score_encoded(reranker, encoded, budget)
        assert max(abs(a - b) for a, b in zip(alone, mixed)) < 1e-5, budget


def test_truncation_follows_flagembedding(reranker):
    tok = reranker.tokenizer
    long_query = documents_of_length(tok, [400])[0]
    long_doc = documents_of_length(tok, [900], seed=1)[0]
    (seq,) = reranker.encode(long_query, [long_doc], max_length=128)
    q_ids = tok(long_query, add_special_tokens=False)["input_ids"][: 128 * 3 // 4]
    d_ids = tok(long_doc, add_special_tokens=False)["input_ids"]
    assert len(seq) == 128
    # <s> q </s></s> p </s>: the query keeps its first 3/4 of max_length, the passage the rest.
    assert seq[: 1 + len(q_ids)] == reranker.prefix + q_ids
    assert seq[1 + len(q_ids) : 3 + len(q_ids)] == reranker.middle
    assert seq[3 + len(q_ids) : -1] == d_ids[: 128 - len(q_ids) - 4]
    assert seq[-1:] == reranker.suffix
    (short,) = reranker.encode("hi", [""])
    assert short == reranker.prefix + tok("hi", add_special_tokens=False)["input_ids"] + reranker.middle + reranker.suffix


def test_max_length_is_capped_by_the_model(reranker):
    doc = documents_of_length(reranker.tokenizer, [2000])[0]
    (seq,) = reranker.encode("q", [doc], max_length=100_000)
    assert len(seq) == reranker.limit == 512


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


def _held_forward(calls):
    """A forward pass that blocks until released, so requests can queue up behind it."""
    entered, gate = threading.Event(), threading.Event()

    def forward(batch):
        entered.set()
        gate.wait(5)
        return _fake_forward(calls)(batch)

    return forward, entered, gate


def _fake_forward(calls):
    def forward(batch):
        calls.append([len(s) for s in batch])
        return [float(sum(s)) for s in batch]

    return forward


def test_batcher_merges_requests_and_returns_each_in_its_own_order():
    calls = []
    forward, entered, gate = _held_forward(calls)
    batcher = Batcher(forward, max_batch_tokens=10_000).start()
    try:
        first = batcher.submit([[1]])
        assert entered.wait(5)
        tickets = [batcher.submit([[r, i] * (i + 1) for i in range(5)]) for r in range(10)]
        gate.set()
        assert first.wait(5) == [1.0]
        for r, ticket in enumerate(tickets):
            assert ticket.wait(5) == [float((r + i) * (i + 1)) for i in range(5)]
        assert len(calls) == 2 and len(calls[1]) == 50  # the 10 waiting requests ran as one batch
    finally:
        batcher.stop()


def test_batcher_serves_realtime_before_bulk_and_splits_large_requests():
    calls = []
    forward, entered, gate = _held_forward(calls)
    batcher = Batcher(forward, max_batch_tokens=40).start()
    try:
        blocker = batcher.submit([[0] * 5])
        assert entered.wait(5)
        bulk = batcher.submit([[7] * 10 for _ in range(8)], priority=BULK)
        realtime = batcher.submit([[1] * 20 for _ in range(2)], priority=REALTIME)
        gate.set()
        assert realtime.wait(5) == [20.0, 20.0]
        assert bulk.wait(5) == [70.0] * 8
        blocker.wait(5)
        assert calls[1] == [20, 20]  # realtime first, although bulk was queued earlier
        assert all(n * max(c) <= 40 for c in calls[2:] for n in [len(c)])
        assert sum(len(c) for c in calls[2:]) == 8
    finally:
        batcher.stop()


def test_batcher_drops_expired_work_and_survives_a_failing_batch():
    import time

    calls = []

    def forward(batch):
        if any(s[0] == 13 for s in batch):
            raise RuntimeError("boom")
        return _fake_forward(calls)(batch)

    batcher = Batcher(forward, max_batch_tokens=100).start()
    try:
        expired = batcher.submit([[5]], deadline=time.time() - 1)
        with pytest.raises(Expired):
            expired.wait(5)
        bad = batcher.submit([[13]])
        with pytest.raises(RuntimeError, match="boom"):
            bad.wait(5)
        assert batcher.submit([[2, 2]]).wait(5) == [4.0]
        assert [5] not in [c for c in calls]
    finally:
        batcher.stop()


def test_batcher_splits_a_batch_that_runs_out_of_memory():
    from worker.batching import OutOfMemory

    calls = []

    def run(batch):
        if len(batch) > 2:
            raise OutOfMemory("too big")
        return _fake_forward(calls)(batch)

    batcher = Batcher(run, max_batch_tokens=10_000).start()
    try:
        ticket = batcher.submit([[i] * (i + 1) for i in range(9)])
        assert ticket.wait(5) == [float(i * (i + 1)) for i in range(9)]
        assert all(len(c) <= 2 for c in calls) and sum(len(c) for c in calls) == 9
    finally:
        batcher.stop()
