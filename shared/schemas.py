"""Request, response and task models: the single source for validation and for the OpenAPI document.

The wire formats are FastGPT's and Cohere/Jina's (see docs/CONTRACT notes in README.md). Fields a
client may send that we do not know are ignored, as the seed server and Cohere do.
"""

from __future__ import annotations

from typing import Annotated

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextDocument(_Lenient):
    """Cohere/Jina style document object."""

    text: StrictStr


class Chunking(_Lenient):
    """Score a long document by its best window instead of its first max_length tokens."""

    overlap: Annotated[int, Field(default=32, ge=0, le=4096, description="Tokens shared by neighbour windows.")]
    max_chunks: Annotated[int, Field(default=64, ge=1, le=1024, description="Most windows per document.")]


class LongDocuments(_Lenient):
    """Options for documents longer than the model's max_length (shared by /v1/rerank and /rerank)."""

    truncation_direction: Literal["right", "left"] = Field(
        default="right", description="Which end to cut (TEI): right keeps the start, left keeps the end."
    )
    max_tokens_per_doc: Annotated[int | None, Field(
        default=None, ge=1, description="Cohere v2: cut each document to this many tokens first.")]
    max_chunks_per_doc: Annotated[int | None, Field(
        default=None, ge=1, le=1024, description="Cohere: score up to this many windows, keep the best.")]
    chunking: StrictBool | Chunking | None = Field(
        default=None, description="Best-window scoring: true, or {overlap, max_chunks}.")
    return_chunks: StrictBool = Field(default=False, description="Say how many windows each document used.")

    def score_options(self, truncate: bool = True) -> ScoreOptions:
        chunk = self.chunking if isinstance(self.chunking, Chunking) else Chunking() if self.chunking else None
        if chunk is None and self.max_chunks_per_doc is not None:
            chunk = Chunking()
        if chunk is not None and self.max_chunks_per_doc is not None:
            chunk = Chunking(overlap=chunk.overlap, max_chunks=self.max_chunks_per_doc)
        return ScoreOptions(
            direction=self.truncation_direction,
            max_doc_tokens=self.max_tokens_per_doc,
            chunk_overlap=chunk.overlap if chunk else None,
            max_chunks=chunk.max_chunks if chunk else 64,
            truncate=truncate,
        )


class RerankRequest(LongDocuments):
    """`POST /v1/rerank`: FastGPT's body plus the Cohere/Jina options."""

    model: StrictStr | None = Field(
        default=None, description="Served model name or its Hugging Face id; optional with one model."
    )
    query: Annotated[StrictStr, Field(min_length=1, description="The search query.")]
    documents: Annotated[
        list[StrictStr | TextDocument],
        Field(min_length=1, description="Texts to rank, as strings or {\"text\": ...} objects."),
    ]
    top_n: Annotated[int | None, Field(default=None, ge=1, description="Keep the best N results.")]
    return_documents: StrictBool = Field(default=False, description="Echo each document's text.")
    raw_scores: StrictBool = Field(
        default=False, description="Return the model's logits instead of sigmoid scores in [0, 1]."
    )

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResultDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float
    document: RerankResultDocument | None = None
    chunks: int | None = Field(default=None, description="Windows scored (with return_chunks).")


class TokenCount(BaseModel):
    input_tokens: int


class Meta(BaseModel):
    tokens: TokenCount


class Usage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    """Sorted by relevance, high to low; ties keep input order."""

    id: str
    model: str
    results: list[RerankResult]
    meta: Meta
    usage: Usage = Field(description="Jina's name for meta.tokens.")


class ErrorResponse(BaseModel):
    """Every error, whatever the status: what went wrong, its kind, and for invalid input where."""

    error: str
    error_type: str
    fields: list[dict[str, str]] | None = None


# --- operations -------------------------------------------------------------------------------------


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    status: str = Field(description="ready or unavailable")
    redis: str
    models: dict[str, dict[str, int]] = Field(description="Live workers per served model.")
    missing: list[str]


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    source: str = Field(description="Hugging Face id or folder the weights come from.")
    max_length: int
    workers: int = Field(description="Live workers (from their heartbeats).")
    devices: list[str]
    dtypes: list[str]
    pairs_per_second: float | None = Field(description="Measured pace of the live workers together.")


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


# --- bulk jobs --------------------------------------------------------------------------------------


class JobItem(_Lenient):
    """One (query, documents) item of a bulk job: a JSON `items` entry or one JSON Lines line."""

    id: StrictStr | int | None = Field(default=None, description="Your id, echoed in the results.")
    query: Annotated[StrictStr, Field(min_length=1)]
    documents: Annotated[list[StrictStr | TextDocument], Field(min_length=1)]
    top_n: Annotated[int | None, Field(default=None, ge=1)]

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class JobOptions(LongDocuments):
    """Options of a job (the long-document ones as in /v1/rerank); for a JSON Lines upload they
    come as query parameters."""

    model: StrictStr | None = None
    return_documents: StrictBool = False
    raw_scores: StrictBool = False


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
    """How documents longer than max_length are handled (the defaults are FlagEmbedding's)."""

    direction: Literal["right", "left"] = "right"
    max_doc_tokens: int | None = None
    chunk_overlap: int | None = None
    max_chunks: int = 64
    truncate: bool = True


class ScoreTask(BaseModel):
    """What a synchronous call asks a worker: score these documents against this query."""

    call_id: str
    request_id: str
    query: str
    documents: list[str]
    deadline: float = Field(description="Unix time after which nobody waits for the answer.")
    options: ScoreOptions = ScoreOptions()


class ScoreReply(BaseModel):
    """A worker's answer: a logit per document in input order (the best window's when chunked),
    or an error with the HTTP status it deserves."""

    logits: list[float] | None = None
    chunks: list[int] | None = None
    truncated: list[bool] | None = None  # chunked documents longer than their windows
    input_tokens: int = 0
    error: str | None = None
    status: int | None = None


class PieceTask(BaseModel):
    """What a bulk piece asks a worker: score the items of this stored input piece."""

    job_id: str
    piece: int
