"""What operators and load balancers read: liveness, readiness, models, metrics, API document."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from api import metrics, openapi
from api.openapi import documented
from shared import redis_state
from shared.schemas import HealthResponse, ModelList, ReadyResponse
from shared.settings import Settings

bp = Blueprint("ops", __name__)


@bp.get("/health")
@documented(summary="Liveness: the API process answers (touches nothing else)", responses={200: HealthResponse},
            tag="operations")
def health():
    return jsonify(status="ok")


@bp.get("/ready")
@documented(summary="Readiness: Redis takes writes and every served model has a live worker",
            responses={200: ReadyResponse, 503: ReadyResponse}, tag="operations")
def ready():
    settings: Settings = current_app.config["SETTINGS"]
    dispatcher = current_app.extensions["dispatcher"]
    state = redis_state.probe(dispatcher.redis)  # a write: PING passes while writes are refused
    try:
        counts = {s.name: len(dispatcher.workers.alive(s.name)) for s in settings.served_models}
    except Exception:  # noqa: BLE001 - any Redis failure means "not ready"
        counts = {}
    models = {name: {"workers": n} for name, n in counts.items()}
    if not state.ok:
        body = {"status": "unavailable", "redis": state.state, "models": models, "missing": ["redis"],
                "reason": state.reason}
        return jsonify(body), 503
    missing = [name for name, n in counts.items() if n == 0]
    body = {"status": "unavailable" if missing else "ready", "redis": "ok", "models": models,
            "missing": [f"worker for {name}" for name in missing]}
    return jsonify(body), 503 if missing else 200


@bp.get("/v1/models")
@documented(summary="Served models with their live workers", responses={200: ModelList}, errors=(503,),
            tag="operations")
def models():
    settings: Settings = current_app.config["SETTINGS"]
    dispatcher = current_app.extensions["dispatcher"]
    data = []
    for spec in settings.served_models:
        workers = dispatcher.workers.alive(spec.name)
        data.append({
            "id": spec.name,
            "object": "model",
            "source": spec.source,
            "max_length": spec.max_length,
            "workers": len(workers),
            "devices": sorted({w.get("device", "?") for w in workers}),
            "dtypes": sorted({w.get("dtype", "?") for w in workers}),
            "pairs_per_second": round(sum(w.get("pairs_per_second") or 0 for w in workers), 2) or None,
        })
    return jsonify(object="list", data=data)


@bp.get("/metrics")
@documented(summary="Prometheus metrics of the API, the queues and the workers",
            responses={200: {"text/plain": {"schema": {"type": "string"}}}}, tag="operations")
def prometheus():
    body = metrics.exposition(current_app.extensions["cluster_metrics"])
    return Response(body, mimetype="text/plain; version=0.0.4; charset=utf-8")


@bp.get("/openapi.json")
@documented(summary="This OpenAPI document", responses={200: {"application/json": {"schema": {"type": "object"}}}},
            tag="operations")
def openapi_json():
    settings: Settings = current_app.config["SETTINGS"]
    return jsonify(openapi.build(current_app, auth=bool(settings.tokens), public_metrics=not settings.metrics_auth))


@bp.get("/docs")
@documented(summary="Human-readable API documentation (Swagger UI)",
            responses={200: {"text/html": {"schema": {"type": "string"}}}}, tag="operations")
def docs():
    return Response(openapi.DOCS_PAGE, mimetype="text/html")
