"""Request, response and task models: the single source for validation, for the answers the API
builds and for the OpenAPI document.

The wire formats are FastGPT's, Cohere/Jina's (v1 and v2), TEI's and vLLM's score API (docs/api.md
and its page per format). Each request model resolves its options into the one ScoreOptions the
API hands on, so every route, answered at once or as a job, scores alike. Fields a client may send that we do not know are ignored, as the seed
server, Cohere and vLLM do. Answers are built from the response models below and serialized in
their field order, which clients may rely on (FastGPT reads results[].index and relevance_score).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictBool, StrictStr, model_validator
from pydantic_core import PydanticCustomError


def _is_none(value: object) -> bool:
    return value is None


def omitted_if_none(description: str | None = None) -> Any:
    """An optional answer field that is left out, not sent as null, when it has no value (clients
    such as Dify's treat a present `document: null` differently from an absent one)."""
    return Field(default=None, exclude_if=_is_none, description=description)


#: Longest instruction a request may carry (characters): a sentence or two, not a document.
MAX_INSTRUCTION_CHARS = 2048


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextDocument(_Lenient):
    """Cohere/Jina style document object."""

    text: StrictStr


class Chunking(_Lenient):
    """Score a long document by its best window instead of its first max_length tokens."""

    overlap: Annotated[int, Field(default=32, ge=0, le=4096, description="Tokens shared by neighbour windows.")]
    max_chunks: Annotated[int | None, Field(
        default=None, ge=1, le=4096,
        description="Most windows per document; at most, and by default, the server's MAX_CHUNKS.")]


class ScoreScale(_Lenient):
    """Sigmoid scores in [0, 1] (FlagEmbedding's normalize=True) unless the client asks for logits."""

    raw_scores: StrictBool = Field(
        default=False, description="Return the model's logits instead of sigmoid scores in [0, 1]."
    )
    use_activation: StrictBool | None = Field(default=None, description="vLLM's name: false = raw_scores.")

    def raw(self) -> bool:
        return self.raw_scores or self.use_activation is False


class RerankOptions(ScoreScale):
    """The options a client sets on a Cohere-format call (`/v1/rerank`, `/v2/rerank`, `/rerank`
    with `documents`) and on a bulk job (the same names, as query parameters for an upload).
    `options()` resolves them into the one ScoreOptions every route hands on."""

    truncation_direction: Literal["right", "left"] = Field(
        default="right", description="Which end to cut (TEI): right keeps the start, left keeps the end."
    )
    max_tokens_per_doc: Annotated[int | None, Field(
        default=None, ge=1, description="Cohere v2: cut each document to this many tokens first.")]
    max_chunks_per_doc: Annotated[int | None, Field(
        default=None, ge=1, le=4096, description="Cohere: score up to this many windows, keep the best.")]
    chunking: StrictBool | Chunking | None = Field(
        default=None, description="Best-window scoring: true, or {overlap, max_chunks}.")
    return_chunks: StrictBool = Field(default=False, description="Say how many windows each document used.")
    return_documents: StrictBool = Field(default=False, description="Echo each document's text.")
    instruction: Annotated[StrictStr | None, Field(
        default=None, min_length=1, max_length=MAX_INSTRUCTION_CHARS,
        description="For LLM rerankers (such as Qwen3-Reranker): the task the query serves, put before it "
                    "in the model's prompt. A model that takes no instruction (the BGE cross-encoders) "
                    "answers 422.")]

    def options(self) -> ScoreOptions:
        """These options resolved: chunking spelled out, vLLM's use_activation folded into raw_scores."""
        chunk = self.chunking if isinstance(self.chunking, Chunking) else Chunking() if self.chunking else None
        if chunk is None and self.max_chunks_per_doc is not None:
            chunk = Chunking()
        if chunk is not None and self.max_chunks_per_doc is not None:
            chunk = Chunking(overlap=chunk.overlap, max_chunks=self.max_chunks_per_doc)
        return ScoreOptions(
            direction=self.truncation_direction,
            max_doc_tokens=self.max_tokens_per_doc,
            chunk_overlap=chunk.overlap if chunk else None,
            max_chunks=chunk.max_chunks if chunk else None,
            instruction=self.instruction,
            raw_scores=self.raw(),
            return_documents=self.return_documents,
            return_chunks=self.return_chunks,
        )


class RerankRequest(RerankOptions):
    """`POST /v1/rerank`, `/v2/rerank` and `/rerank` with `documents`: FastGPT's body plus the
    Cohere (v1 and v2), Jina, vLLM and Infinity options."""

    model: StrictStr | None = Field(
        default=None, description="Served model name or its Hugging Face id; optional with one model."
    )
    query: Annotated[StrictStr, Field(min_length=1, description="The search query.")]
    documents: Annotated[
        list[StrictStr | TextDocument],
        Field(min_length=1, description="Texts to rank, as strings or {\"text\": ...} objects."),
    ]
    top_n: Annotated[int | None, Field(
        default=None, ge=0, description="Keep the best N results; 0 or absent: all (vLLM, Dify).")]

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    def keep(self) -> int | None:
        """How many results to answer (None: all)."""
        return self.top_n or None


class TeiRerankRequest(_Lenient):
    """TEI's `/rerank` body. `truncate` unset: cut long texts (as TEI's --auto-truncate)."""

    query: Annotated[StrictStr, Field(min_length=1)]
    texts: Annotated[list[StrictStr], Field(min_length=1)]
    truncate: StrictBool | None = Field(default=None, description="false: texts that do not fit are an error (413)")
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    model: StrictStr | None = None

    def options(self) -> ScoreOptions:
        """TEI's options as ours: `truncate: false` refuses long texts (413) instead of cutting them."""
        return ScoreOptions(direction=self.truncation_direction.lower(), truncate=self.truncate is not False,
                            raw_scores=self.raw_scores)


#: The two bodies `POST /rerank` takes, told apart by their list of texts.
RERANK_BODIES: dict[str, type[BaseModel]] = {"texts": TeiRerankRequest, "documents": RerankRequest}


def rerank_body_model(body: dict[str, Any]) -> type[BaseModel] | None:
    """TEI's model for a body with `texts`, the Cohere one for `documents`; None when it has both
    or neither (no guess: the client must say which format it speaks)."""
    present = [key for key in RERANK_BODIES if body.get(key) is not None]
    return RERANK_BODIES[present[0]] if len(present) == 1 else None


def _pairing(message: str) -> PydanticCustomError:
    return PydanticCustomError("score_pairs", message)


def _listed(value: str | list[str] | None) -> list[str] | None:
    return [value] if isinstance(value, str) else value


class ScoreRequest(ScoreScale):
    """vLLM's `POST /score`: `text_1` against `text_2` (or `queries` against `documents`), each a
    string or a list. vLLM's pairing: one query and N documents, or N queries and N documents."""

    model: StrictStr | None = None
    text_1: StrictStr | list[StrictStr] | None = Field(default=None, description="Query, or queries.")
    text_2: StrictStr | list[StrictStr] | None = Field(default=None, description="Document, or documents.")
    queries: StrictStr | list[StrictStr] | None = Field(default=None, description="vLLM's newer text_1.")
    documents: StrictStr | list[StrictStr] | None = Field(default=None, description="vLLM's newer text_2.")

    @model_validator(mode="after")
    def _paired(self) -> ScoreRequest:
        texts = self.text_1 is not None or self.text_2 is not None
        if texts == (self.queries is not None or self.documents is not None):
            raise _pairing("send text_1 and text_2, or queries and documents")
        queries, documents = self._sides()
        if queries is None or documents is None:
            raise _pairing("text_1 and text_2 (queries and documents) are both required")
        if not queries or not documents:
            raise _pairing("at least one query and one document must be given")
        if any(not q for q in queries):
            raise _pairing("a query must not be empty")
        if len(queries) > 1 and len(queries) != len(documents):
            raise _pairing(f"{len(queries)} queries and {len(documents)} documents: "
                           "input lengths must be 1:1, 1:N or N:N")
        return self

    def options(self) -> ScoreOptions:
        return ScoreOptions(raw_scores=self.raw())

    def _sides(self) -> tuple[list[str] | None, list[str] | None]:
        first = self.text_1 if self.text_1 is not None else self.queries
        second = self.text_2 if self.text_2 is not None else self.documents
        return _listed(first), _listed(second)

    def pairs(self) -> list[tuple[str, str]]:
        """(query, document) pairs in input order."""
        queries, documents = self._sides()
        assert queries is not None and documents is not None
        if len(queries) == 1:
            return [(queries[0], d) for d in documents]
        return list(zip(queries, documents))


# --- answers ----------------------------------------------------------------------------------------


class RerankResultDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float
    document: RerankResultDocument | None = omitted_if_none("The document's text (with return_documents).")
    chunks: int | None = omitted_if_none("Windows scored (with return_chunks).")
    truncated: bool | None = omitted_if_none(
        "With return_chunks: true when the document needed more windows than allowed (MAX_CHUNKS), so its "
        "end was not scored.")


class TokenCount(BaseModel):
    input_tokens: int


class Meta(BaseModel):
    tokens: TokenCount


class Usage(BaseModel):
    total_tokens: int
    prompt_tokens: int = Field(description="vLLM's and Infinity's name for the same count.")


class RerankResponse(BaseModel):
    """Cohere v1 / Jina answer. Sorted by relevance, high to low; ties keep input order."""

    id: str
    model: str
    results: list[RerankResult]
    meta: Meta
    usage: Usage = Field(description="Jina's and vLLM's name for meta.tokens.")

    @classmethod
    def of(cls, request_id: str, model: str, results: list[RerankResult], tokens: int) -> RerankResponse:
        return cls(id=request_id, model=model, results=results,
                   meta=Meta(tokens=TokenCount(input_tokens=tokens)),
                   usage=Usage(total_tokens=tokens, prompt_tokens=tokens))


class ApiVersion(BaseModel):
    version: str = "2"


class TokensV2(BaseModel):
    input_tokens: int
    output_tokens: int = 0


class MetaV2(BaseModel):
    api_version: ApiVersion = ApiVersion()
    tokens: TokensV2


class RerankV2Response(BaseModel):
    """Cohere v2 answer (`id`, `results`, `meta`), then our extras `model` and `usage`."""

    id: str
    results: list[RerankResult]
    meta: MetaV2
    model: str
    usage: Usage

    @classmethod
    def of(cls, request_id: str, model: str, results: list[RerankResult], tokens: int) -> RerankV2Response:
        return cls(id=request_id, results=results, meta=MetaV2(tokens=TokensV2(input_tokens=tokens)),
                   model=model, usage=Usage(total_tokens=tokens, prompt_tokens=tokens))


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = omitted_if_none("With return_text.")


class TeiRerankResponse(RootModel[list[TeiRank]]):
    """TEI's answer: a bare array sorted by score, high to low."""


class ScoreData(BaseModel):
    index: int = Field(description="Position of the pair in the request.")
    object: Literal["score"] = "score"
    score: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ScoreResponse(BaseModel):
    """vLLM's score answer: one score per pair, in input order."""

    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreData]
    usage: ScoreUsage


