"""Every JSON answer leaves through here: serialized from its pydantic response model
(shared/schemas.py) in the model's field order, so what the OpenAPI document describes is what
clients get, and no handler writes an answer dict by hand.
"""

from __future__ import annotations

from collections.abc import Mapping

from flask import Response, current_app
from pydantic import BaseModel

from shared import tracing


def answer(body: BaseModel, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """`body` as JSON (UTF-8, non-ASCII text kept readable; NaN as null, never invalid JSON)."""
    with tracing.span("rerank.answer", {"rerank.schema": type(body).__name__}):
        return current_app.response_class(body.model_dump_json(), status=status, headers=dict(headers or {}),
                                          mimetype="application/json")
