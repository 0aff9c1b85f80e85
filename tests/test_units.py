"""Pure functions: settings parsing, ranking, token checks, request models."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from api.auth import token_matches
from shared.ranking import rank, sigmoid
from shared.schemas import RerankRequest
from shared.settings import Settings, parse_models


def test_models_simple_form_maps_known_names_to_hub_ids():
    specs = parse_models("bge-reranker-base, local=/models/x ,bge-reranker-v2-m3", 512)
    assert [(s.name, s.source, s.max_length) for s in specs] == [
        ("bge-reranker-base", "BAAI/bge-reranker-base", 512),
        ("local", "/models/x", 512),
        ("bge-reranker-v2-m3", "BAAI/bge-reranker-v2-m3", 512),
    ]


def test_models_json_form_sets_max_length_up_to_the_model_limit():
    (spec,) = parse_models('[{"name": "bge-reranker-v2-m3", "max_length": 8192}]')
    assert spec.max_length == 8192
    with pytest.raises(ValueError, match="at most 512"):
        parse_models('[{"name": "bge-reranker-base", "max_length": 1024}]')
    # A global MAX_LENGTH above a model's limit is capped, not an error.
    assert parse_models("bge-reranker-base,bge-reranker-v2-m3", 2048)[0].max_length == 512
    assert parse_models("bge-reranker-base,bge-reranker-v2-m3", 2048)[1].max_length == 2048


@pytest.mark.parametrize("bad", ["", "unknown-without-source", "a=/x,a=/y", "bad name=/x"])
def test_models_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        parse_models(bad)


def test_settings_resolve_models_like_fastgpt_expects(monkeypatch):
    monkeypatch.setenv("MODELS", "bge-reranker-base")
    monkeypatch.setenv("ACCESS_TOKEN", " tok-aa , tok-bb ,")
    s = Settings()
    assert s.model("anything").name == s.model(None).name == "bge-reranker-base"
    assert s.tokens == ["tok-aa", "tok-bb"]
    assert "tok-aa" not in repr(s) and "tok-aa" not in str(s.redacted())
    assert s.redacted()["access_token"] == "<2 token(s)>"
    multi = Settings(models="bge-reranker-base,bge-reranker-large")
    assert multi.model("BAAI/bge-reranker-large").name == "bge-reranker-large"
    assert multi.model("nope") is None and multi.model(None).name == "bge-reranker-base"


def test_redacted_hides_redis_password():
    s = Settings(redis_url="redis://user:s3cret@redis:6379/0")
    assert "s3cret" not in str(s.redacted())


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, min_value=-50, max_value=50), max_size=40),
       st.one_of(st.none(), st.integers(min_value=1, max_value=50)), st.booleans())
def test_rank_sorts_high_to_low_ties_in_input_order(logits, top_n, raw):
    ranked = rank(logits, raw_scores=raw, top_n=top_n)
    assert len(ranked) == min(len(logits), top_n or len(logits))
    assert [(-s, i) for i, s in ranked] == sorted((-s, i) for i, s in ranked)
    full = rank(logits, raw_scores=raw)
    assert ranked == full[: len(ranked)]
    for i, s in ranked:
        assert s == (logits[i] if raw else sigmoid(logits[i]))


def test_sigmoid_is_stable_at_the_extremes():
    assert sigmoid(1000) == 1.0 and sigmoid(-1000) == 0.0
    assert math.isclose(sigmoid(0.3), 1 / (1 + math.exp(-0.3)))


@pytest.mark.parametrize(
    "header, ok",
    [("Bearer t1", True), ("bearer t2", True), ("BEARER t1", True), ("Bearer t3", False),
     ("Bearer  t1", False), ("Bearer t1 ", False), ("Token t1", False), ("t1", False), ("", False),
     (None, False), ("Bearer ", False), ("Bearer t", False), ("Bearer t1t1", False)],
)
def test_token_matches(header, ok):
    assert token_matches(header, ["t1", "t2"]) is ok


def test_request_model_accepts_fastgpt_cohere_and_jina_bodies():
    fastgpt = RerankRequest.model_validate_json('{"model": "m", "query": "q", "documents": ["a", "b"]}')
    assert fastgpt.texts() == ["a", "b"] and fastgpt.top_n is None and not fastgpt.return_documents
    cohere = RerankRequest.model_validate(
        {"query": "q", "documents": [{"text": "a"}, "b"], "top_n": 1, "return_documents": True, "extra": 1}
    )
    assert cohere.texts() == ["a", "b"] and cohere.top_n == 1
    assert RerankRequest.model_validate({"query": "q", "documents": ["a"], "top_n": 0}).keep() is None  # vLLM: all
    for bad in ({"query": "q", "documents": [None]}, {"query": "q", "documents": ["a"], "top_n": -1},
                {"query": "q", "documents": ["a"], "raw_scores": "true"}):
        with pytest.raises(ValidationError):
            RerankRequest.model_validate(bad)


def test_a_reply_of_an_older_worker_is_read_during_a_rolling_upgrade():
    from shared.schemas import ScoreReply

    old = ScoreReply.model_validate_json('{"logits": [1.5, -2.0], "input_tokens": 7, "chunks": [1, 3]}')
    assert old.scored is not None and old.scored.logits == [1.5, -2.0] and old.scored.windows() == [1, 3]
    refused = ScoreReply.model_validate_json('{"error": "pair too long", "status": 413}')
    assert refused.failure is not None and (refused.failure.kind, refused.failure.message) == (
        "input_too_long", "pair too long")
    new = ScoreReply.model_validate_json(ScoreReply.model_validate({"scored": {"logits": [0.5]}}).model_dump_json())
    assert new.scored is not None and new.scored.logits == [0.5] and new.failure is None


def test_a_job_stored_before_its_options_moved_keeps_them():
    from shared.jobs import Job
    from shared.schemas import ScoreOptions

    stored = {b"id": b"job_1", b"model": b"m", b"status": b"queued", b"owner": b"", b"items_total": b"1",
              b"pairs_total": b"1", b"pieces_total": b"1", b"raw_scores": b"1", b"return_documents": b"1",
              b"return_chunks": b"0", b"options": b'{"direction": "left", "chunk_overlap": 8}'}
    options = ScoreOptions.model_validate_json(Job.from_redis(stored).options)
    assert options == ScoreOptions(direction="left", chunk_overlap=8, raw_scores=True, return_documents=True)


def test_feeders_of_one_engine_count_its_capacity_once():
    from api.admission import capacity
    from shared.workers import per_engine

    feeders = [{"id": "f1", "engine_id": "e1", "capacity": 1000.0, "pairs_per_second": 30.0, "cost_per_second": 900.0},
               {"id": "f2", "engine_id": "e1", "capacity": 1000.0, "pairs_per_second": 0.0, "cost_per_second": 0.0},
               {"id": "w3", "capacity": 500.0, "pairs_per_second": 10.0}]  # a worker with its own engine
    engines = per_engine(feeders)
    assert [(e["feeders"], e["capacity"], e["pairs_per_second"]) for e in engines] == [(2, 1000.0, 30.0),
                                                                                     (1, 500.0, 10.0)]
    assert capacity(feeders) == 1500.0  # not 2500: two feeders, one device


def test_kombu_channels_reuse_one_redis_client_and_follow_a_new_pool(redis_url):
    from kombu import Connection

    from shared.kombu_clients import reuse_redis_clients

    reuse_redis_clients()
    with Connection(redis_url) as connection:
        channel = connection.channel()
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second and first.ping()
        channel._pool = None  # what kombu does on a reconnect: the next client uses the new pool
        with channel.conn_or_acquire() as third:
            assert third is not first and third.connection_pool is channel.pool and third.ping()
        channel.close()


# --- how a job is cut into pieces (api/jobs.py) ----------------------------------------------------


def _cut(tmp_path, workers, items, **settings):
    """The pieces `items` become when `workers` are the model's live workers: pairs per piece."""
    from types import SimpleNamespace

    from api.jobs import JobService, _Cutter
    from shared.schemas import JobItem, ScoreOptions
    from shared.settings import ModelSpec
    from shared.storage import JobStorage

    registry = SimpleNamespace(alive=lambda model: workers)
    service = SimpleNamespace(settings=Settings(**settings), workers=registry)
    size = JobService.piece_size(service, ModelSpec(name="m", source="/x", max_length=512), ScoreOptions())
    cutter = _Cutter(JobStorage(str(tmp_path)), "job", size, max_documents=1000, on_piece=lambda stored: None)
    for n, (query, documents) in enumerate(items):
        cutter.add(f"line {n}", JobItem(query=query, documents=documents))
    cutter.flush()
    storage = JobStorage(str(tmp_path))
    return [sum(len(i["documents"]) for i in storage.read_lines(storage.input_path("job", p)))
            for p in range(cutter.pieces)]


