"""Random-weight rerankers with the real architectures, for tests, benchmarks and offline trials.

No machine here can download weights, and speed depends on the architecture, not on the weights.
So tests and benchmarks build XLM-RoBERTa sequence classifiers with the exact bge-reranker configs
(docs/reference-scoring.md, "The three checkpoints") or small ones, with a SentencePiece-style
Unigram tokenizer trained on the spot, and save them with `save_pretrained`: the service then loads them through its real code path.
The causal-LM families get the same: Qwen3ForCausalLM (`qwen3-*`) and GemmaForCausalLM
(`gemma-*`) with a byte-level BPE trained on the spot that carries the real special tokens
(`<|im_start|>`, `<|im_end|>`, `<think>`, `</think>`; `<bos>`, `<eos>`, `<pad>`) and the score
words as single tokens (`yes`, `no`; `Yes`, `No`).

    python -m rerank make-model /tmp/tiny-reranker --arch tiny
    python -m rerank make-model /tmp/qwen3-rr --arch qwen3-tiny
    python -m rerank make-model /tmp/qwen3-0.6b --arch qwen3-0.6b --no-weights   # DEVICE=sim
"""

from __future__ import annotations

import random
from pathlib import Path

#: Architectures by name: hidden size, layers, heads, feed-forward size, position table, vocab.
ARCHS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=514, vocab_size=0),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                  max_position_embeddings=514, vocab_size=0),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 max_position_embeddings=514, vocab_size=250002),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  max_position_embeddings=514, vocab_size=250002),
    "v2-m3": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  max_position_embeddings=8194, vocab_size=250002),
}

#: Causal-LM architectures: Qwen3-Reranker's three (their config.json shapes) and tiny ones.
LLM_ARCHS: dict[str, dict] = {
    "qwen3-tiny": dict(kind="qwen3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=40960,
                       vocab_size=0, tie_word_embeddings=True),
    "qwen3-0.6b": dict(kind="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072, max_position_embeddings=40960,
                       vocab_size=151669, tie_word_embeddings=True),
    "qwen3-4b": dict(kind="qwen3", hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=9728, max_position_embeddings=40960,
                     vocab_size=151669, tie_word_embeddings=True),
    "qwen3-8b": dict(kind="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, max_position_embeddings=40960,
                     vocab_size=151669, tie_word_embeddings=False),
    "gemma-tiny": dict(kind="gemma", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=16, intermediate_size=128, max_position_embeddings=8192,
                       vocab_size=0),
    "gemma-2b": dict(kind="gemma", hidden_size=2048, num_hidden_layers=18, num_attention_heads=8,
                     num_key_value_heads=1, head_dim=256, intermediate_size=16384, max_position_embeddings=8192,
                     vocab_size=256000),
}

_WORDS = (
    "the of and to in is that for it as with was on be by at this are from or have an they which one "
    "you were her all she there would their we him been has when who will more no if out so said what "
    "up its about into than them can only other new some could time these two may then do first any "
    "my now such like our over man me even most made after also did many before must through back "
    "years where much your way well down should because each just those people how too little state "
    "good very make world still own see men work long get here between both life being under never day "
    "same another know while last might us great old year off come since against go came right used "
    "take three search query document model rerank score vector index retrieval answer question data "
    "knowledge base chunk server request latency token batch memory python redis worker queue deploy"
).split()
_HANZI = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后"
    "小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长"
    "知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最"
    "间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市"
    "眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计"
    "或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让"
    "认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办"
)


def sentence(rng: random.Random, words: int = 12) -> str:
    """A line of mixed English words and Chinese characters, like FastGPT's knowledge chunks."""
    parts = []
    for _ in range(words):
        if rng.random() < 0.35:
            parts.append("".join(rng.choice(_HANZI) for _ in range(rng.randint(2, 6))))
        else:
            parts.append(rng.choice(_WORDS))
    return " ".join(parts)


