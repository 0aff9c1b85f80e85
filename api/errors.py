"""Every failure leaves as JSON with the right status: `{"error", "error_type", "detail", "fields"?}`.

FastGPT treats any non-2xx as "search without rerank", so an error must never look like a 200.
The body is TEI's shape (`error`, `error_type`) with FastAPI's `detail` beside it (the same
message), which the seed server, vLLM and Infinity send and Jina-style clients (LangChain and
LlamaIndex `JinaRerank`) read; so one body serves every route and every client. Werkzeug's own
404/405/413 go through the same handler.
"""

from __future__ import annotations

import logging

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from api.answers import answer
from shared.schemas import ErrorResponse, Failure

log = logging.getLogger(__name__)

#: Each status we answer: our error_type, and TEI's (status, error_type) for `POST /rerank` with
#: `texts` (TEI answers a scoring failure 424 and names its kinds Validation, Overloaded, ...).
#: The one table of statuses: routes raise ApiError with a status, workers report a Failure
#: whose kind FAILURE_STATUS turns into one.
STATUSES: dict[int, tuple[str, tuple[int, str]]] = {
    400: ("invalid_json", (422, "Validation")),
    401: ("unauthorized", (401, "Unauthorized")),
    404: ("not_found", (422, "Validation")),
    405: ("method_not_allowed", (405, "Validation")),
    408: ("timeout", (408, "Validation")),
    413: ("payload_too_large", (413, "Validation")),
    415: ("unsupported_media_type", (415, "Validation")),
    422: ("validation", (422, "Validation")),
    429: ("overloaded", (429, "Overloaded")),
    500: ("error", (424, "Backend")),
    503: ("unavailable", (503, "Unhealthy")),
    504: ("timeout", (424, "Backend")),
}

#: A worker's Failure kind (shared/schemas.py) -> our status, and the field it is about.
FAILURE_STATUS: dict[str, tuple[int, str | None]] = {
    "input_too_long": (413, None),  # TEI's truncate: false and a text that does not fit
    "instruction_not_accepted": (422, "instruction"),  # the model's family takes no instruction
    "engine_lost": (503, None),  # the worker's engine process died; the worker restarts
    "scoring_failed": (500, None),
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        fields: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or STATUSES.get(status, ("error", None))[0]
        self.fields = fields
        self.headers = headers or {}


    @classmethod
    def of_failure(cls, failure: Failure) -> ApiError:
        """The error a worker's Failure is to the client."""
        status, field = FAILURE_STATUS.get(failure.kind, (500, None))
        fields = [{"field": field, "message": failure.message}] if field else None
        return cls(status, failure.message, fields=fields)


def error_response(error: ApiError, *, tei: bool = False) -> Response:
    """The answer for `error`; in TEI's statuses and type names for a route speaking TEI's format."""
    status, error_type = error.status, error.error_type
    if tei:
        status, error_type = STATUSES.get(error.status, ("error", (error.status, "Backend")))[1]
    return answer(ErrorResponse.of(error.message, error_type, error.fields), status, error.headers)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(error: ApiError):
        return error_response(error)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        status = error.code or 500
        message = error.description or error.name
        if status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            message = f"request body larger than {limit} bytes (MAX_REQUEST_BYTES)"
        headers = {}
        if status == 405 and getattr(error, "valid_methods", None):  # RFC 9110: a 405 names the methods
            headers["Allow"] = ", ".join(sorted(error.valid_methods))
        return error_response(ApiError(status, message, headers=headers))

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        log.exception("unhandled error")
        return error_response(ApiError(500, "internal error", error_type="internal"))
