"""What operators and load balancers read: liveness, readiness, models, metrics, API document."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, current_app
from flask_swagger_ui import get_swaggerui_blueprint
from prometheus_client import CONTENT_TYPE_LATEST

from api import metrics, openapi
from api.answers import answer
from api.errors import ApiError
from api.openapi import documented
from shared import redis_state
from shared.schemas import EngineCard, HealthResponse, ModelCard, ModelList, ReadyResponse
from shared.settings import ModelSpec, Settings
from shared.workers import per_engine

bp = Blueprint("ops", __name__)

DOCS_URL = "/docs"


@bp.get("/health")
@documented(summary="Liveness: the API process answers (touches nothing else)", responses={200: HealthResponse},
            tag="operations")
def health():
    return answer(HealthResponse(status="ok"))


@bp.get("/ready")
@documented(summary="Readiness: Redis takes writes and every served model has a live worker",
            responses={200: ReadyResponse, 503: ReadyResponse}, tag="operations")
def ready():
    settings: Settings = current_app.config["SETTINGS"]
    dispatcher = current_app.extensions["dispatcher"]
    state = redis_state.probe(dispatcher.redis)  # a write: PING passes while writes are refused
    try:
        live = {s.name: dispatcher.workers.alive(s.name) for s in settings.served_models}
    except Exception:  # noqa: BLE001 - any Redis failure means "not ready"
        live = {}
    counts = {name: len(workers) for name, workers in live.items()}
    models = {name: {"workers": len(workers), "engines": len(per_engine(workers))} for name, workers in live.items()}
    if not state.ok:
        return answer(ReadyResponse(status="unavailable", redis=state.state, models=models, missing=["redis"],
                                    detail=state.reason), 503)
    missing = [f"worker for {name}" for name, n in counts.items() if n == 0]
    body = ReadyResponse(status="unavailable" if missing else "ready", redis="ok", models=models, missing=missing,
                         detail=f"no live {', '.join(missing)}" if missing else None)
    return answer(body, 503 if missing else 200)


def _card(spec: ModelSpec) -> ModelCard:
    workers = current_app.extensions["dispatcher"].workers.alive(spec.name)
    engines = per_engine(workers)
    return ModelCard(
        id=spec.name,
        source=spec.source,
        max_length=spec.max_length,
        family=next((w["family"] for w in workers if w.get("family")), spec.family),
        context_length=next((w["context_length"] for w in workers if w.get("context_length")), spec.max_length),
        workers=len(workers),
        engines=[EngineCard(id=str(e.get("engine_id") or e.get("id")), device=str(e.get("device", "?")),
                            feeders=e["feeders"], pid=e.get("engine_pid"), host=e.get("host"),
                            memory_mib=e.get("engine_memory_mib"), shared=bool(e.get("engine_shared")))
                 for e in engines],
        devices=sorted({w.get("device", "?") for w in workers}),
        dtypes=sorted({w.get("dtype", "?") for w in workers}),
        dtype_reasons=sorted({w["dtype_reason"] for w in workers if w.get("dtype_reason")}),
        pairs_per_second=round(sum(w.get("pairs_per_second") or 0 for w in workers), 2) or None,
        capacity=round(sum(e.get("capacity") or 0 for e in engines), 1) or None,
        backends=sorted({w["backend"] for w in workers if w.get("backend")}),
        backend_reasons=sorted({w["backend_reason"] for w in workers if w.get("backend_reason")}),
        graph_memory_mib=max((w.get("graph_memory_mib") or 0 for w in workers), default=0) or None,
        simulated=any(w.get("simulated") for w in workers),
    )


@bp.get("/v1/models")
@documented(summary="Served models with their live workers", responses={200: ModelList}, errors=(503,),
            tag="operations")
def models():
    settings: Settings = current_app.config["SETTINGS"]
    return answer(ModelList(data=[_card(spec) for spec in settings.served_models]))


@bp.get("/v1/models/<path:model_id>")
@documented(summary="One served model, by its name or Hugging Face id (OpenAI's model lookup)",
            responses={200: ModelCard}, errors=(404, 503), tag="operations")
def model_card(model_id: str):
    settings: Settings = current_app.config["SETTINGS"]
    spec = next((s for s in settings.served_models if model_id in s.aliases), None)
    if spec is None:
        served = ", ".join(s.name for s in settings.served_models)
        raise ApiError(404, f"model {model_id!r} is not served; served models: {served}")
    return answer(_card(spec))


@bp.get("/metrics")
@documented(summary="Prometheus metrics of the API, the queues and the workers",
            responses={200: {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}, tag="operations")
def prometheus():
    body = metrics.exposition(current_app.extensions["cluster_metrics"])
    # The header exactly as prometheus-client states it: `mimetype=` would add a second charset,
    # which Prometheus 3 refuses as a duplicate parameter.
    return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@bp.get("/openapi.json")
@documented(summary="This OpenAPI document", responses={200: {"application/json": {"schema": {"type": "object"}}}},
            tag="operations")
def openapi_json():
    settings: Settings = current_app.config["SETTINGS"]
    return current_app.json.response(
        openapi.build(current_app, auth=bool(settings.tokens), public_metrics=not settings.metrics_auth))


def register_docs(app: Flask) -> None:
    """Swagger UI at /docs, its scripts and styles served from the flask-swagger-ui package (no
    CDN: the page works on an air-gapped GPU node)."""
    app.register_blueprint(get_swaggerui_blueprint(
        DOCS_URL, "/openapi.json",
        # validatorUrl: Swagger UI would otherwise send the document to validator.swagger.io.
        config={"app_name": "rerank-service API", "validatorUrl": None},
    ))
    for endpoint, view in app.view_functions.items():
        if endpoint.startswith("swagger_ui."):
            view.openapi = openapi.Doc(summary="Swagger UI (page and static files)", hidden=True)
