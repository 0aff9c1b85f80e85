"""Model families (engine/families/): Qwen3-Reranker and bge-reranker-v2-gemma scored as their
references score them, whatever the batch; family detection and names; the pure cost and
activation modules the API shares with the engine."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import DocumentPolicy, Engine, EngineConfig, InstructionNotAccepted
from engine.backends import PaddedBatch, forward
from engine.backends.buckets import pad_to
from engine.families import detect, family_of
from engine.families.gemma import PROMPT
from engine.families.qwen3 import DEFAULT_INSTRUCTION, PREFIX, SUFFIX
from rerank.random_model import sentence

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4


def documents(n: int = 12, seed: int = 3) -> list[str]:
    import random

    rng = random.Random(seed)
    return [sentence(rng, rng.choice([1, 3, 10, 40, 120])) for _ in range(n)] + ["", "yes", " no\n"]


class Qwen3Card:
    """The Qwen3-Reranker model card's computation: transformers, float32, one pair, no padding."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.prefix = self.tok.encode(PREFIX, add_special_tokens=False)
        self.suffix = self.tok.encode(SUFFIX, add_special_tokens=False)
        self.yes, self.no = self.tok.convert_tokens_to_ids("yes"), self.tok.convert_tokens_to_ids("no")

    def ids(self, query: str, doc: str, max_length: int = 8192, instruction: str | None = None) -> list[int]:
        text = f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {doc}"
        body = self.tok([text], padding=False, truncation="longest_first", return_attention_mask=False,
                        max_length=max_length - len(self.prefix) - len(self.suffix))["input_ids"][0]
        return self.prefix + body + self.suffix

    @torch.no_grad()
    def score(self, ids: list[int]) -> tuple[float, float]:
        """(yes - no, exp(log_softmax([no, yes])[yes])) at the last position."""
        last = self.model(input_ids=torch.tensor([ids])).logits[0, -1]
        pair = torch.log_softmax(torch.stack([last[self.no], last[self.yes]]), dim=0)
        return float(last[self.yes] - last[self.no]), float(pair[1].exp())


