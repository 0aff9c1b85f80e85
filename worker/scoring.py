"""From a call's resolved options to the engine and back, for realtime calls and bulk pieces alike.

The one place that derives the engine's DocumentPolicy from the API's ScoreOptions
(shared/schemas.py), hands the encoder an instruction, turns the engine's Scores into the Scored
the API ranks, and names what went wrong: the worker's errors leave as a Failure kind, which the
API maps to an HTTP status in one place (api/errors.py FAILURE_STATUS), whatever the wire format.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine import DocumentPolicy, Encoded, InputTooLong, InstructionNotAccepted, Scores
from engine.errors import EngineFailed
from shared.schemas import Failure, FailureKind, ScoreOptions, Scored
from worker.context import WorkerContext


def policy_of(options: ScoreOptions, max_chunks: int) -> DocumentPolicy:
    """The engine's document policy for a call's options; windows per document are capped by MAX_CHUNKS."""
    return DocumentPolicy(direction=options.direction, max_doc_tokens=options.max_doc_tokens,
                          chunk_overlap=options.chunk_overlap,
                          max_chunks=min(options.max_chunks or max_chunks, max_chunks), truncate=options.truncate)


def encode(ctx: WorkerContext, query: str, documents: Sequence[str], options: ScoreOptions) -> Encoded:
    """Pair inputs of one (query, documents) call under its options."""
    encoder = ctx.engine.encoder
    policy = policy_of(options, ctx.settings.max_chunks)
    return encoder.encode(query, documents, policy, instruction=options.instruction)


def encode_many(ctx: WorkerContext, requests: Sequence[tuple[str, Sequence[str]]],
                options: ScoreOptions) -> list[Encoded]:
    """Pair inputs of several calls under the same options (a bulk piece's items), tokenized together."""
    encoder = ctx.engine.encoder
    policy = policy_of(options, ctx.settings.max_chunks)
    return encoder.encode_many(requests, policy, instruction=options.instruction)


def scored(scores: Scores) -> Scored:
    """The engine's numpy answer as the API's Scored."""
    return Scored(
        logits=scores.logits.tolist(), input_tokens=scores.input_tokens,
        chunks=scores.chunks.tolist() if scores.chunks is not None else None,
        truncated=scores.truncated.tolist() if scores.truncated is not None else None,
    )


#: The worker's errors by kind, most specific first; anything else is "scoring_failed".
FAILURES: tuple[tuple[type[BaseException], FailureKind], ...] = (
    (InstructionNotAccepted, "instruction_not_accepted"),
    (InputTooLong, "input_too_long"),
    (EngineFailed, "engine_lost"),
)


def failure_of(exc: BaseException) -> Failure:
    """What the caller is told of `exc`."""
    for kind_of, kind in FAILURES:
        if isinstance(exc, kind_of):
            message = f"the worker lost its engine: {exc}" if kind == "engine_lost" else str(exc)
            return Failure(kind=kind, message=message)
    return Failure(kind="scoring_failed", message=f"scoring failed: {type(exc).__name__}: {exc}")
