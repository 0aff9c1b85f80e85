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
from shared.schemas import ErrorResponse

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_json",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation",
    429: "overloaded",
    503: "unavailable",
    504: "timeout",
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
        self.error_type = error_type or _TYPES.get(status, "error")
        self.fields = fields
        self.headers = headers or {}


def error_response(error: ApiError, *, status: int | None = None, error_type: str | None = None) -> Response:
    """The answer for `error`; a route speaking another format (TEI) may restate status and type."""
    body = ErrorResponse.of(error.message, error_type or error.error_type, error.fields)
    return answer(body, status or error.status, error.headers)


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