class ErrorResponse(BaseModel):
    """Every error, whatever the route and status: what went wrong (`error`, and the same text as
    `detail`, which FastAPI-style clients such as Jina's read), its kind, and for invalid input where."""

    error: str
    error_type: str
    detail: str = Field(description="The message again, under FastAPI's name.")
    fields: list[dict[str, str]] | None = omitted_if_none("Each invalid field and what is wrong with it.")

    @classmethod
    def of(cls, message: str, error_type: str, fields: list[dict[str, str]] | None = None) -> ErrorResponse:
        return cls(error=message, error_type=error_type, detail=message, fields=fields or None)


# --- operations -------------------------------------------------------------------------------------


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    status: str = Field(description="ready or unavailable")
    redis: str = Field(
        description="ok, unreachable, cannot_write (disk full), out_of_memory, read_only, refused or failing_over")
    models: dict[str, dict[str, int]] = Field(
        description="Per served model: its live workers (feeders) and the engines they feed.")
    missing: list[str]
    detail: str | None = omitted_if_none("When unavailable: what is missing, in words (as on every error).")


class EngineCard(BaseModel):
    """One engine process (a device's batcher and copy of the weights) and the workers feeding it."""

    id: str
    device: str
    feeders: int = Field(description="Live worker processes feeding this engine.")
    pid: int | None = None
    host: str | None = None
    memory_mib: float | None = Field(default=None, description="The engine process's resident memory when ready.")
    shared: bool = Field(default=False, description="A device's shared engine (the launcher's), not a worker's own.")


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    source: str = Field(description="Hugging Face id or folder the weights come from.")
    max_length: int
    family: str | None = Field(default=None, description="Model family: cross-encoder, qwen3 or gemma (docs/models.md).")
    context_length: int | None = Field(default=None, description="Tokens per (query, document) pair the workers serve.")
    workers: int = Field(description="Live workers (from their heartbeats).")
    engines: list[EngineCard] = Field(default_factory=list, description="The engines those workers feed.")
    devices: list[str]
    dtypes: list[str]
    dtype_reasons: list[str] = Field(default_factory=list, description="Why the workers run that dtype "
                                                                        "(DTYPE=auto: the device's bf16 support).")
    pairs_per_second: float | None = Field(description="Measured pace of the live workers together.")
    capacity: float | None = Field(
        default=None, description="Padded tokens a second the live workers score at full batches (the 429 bound "
                                  "is this times SYNC_TIMEOUT).")
    backends: list[str] = Field(default_factory=list, description="How the workers run the model.")
    backend_reasons: list[str] = Field(default_factory=list,
                                       description="On a CPU: why that backend (CPU_BACKEND, docs/cpu.md).")
    graph_memory_mib: float | None = Field(default=None, description="GPU memory one worker's CUDA graphs hold.")
    simulated: bool = Field(default=False, description="A worker runs on the simulated GPU (DEVICE=sim): its "
                                                       "scores are placeholders.")


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class TeiInfo(BaseModel):
    """TEI's `GET /info`; Dify's TEI plugin reads `model_type` and `max_input_length`."""

    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: dict
    max_concurrent_requests: int
    max_input_length: int
    family: str | None = Field(default=None, description="Ours: the model family (cross-encoder, qwen3, gemma).")
    context_length: int | None = Field(default=None, description="Ours: tokens per pair the workers serve.")
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    simulated: bool = Field(default=False, description="Ours: the workers run on the simulated GPU (DEVICE=sim); "
                                                       "scores are placeholders.")
    dtype_reason: str | None = Field(default=None, description="Ours: why the workers run model_dtype.")


