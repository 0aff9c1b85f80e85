"""Request, response and task models: the single source for validation and for the OpenAPI document.

The wire formats are FastGPT's and Cohere/Jina's (see docs/CONTRACT notes in README.md). Fields a
client may send that we do not know are ignored, as the seed server and Cohere do.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextDocument(_Lenient):
    """Cohere/Jina style document object."""

    text: StrictStr


class RerankRequest(_Lenient):
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


# --- between the API and the workers (JSON through Redis) -----------------------------------------


class ScoreTask(BaseModel):
    """What a synchronous call asks a worker: score these documents against this query."""

    call_id: str
    request_id: str
    query: str
    documents: list[str]
    deadline: float = Field(description="Unix time after which nobody waits for the answer.")


class ScoreReply(BaseModel):
    """A worker's answer: logits in input order, or an error with the HTTP status it deserves."""

    logits: list[float] | None = None
    input_tokens: int = 0
    error: str | None = None
    status: int | None = None