class GemmaFlag:
    """FlagLLMReranker's layout and score (bge-reranker-v2-gemma's card): one pair, no padding."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.yes = self.tok("Yes", add_special_tokens=False)["input_ids"][0]
        self.sep = self.tok("\n", add_special_tokens=False)["input_ids"]
        self.prompt = self.tok(PROMPT, add_special_tokens=False)["input_ids"]

    def ids(self, query: str, passage: str, max_length: int = 512) -> list[int]:
        q = self.tok(f"A: {query}", add_special_tokens=False, max_length=max_length * 3 // 4, truncation=True)
        p = self.tok(f"B: {passage}", add_special_tokens=False, max_length=max_length, truncation=True)
        # FlagLLMReranker's prepare_for_model(first, second, truncation="only_second", max_length),
        # which transformers 5 no longer offers on fast tokenizers: the second text's end is cut.
        first, second = [self.tok.bos_token_id] + q["input_ids"], self.sep + p["input_ids"]
        return first + second[: max(max_length - len(first), 0)] + self.sep + self.prompt

    @torch.no_grad()
    def score(self, ids: list[int]) -> float:
        return float(self.model(input_ids=torch.tensor([ids])).logits[0, -1, self.yes])


@pytest.fixture(scope="module")
def qwen3_engine(qwen3_dir):
    engine = Engine.start(EngineConfig(source=str(qwen3_dir), device="cpu", dtype="float32"))
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def gemma_engine(gemma_dir):
    engine = Engine.start(EngineConfig(source=str(gemma_dir), device="cpu", dtype="float32"))
    yield engine
    engine.stop()


def test_qwen3_scores_equal_the_model_card_whatever_the_batch(qwen3_engine, qwen3_dir):
    card, query, docs = Qwen3Card(qwen3_dir), "what does the worker queue deploy?", documents()
    reference = [card.score(card.ids(query, d)) for d in docs]
    together = qwen3_engine.score(query, docs)  # one right-padded batch of very different lengths
    assert qwen3_engine.info["family"] == "qwen3" and qwen3_engine.info["context_length"] == 8192
    assert np.abs(together.logits - [r[0] for r in reference]).max() < TOLERANCE
    alone = [qwen3_engine.score(query, [d]).logits[0] for d in docs[:4]]
    assert np.abs(np.asarray(alone) - [r[0] for r in reference[:4]]).max() < TOLERANCE
    relevance = qwen3_engine.score_pairs([(query, d) for d in docs])  # sigmoid(yes - no) = the card's score
    assert np.abs(np.asarray(relevance) - [r[1] for r in reference]).max() < TOLERANCE
    # The tokens are the card's, seam merges included, and so is its truncation.
    assert qwen3_engine.encoder.encode(query, docs).sequences() == [card.ids(query, d) for d in docs]
    short = qwen3_engine.encoder.encode(query, docs, max_length=160).sequences()
    assert short == [card.ids(query, d, max_length=160) for d in docs] and max(map(len, short)) == 160


def test_qwen3_instruction_replaces_the_default(qwen3_engine, qwen3_dir):
    card, query, docs = Qwen3Card(qwen3_dir), "panda", documents(4)
    instruction = "Given a question, find the passage that answers it"
    scored = qwen3_engine.score(query, docs, instruction=instruction).logits
    assert np.abs(scored - [card.score(card.ids(query, d, instruction=instruction))[0] for d in docs]).max() < TOLERANCE
    assert np.abs(scored - qwen3_engine.score(query, docs).logits).max() > 1e-3  # it did change the prompt


def test_gemma_scores_equal_flag_llm_reranker_whatever_the_batch(gemma_engine, gemma_dir):
    flag, query, docs = GemmaFlag(gemma_dir), "what does the worker queue deploy?", documents()
    assert gemma_engine.encoder.encode(query, docs).sequences() == [flag.ids(query, d) for d in docs]
    scored = gemma_engine.score(query, docs).logits
    assert np.abs(scored - [flag.score(flag.ids(query, d)) for d in docs]).max() < TOLERANCE
    long_query = sentence(__import__("random").Random(1), 400)  # cut to 3/4 of max_length, as Flag does
    assert gemma_engine.encoder.encode(long_query, docs[:3], max_length=128).sequences() == \
        [flag.ids(long_query, d, max_length=128) for d in docs[:3]]


def test_gemma_scores_equal_flagembedding_itself_where_it_is_installed(gemma_engine, gemma_dir):
    """FlagEmbedding's own FlagLLMReranker (batched, padded), where the package is importable.
    It is not in requirements/ (datasets, peft, ir-datasets... for one reference); FlagEmbedding
    1.4.2 was run against this test with `pip install --no-deps --target DIR FlagEmbedding==1.4.2
    datasets peft accelerate multiprocess pandas dill xxhash pyarrow` and PYTHONPATH=DIR: 2e-6."""
    flag_module = pytest.importorskip("FlagEmbedding")
    query, docs = "what does the worker queue deploy?", [d for d in documents() if d]
    flag = flag_module.FlagLLMReranker(str(gemma_dir), use_fp16=False, devices="cpu")
    reference = flag.compute_score([[query, d] for d in docs], batch_size=4, max_length=512, normalize=False)
    assert np.abs(np.asarray(reference) - gemma_engine.score(query, docs).logits).max() < TOLERANCE


def test_families_without_an_instruction_refuse_one(gemma_engine, engine):
    for e in (gemma_engine, engine):
        with pytest.raises(InstructionNotAccepted):
            e.score("q", ["d"], instruction="anything")
        assert e.info["instruction"] is False
    assert issubclass(InstructionNotAccepted, ValueError)
    assert engine.info["family"] == "cross-encoder"


def test_padding_rows_of_cuda_graph_buckets_leave_scores_alone(qwen3_engine):
    """The graph backend fills a bucket with one-token rows; the last-token gather takes their
    position 0 and the real rows' scores do not move."""
    encoded = qwen3_engine.encoder.encode("q", documents(5))
    batch = PaddedBatch.of(encoded.sequences(), qwen3_engine.encoder.pad_id)
    backend = qwen3_engine.scorer.batcher.backend
    plain = forward(backend, batch)
    padded = forward(backend, pad_to(batch, 16, batch.width + 24, backend.pad_id))
    assert padded.shape == (16,) and np.isfinite(padded).all()
    assert np.abs(padded[: batch.rows] - plain).max() < TOLERANCE


def test_qwen3_chunked_document_is_its_best_window(qwen3_engine, qwen3_dir):
    card, query = Qwen3Card(qwen3_dir), "memory of the batch"
    long_doc = " ".join(documents(30, seed=9))
    policy = DocumentPolicy(chunk_overlap=8, max_chunks=64)
    scores = qwen3_engine.score(query, ["short", long_doc], policy)
    encoded = qwen3_engine.encoder.encode(query, ["short", long_doc], policy, max_length=8192)
    assert scores.chunks[1] == 1  # 8192 tokens hold it: one window
    small = qwen3_engine.encoder.encode(query, [long_doc], policy, max_length=200)
    windows = small.sequences()
    assert len(windows) > 3 and all(len(w) <= 200 for w in windows)
    best = max(card.score(w)[0] for w in windows)
    assert abs(Engine.merge(small, qwen3_engine.run(small)).logits[0] - best) < TOLERANCE
    assert encoded.pairs == 2