# --- bulk jobs --------------------------------------------------------------------------------------


class JobItem(_Lenient):
    """One (query, documents) item of a bulk job: a JSON `items` entry or one JSON Lines line."""

    id: StrictStr | int | None = Field(default=None, description="Your id, echoed in the results.")
    query: Annotated[StrictStr, Field(min_length=1)]
    documents: Annotated[list[StrictStr | TextDocument], Field(min_length=1)]
    top_n: Annotated[int | None, Field(default=None, ge=1)]

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class JobOptions(RerankOptions):
    """Options of a job: those of /v1/rerank, with the same names and meaning (for a JSON Lines
    or Parquet upload they come as query parameters)."""

    model: StrictStr | None = None


class JobRequest(JobOptions):
    """`POST /v1/rerank/jobs` with a JSON body: the items, or the URL of a JSON Lines or Parquet
    file to read them from (under a prefix the operator allows in JOB_INPUT_PREFIXES)."""

    items: Annotated[list[JobItem] | None, Field(default=None, min_length=1)]
    input_url: StrictStr | None = Field(
        default=None, description="fsspec URL of the input (s3://bucket/items.jsonl, /data/x.parquet); "
                                  "instead of items.")
    input_format: Literal["jsonl", "parquet"] | None = Field(
        default=None, description="Format of input_url; default by its suffix (.parquet or .pq: Parquet).")

    @model_validator(mode="after")
    def _one_input(self) -> JobRequest:
        if (self.items is None) == (self.input_url is None):
            raise ValueError("give either items or input_url")
        return self