def test_a_fresh_engines_first_job_is_cut_by_its_measured_capacity(tmp_path):
    # No scored traffic yet (no pace): about one second of model work per piece at the capacity
    # the engine measured while warming up, each item priced from its text as admission does.
    doc = "word " * 300  # 1500 characters: 500 tokens at 3 characters a token, a pair of 512
    items = [("q", [doc] * 10) for _ in range(30)]  # 30 items of 10 pairs
    fast = [{"id": "w1", "engine_id": "e1", "capacity": 50_000, "chars_per_token": 3.0}]
    pieces = _cut(tmp_path / "fast", fast, items)
    assert pieces == [90, 90, 90, 30]  # 50 000 / (512 x 1.05 padding) = 93 pairs: 9 whole items
    slow = [dict(fast[0], capacity=5_000)]
    assert _cut(tmp_path / "slow", slow, items) == [10] * 30  # one item a piece: never split inside one
    # An engine fed by two workers counts once; a measured pace alone sizes pieces by pairs.
    two = [dict(fast[0], id="w2"), fast[0]]
    assert _cut(tmp_path / "two", two, items) == pieces
    paced = [{"id": "w1", "pairs_per_second": 100.0}]
    assert _cut(tmp_path / "paced", paced, items) == [100, 100, 100]
    assert _cut(tmp_path / "fixed", fast, items, job_piece_pairs=40) == [40] * 7 + [20]
