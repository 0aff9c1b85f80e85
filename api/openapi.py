"""The OpenAPI 3 document, built from the routes the app really has and the pydantic models that
validate their requests: there is no second, hand-kept copy of any schema.

A view states its request and response models with `@documented(...)`; `build(app)` walks the
app's URL map, so a route added without documentation still appears (and a test notices). Only
views marked `hidden` (the Swagger UI page's static files) are left out: they are not API.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api.auth import needs_token
from shared.schemas import ErrorResponse

REF = "#/components/schemas/{model}"
_ARGUMENT = re.compile(r"<(?:[^<>:]+:)?([^<>]+)>")  # <name> or <converter:name>

_DESCRIPTIONS = {
    200: "OK", 202: "Accepted: a job was created", 400: "Malformed JSON", 401: "Missing or invalid bearer token",
    404: "Not found", 405: "Method not allowed", 413: "Too many documents or too large a body",
    422: "Invalid fields (the error names them)", 429: "Overloaded: retry after `Retry-After` seconds",
    424: "Scoring failed (TEI's status)", 500: "Scoring failed", 503: "No worker for the model, or Redis unreachable",
    504: "No answer within SYNC_TIMEOUT",
}


@dataclass
class Doc:
    summary: str
    body: type[BaseModel] | tuple[type[BaseModel], ...] | None = None  # a tuple: one of these bodies
    extra_bodies: dict[str, dict[str, Any]] = field(default_factory=dict)
    query: type[BaseModel] | None = None
    # status -> a model, a tuple of models (one of them), a raw content object, or None
    responses: dict[int, type[BaseModel] | tuple[type[BaseModel], ...] | dict[str, Any] | None] = field(
        default_factory=dict)
    errors: tuple[int, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)
    tag: str = "rerank"
    schemas: tuple[type[BaseModel], ...] = ()  # more models for components (JSON Lines records)
    hidden: bool = False  # not part of the API (static files)


def openapi_path(rule: str) -> str:
    """Flask's `/v1/models/<path:model_id>` as OpenAPI's `/v1/models/{model_id}`."""
    return _ARGUMENT.sub(r"{\1}", rule)


def documented(**kwargs: Any) -> Callable[[Callable], Callable]:
    """Attach OpenAPI facts to a view function."""

    def mark(view: Callable) -> Callable:
        view.openapi = Doc(**kwargs)  # type: ignore[attr-defined]
        return view

    return mark


def _each(*entries: Any) -> Iterator[Any]:
    """The entries, with a tuple (one of several models) spread out."""
    for entry in entries:
        yield from entry if isinstance(entry, tuple) else (entry,)


def _models(app: Flask) -> list[type[BaseModel]]:
    found: list[type[BaseModel]] = [ErrorResponse]
    for view in app.view_functions.values():
        doc: Doc | None = getattr(view, "openapi", None)
        if doc is None:
            continue
        for model in _each(doc.body, doc.query, *doc.responses.values(), *doc.schemas):
            if isinstance(model, type) and issubclass(model, BaseModel) and model not in found:
                found.append(model)
    return found


def build(app: Flask, *, auth: bool, public_metrics: bool = True) -> dict[str, Any]:
    models = _models(app)
    keys = [(m, mode) for m in models for mode in ("validation", "serialization")]
    refs, schemas = models_json_schema(keys, ref_template=REF)

    def ref(model: type[BaseModel], mode: str) -> dict[str, Any]:
        return refs[(model, mode)]

    paths: dict[str, dict[str, Any]] = {}
    op_ids: set[str] = set()
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions[rule.endpoint]
        doc: Doc = getattr(view, "openapi", None) or Doc(summary=rule.endpoint)
        if doc.hidden:
            continue
        path = openapi_path(rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            op_id = f"{rule.endpoint}_{method.lower()}"
            if op_id in op_ids:  # one view behind several paths (/score and /v1/score)
                op_id = re.sub(r"\W+", "_", f"{rule.endpoint}{path}_{method.lower()}")
            op_ids.add(op_id)
            op: dict[str, Any] = {"summary": doc.summary, "operationId": op_id, "tags": [doc.tag],
                                  "responses": {}}
            params = [{"name": arg, "in": "path", "required": True, "schema": {"type": "string"}}
                      for arg in rule.arguments]
            if doc.query is not None:
                for name, f in doc.query.model_fields.items():
                    schema = ref(doc.query, "validation")
                    prop = schemas["$defs"][schema["$ref"].rsplit("/", 1)[-1]]["properties"][name]
                    params.append({"name": name, "in": "query", "required": False, "schema": prop,
                                   "description": f.description or ""})
            params += [{"name": h, "in": "header", "required": False, "schema": {"type": "string"},
                        "description": d} for h, d in doc.headers.items()]
            if params:
                op["parameters"] = params
            if doc.body is not None or doc.extra_bodies:
                content = {}
                if isinstance(doc.body, tuple):
                    content["application/json"] = {"schema": {
                        "oneOf": [ref(b, "validation") for b in doc.body]}}
                elif doc.body is not None:
                    content["application/json"] = {"schema": ref(doc.body, "validation")}
                content.update(doc.extra_bodies)
                op["requestBody"] = {"required": True, "content": content}
            for status, model in (doc.responses or {200: None}).items():
                response: dict[str, Any] = {"description": _DESCRIPTIONS.get(status, "OK")}
                if isinstance(model, type):
                    response["content"] = {"application/json": {"schema": ref(model, "serialization")}}
                elif isinstance(model, tuple):
                    response["content"] = {"application/json": {"schema": {
                        "oneOf": [ref(m, "serialization") for m in model]}}}
                elif isinstance(model, dict):
                    response["content"] = model
                op["responses"][str(status)] = response
            protected = auth and needs_token(rule.rule, metrics_auth=not public_metrics)
            errors = set(doc.errors) | ({401} if protected else set()) | {405}
            for status in sorted(errors):
                op["responses"][str(status)] = {
                    "description": _DESCRIPTIONS.get(status, "Error"),
                    "content": {"application/json": {"schema": ref(ErrorResponse, "serialization")}},
                }
            if protected:
                op["security"] = [{"bearer": []}]
            paths.setdefault(path, {})[method.lower()] = op

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "rerank-service",
            "version": "1.0",
            "description": "Rerank with BAAI bge-reranker models: FastGPT's /v1/rerank, the Cohere v1/v2, "
                           "Jina, vLLM and Infinity formats, TEI's /rerank, vLLM's /score, bulk jobs. Every "
                           "error is `{error, error_type, detail, fields?}`.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