def build_tokenizer(vocab_size: int = 4000, seed: int = 0):
    """An XLM-R tokenizer (Unigram, `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3) trained locally."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import XLMRobertaTokenizerFast

    rng = random.Random(seed)
    corpus = [sentence(rng, 20) for _ in range(3000)]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(["<mask>"])
    return XLMRobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        model_max_length=512,
    )


QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def build_bpe_tokenizer(kind: str, vocab_size: int = 4000, seed: int = 0):
    """A byte-level BPE like Qwen's (and, with Gemma's special tokens at Gemma's ids 0-3, a
    stand-in for Gemma's), trained locally, with the score words as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    words = ["yes", "no", "Yes", "No"]
    corpus = [sentence(rng, 20) for _ in range(3000)]
    corpus += [" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)]  # common enough to merge
    corpus += ["<Instruct>: <Query>: <Document>: A: B: Given a web search query, retrieve relevant passages"] * 50
    specials = QWEN3_SPECIALS if kind == "qwen3" else GEMMA_SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    for word in words:
        if len(tok.encode(word, add_special_tokens=False).ids) != 1:
            raise RuntimeError(f"the trained tokenizer splits {word!r}; train on more of it")
    if kind == "qwen3":
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       model_max_length=131072)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=8192)


def build_causal_model(out_dir: str | Path, arch: str, seed: int = 0, weights: bool = True) -> Path:
    """Save a random Qwen3ForCausalLM or GemmaForCausalLM reranker of `arch` to `out_dir`."""
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    shape = dict(LLM_ARCHS[arch])
    kind = shape.pop("kind")
    tokenizer = build_bpe_tokenizer(kind, seed=seed)
    shape["vocab_size"] = shape["vocab_size"] or len(tokenizer)
    tiny = arch.endswith("-tiny")
    if kind == "qwen3":
        config = Qwen3Config(**shape, bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                             rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
                             initializer_range=0.2 if tiny else 0.02)
        config.architectures, cls = ["Qwen3ForCausalLM"], Qwen3ForCausalLM
    else:
        config = GemmaConfig(**shape, pad_token_id=0, eos_token_id=1, bos_token_id=2, hidden_act="gelu_pytorch_tanh",
                             initializer_range=0.2 if tiny else 0.02)
        config.architectures, cls = ["GemmaForCausalLM"], GemmaForCausalLM
    if weights:
        torch.manual_seed(seed)
        cls(config).eval().save_pretrained(out)
    else:
        config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_model(out_dir: str | Path, arch: str = "tiny", seed: int = 0, vocab_size: int | None = None,
                weights: bool = True) -> Path:
    """Save a random reranker of `arch` (tokenizer included) to `out_dir` and return the path.

    `weights=False` saves the config and tokenizer only: enough for `DEVICE=sim`, which never
    loads weights, and quick to write even for the large architectures.
    """
    if arch in LLM_ARCHS:
        return build_causal_model(out_dir, arch, seed=seed, weights=weights)
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    out = Path(out_dir)
    tokenizer = build_tokenizer(seed=seed)
    shape = dict(ARCHS[arch])
    shape["vocab_size"] = vocab_size or shape["vocab_size"] or len(tokenizer)
    tokenizer.model_max_length = shape["max_position_embeddings"] - 2
    config = XLMRobertaConfig(
        **shape,
        type_vocab_size=1,
        num_labels=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        # Wider than the usual 0.02 so random scores spread out and orderings are meaningful.
        initializer_range=0.2 if arch in ("tiny", "small") else 0.02,
    )
    if weights:
        torch.manual_seed(seed)
        model = XLMRobertaForSequenceClassification(config).eval()
        model.save_pretrained(out)
    else:
        config.architectures = ["XLMRobertaForSequenceClassification"]
        config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def documents_of_length(tokenizer, lengths: list[int], seed: int = 0) -> list[str]:
    """Texts whose token counts (no special tokens) are the given lengths."""
    rng = random.Random(seed)
    texts = []
    for n in lengths:
        text = sentence(rng, max(4, n))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        while len(enc["input_ids"]) < n:
            text += " " + sentence(rng, n)
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        texts.append(text[: enc["offset_mapping"][n - 1][1]] if n else "")
    return texts