class JobCreated(BaseModel):
    id: str
    status: str
    status_url: str
    results_url: str


class JobProgress(BaseModel):
    items_done: int
    items_total: int
    pairs_done: int
    pairs_total: int
    percent: float


class JobErrors(BaseModel):
    count: int = Field(description="Items that could not be scored.")
    pieces_failed: int = Field(default=0, description="Pieces that failed for good (no results).")
    last: str | None = None


class JobStatus(BaseModel):
    """`GET /v1/rerank/jobs/<id>`."""

    id: str
    model: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    progress: JobProgress
    created_at: str
    started_at: str | None
    finished_at: str | None
    pairs_per_second: float | None
    errors: JobErrors
    results_url: str
    deleted: bool | None = Field(default=None, description="DELETE only: whether the (ended) job was deleted.")


class ResultsQuery(_Lenient):
    """Query parameters of `GET /v1/rerank/jobs/<id>/results`."""

    format: Literal["jsonl", "parquet"] | None = Field(
        default=None, description="jsonl (default) or parquet; the Accept header is read when absent.")
    start: Annotated[int, Field(default=0, ge=0, description=(
        "Only items whose index is at least this (resume a download: the count of lines received "
        "from a finished job)."))]


class JobResultLine(BaseModel):
    """One line of `GET /v1/rerank/jobs/<id>/results` (JSON Lines, input order)."""

    id: str | int | None
    index: int = Field(description="Position of the item in the job's input.")
    results: list[RerankResult] = []
    meta: Meta | None = None
    error: str | None = None