def test_family_comes_from_config_or_the_name(qwen3_dir, gemma_dir, model_dir):
    from shared.settings import parse_models

    assert detect({"architectures": ["Qwen3ForCausalLM"]}) == "qwen3"
    assert detect({"architectures": ["XLMRobertaForSequenceClassification"]}) == "cross-encoder"
    assert family_of(str(gemma_dir)).NAME == "gemma" and family_of(str(model_dir)).NAME == "cross-encoder"
    specs = {s.name: s for s in parse_models(f"mine={qwen3_dir},qwen3-reranker-4b,bge-reranker-v2-gemma,"
                                             f"bge-reranker-base,g={gemma_dir}")}
    assert (specs["mine"].family, specs["mine"].max_length) == ("qwen3", 8192)
    assert specs["qwen3-reranker-4b"].source == "Qwen/Qwen3-Reranker-4B" and specs["qwen3-reranker-4b"].max_length == 8192
    assert specs["bge-reranker-v2-gemma"].source == "BAAI/bge-reranker-v2-gemma"
    assert specs["bge-reranker-base"].max_length == 512 and specs["g"].family == "gemma"
    assert parse_models("qwen3-reranker-0.6b", 1024)[0].max_length == 1024  # MAX_LENGTH wins when set
    with pytest.raises(ValueError, match="at most 32768"):
        parse_models('[{"name": "qwen3-reranker-8b", "max_length": 40000}]')
    custom = parse_models(json.dumps([{"name": "x", "source": str(model_dir), "family": "qwen3",
                                       "template": {"instruction": "Judge it"}}]))[0]
    assert custom.family == "qwen3" and custom.template == {"instruction": "Judge it"}
    with pytest.raises(ValueError, match="family"):
        parse_models(json.dumps([{"name": "x", "source": str(model_dir), "family": "t5"}]))


def test_json_template_reaches_the_prompt(qwen3_dir):
    from engine.families import qwen3

    default = qwen3.encoder(str(qwen3_dir)).encode("q", ["d"]).sequences()[0]
    mine = qwen3.encoder(str(qwen3_dir), template={"instruction": "Judge it"}).encode("q", ["d"]).sequences()[0]
    assert mine != default and len(mine) < len(default)
    with pytest.raises(ValueError, match="template"):
        qwen3.encoder(str(qwen3_dir), template={"system": "x"})


def test_cost_and_activation_are_one_definition_and_the_api_stays_light():
    from api import admission
    from engine import batcher, cost, scoring
    from shared import ranking

    assert batcher.padded_cost is cost.padded_cost and ranking.sigmoid is scoring.sigmoid
    assert cost.padded_cost(1, 8192) == 8192 * 16 and math.isclose(scoring.sigmoid(0.0), 0.5)
    qwen = cost.layout("qwen3", template_tokens=100)
    # A Qwen3 query is not cut to 3/4 on its own; a cross-encoder's is.
    assert qwen.query_tokens(7000, 8192) == 7000 and cost.layout(None).query_tokens(7000, 8192) == 6144
    assert admission.workers_layout([{"family": "qwen3", "template_tokens": 100}]) == qwen
    assert admission.served_length([{"context_length": 8192}], 512) == 8192 and admission.served_length([], 512) == 512
    code = ("import sys; import api.admission, shared.ranking, shared.settings; "
            "bad = [m for m in ('numpy', 'torch', 'tokenizers') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_simulated_gpu_has_qwen3_profiles_derived_by_flops(tmp_path):
    from engine.backends.sim import DERIVED, MEASURED_SHAPE, Timing, flops_per_token
    from rerank.random_model import build_model

    folder = build_model(tmp_path / "qwen3-0.6b", "qwen3-0.6b", weights=False)  # config + tokenizer only
    sim = Engine.start(EngineConfig(source=str(folder), device="sim", cuda_graphs=False))
    try:
        assert "qwen3-0.6b" in sim.info["backend"] and sim.info["family"] == "qwen3"
        assert sim.info["max_length"] == 8192 and sim.info["dtype"] == "bfloat16"
    finally:
        sim.stop()
    measured, small, big = Timing.load("v2-m3"), Timing.load("qwen3-0.6b"), Timing.load("qwen3-8b")
    # Where the device is the bottleneck, a pass takes the FLOPs ratio longer than the measured one.
    for timing, name in ((small, "qwen3-0.6b"), (big, "qwen3-8b")):
        ratio = flops_per_token(DERIVED[name], 512) / flops_per_token(MEASURED_SHAPE, 512)
        assert timing.eager(256, 512)[1] == pytest.approx(measured.eager(256, 512)[1] * ratio, rel=0.01)
    assert 1.3 < small.eager(256, 512)[1] / measured.eager(256, 512)[1] < 1.6  # 0.6B ~ 1.5 x large per pair
