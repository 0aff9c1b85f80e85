"""The OpenAPI 3 document, built from the routes the app really has and the pydantic models that
validate their requests: there is no second, hand-kept copy of any schema.

A view states its request and response models with `@documented(...)`; `build(app)` walks the
app's URL map, so a route added without documentation still appears (and a test notices).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from shared.schemas import ErrorResponse

REF = "#/components/schemas/{model}"

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
    body: type[BaseModel] | None = None
    extra_bodies: dict[str, dict[str, Any]] = field(default_factory=dict)
    query: type[BaseModel] | None = None
    responses: dict[int, type[BaseModel] | dict[str, Any] | None] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)
    tag: str = "rerank"
    schemas: tuple[type[BaseModel], ...] = ()  # more models for components (JSON Lines records)


def documented(**kwargs: Any) -> Callable[[Callable], Callable]:
    """Attach OpenAPI facts to a view function."""

    def mark(view: Callable) -> Callable:
        view.openapi = Doc(**kwargs)  # type: ignore[attr-defined]
        return view

    return mark


def _models(app: Flask) -> list[type[BaseModel]]:
    found: list[type[BaseModel]] = [ErrorResponse]
    for view in app.view_functions.values():
        doc: Doc | None = getattr(view, "openapi", None)
        if doc is None:
            continue
        for model in (doc.body, doc.query, *doc.responses.values(), *doc.schemas):
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
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions[rule.endpoint]
        doc: Doc = getattr(view, "openapi", None) or Doc(summary=rule.endpoint)
        path = rule.rule.replace("<", "{").replace(">", "}")
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            op: dict[str, Any] = {"summary": doc.summary, "operationId": f"{rule.endpoint}_{method.lower()}",
                                  "tags": [doc.tag], "responses": {}}
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
                content = {"application/json": {"schema": ref(doc.body, "validation")}} if doc.body else {}
                content.update(doc.extra_bodies)
                op["requestBody"] = {"required": True, "content": content}
            for status, model in (doc.responses or {200: None}).items():
                response: dict[str, Any] = {"description": _DESCRIPTIONS.get(status, "OK")}
                if isinstance(model, type):
                    response["content"] = {"application/json": {"schema": ref(model, "serialization")}}
                elif isinstance(model, dict):
                    response["content"] = model
                op["responses"][str(status)] = response
            protected = auth and (rule.rule.startswith("/v1/") or rule.rule == "/rerank"
                                  or (rule.rule == "/metrics" and not public_metrics))
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
            "description": "Rerank with BAAI bge-reranker models: FastGPT's /v1/rerank, Cohere/Jina format, "
                           "bulk jobs, TEI's /rerank.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>rerank-service API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="ui"></div>
<noscript>The API document is at <a href="openapi.json">/openapi.json</a>.</noscript>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "openapi.json", dom_id: "#ui"});</script>
</body></html>
"""