# --- between the API and the workers (JSON through Redis) -----------------------------------------


class ScoreOptions(BaseModel):
    """A call's options, resolved from whichever wire format it came in (each request model's
    `options()`): the one form the API hands on, in a realtime task and stored with a job alike.
    The worker derives the engine's DocumentPolicy from it (worker/scoring.py), admission its cost
    (api/admission.py), and ranking the answer (shared/ranking.py). Defaults are FlagEmbedding's."""

    direction: Literal["right", "left"] = "right"
    max_doc_tokens: int | None = None
    chunk_overlap: int | None = None  # set: score every window of a long document, keep the best
    max_chunks: int | None = None  # None: the server's MAX_CHUNKS (which also caps any other value)
    truncate: bool = True  # False: a pair longer than max_length is refused (413)
    instruction: str | None = None  # LLM rerankers' task instruction; None: the model's own default
    raw_scores: bool = False  # logits instead of sigmoid scores (raw_scores, or vLLM's use_activation: false)
    return_documents: bool = False
    return_chunks: bool = False


class ScoreTask(BaseModel):
    """What a synchronous call asks a worker: score these documents against this query."""

    call_id: str
    request_id: str
    query: str
    documents: list[str]
    deadline: float = Field(description="Unix time after which nobody waits for the answer.")
    options: ScoreOptions = ScoreOptions()
    # The API's publish span as W3C traceparent (direct path only: a Celery task carries it in
    # its message headers), so the worker's span of the call is its child (shared/tracing.py).
    traceparent: str | None = None


class Scored(BaseModel):
    """One call's scores: a logit per document in input order (the best window's when chunked).
    What a worker answers and what the API ranks; bulk pieces rank the same values."""

    logits: list[float]
    input_tokens: int = 0
    chunks: list[int] | None = None  # windows per document (chunked calls)
    truncated: list[bool] | None = None  # chunked documents longer than their windows

    def windows(self) -> list[int]:
        return self.chunks if self.chunks is not None else [1] * len(self.logits)

    def cut(self) -> list[bool]:
        return self.truncated if self.truncated is not None else [False] * len(self.logits)


#: Why a worker could not score a call: its own names, turned into HTTP statuses in one place
#: on the API side (api/errors.py), whatever the wire format of the call.
FailureKind = Literal["input_too_long", "instruction_not_accepted", "engine_lost", "scoring_failed"]


class Failure(BaseModel):
    """A call the worker could not score, and why."""

    kind: FailureKind
    message: str


class ScoreReply(BaseModel):
    """A worker's answer to a synchronous call: its scores, or why there are none."""

    scored: Scored | None = None
    failure: Failure | None = None

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data: Any) -> Any:
        """The flat reply of a worker older than this API (`logits`…, or `error` and `status`),
        read during a rolling upgrade: upgrade the API before the workers."""
        if not isinstance(data, dict) or "scored" in data or "failure" in data:
            return data
        if data.get("error") is not None:
            kinds = {413: "input_too_long", 503: "engine_lost"}
            return {"failure": {"kind": kinds.get(data.get("status"), "scoring_failed"), "message": data["error"]}}
        if data.get("logits") is not None:
            return {"scored": {k: data[k] for k in ("logits", "input_tokens", "chunks", "truncated") if k in data}}
        return data


class PieceTask(BaseModel):
    """What a bulk piece asks a worker: score the items of this stored input piece."""

    job_id: str
    piece: int
