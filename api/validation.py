"""Request bodies validated by the pydantic models in shared/schemas.py.

Malformed JSON is a 400; JSON that does not fit the model is a 422 that names each bad field.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

from flask import request
from pydantic import BaseModel, RootModel, ValidationError

from api.errors import ApiError
from shared import tracing
from shared.settings import ModelSpec, Settings

M = TypeVar("M", bound=BaseModel)


def _where(loc: tuple[object, ...]) -> str:
    return ".".join(str(part) for part in loc) or "body"


# Every escape in a JSON string, so pairs are read in order: a surrogate pair (kept), a lone
# surrogate (replaced), or any other escape such as an escaped backslash (kept, and skipped over).
_ESCAPE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
                     rb"|(\\u[dD][89a-fA-F][0-9a-fA-F]{2})|\\.", re.DOTALL)


def replace_lone_surrogates(body: bytes) -> bytes:
    r"""`"\ud800"` (half of a UTF-16 pair, alone) is valid JSON that no UTF-8 text can hold: Python's
    json reads it, pydantic's parser refuses it. Clients that cut strings by UTF-16 units send it;
    the text is still worth scoring, so the half becomes U+FFFD, the replacement character."""
    return _ESCAPE.sub(lambda m: rb"\ufffd" if m.group(1) else m.group(0), body)


def parse_body(model: type[M]) -> M:
    with tracing.span("rerank.validate", {"rerank.schema": model.__name__}):
        return _parse_body(model)


def _parse_body(model: type[M]) -> M:
    try:
        body = request.get_data(cache=False)  # over MAX_CONTENT_LENGTH: 413 before we read it
    except OSError:  # the client stopped sending for CLIENT_TIMEOUT seconds (api/http_worker.py)
        raise ApiError(408, "the request body stopped arriving (CLIENT_TIMEOUT)",
                       error_type="timeout") from None
    try:
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            repaired = replace_lone_surrogates(body) if _is_json_invalid(exc) else body
            if repaired == body:
                raise
            return model.model_validate_json(repaired)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            detail = errors[0]["ctx"].get("error", "") if errors[0].get("ctx") else ""
            raise ApiError(400, f"request body is not valid JSON: {detail}".rstrip(": ")) from None
        if any(e["type"] in ("model_type", "dict_type") and not e["loc"] for e in errors):
            raise ApiError(422, "request body must be a JSON object") from None
        raise invalid(exc, "invalid request") from None


def _is_json_invalid(exc: ValidationError) -> bool:
    return any(e["type"] == "json_invalid" for e in exc.errors(include_input=False, include_url=False))


class JsonObject(RootModel[dict[str, Any]]):
    """Any JSON object: for a route that picks the model of its body by what the body holds."""


def validate(model: type[M], data: dict[str, Any]) -> M:
    """`data` (already parsed JSON) as `model`, or the 422 naming each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc, "invalid request") from None


def invalid(exc: ValidationError, what: str) -> ApiError:
    """The 422 for a pydantic error: every bad field named, the first five in the message."""
    fields = [{"field": _where(e["loc"]), "message": e["msg"]}
              for e in exc.errors(include_input=False, include_url=False)]
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
    return ApiError(422, f"{what}: {summary}", fields=fields)


def resolve_model(settings: Settings, name: str | None) -> ModelSpec:
    """The served model a request names (any name when only one is served), else 404."""
    spec = settings.model(name)
    if spec is None:
        served = [s.name for s in settings.served_models]
        raise ApiError(404, f"model {name!r} is not served; served models: {', '.join(served)}")
    return spec
