"""The Flask app factory: settings in one place, the task client built from them, thin routes.

Nothing here imports torch: the API only validates, dispatches to Redis and shapes answers.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

import redis
from flask import Flask, current_app, g, request
from kombu.exceptions import OperationalError

from api import metrics
from api.admission import pending_limit
from api.auth import needs_token, require_token
from api.dispatch import Dispatcher, redis_error
from api.errors import error_response, register_error_handlers
from api.jobs import JobService
from api.routes import jobs, ops, rerank, score, tei
from shared import tracing
from shared.cluster_metrics import ClusterCollector
from shared.logs import request_id
from shared.settings import Settings, get_settings

log = logging.getLogger("api")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def create_app(settings: Settings | None = None, dispatcher: Dispatcher | None = None) -> Flask:
    """The API. `dispatcher` (default: one built from `settings`) is what scores a call; the
    tests hand it one that answers in-process, to check validation, auth and error shapes
    without Redis or a worker (tests/fakes.py)."""
    settings = settings or get_settings()
    app = Flask(__name__, static_folder=None)
    app.config.update(SETTINGS=settings, MAX_CONTENT_LENGTH=settings.max_request_bytes)
    app.json.sort_keys = False  # keep fields in the order of the response models
    app.json.ensure_ascii = False  # Chinese documents come back readable and smaller
    tracing.setup("rerank-api")  # in each gunicorn worker (the app is built after the fork)
    tracing.instrument_flask(app)  # first, so the steps below are inside the request's span
    dispatcher = dispatcher or Dispatcher(settings)
    app.extensions["dispatcher"] = dispatcher
    app.extensions["jobs"] = JobService(settings, dispatcher.redis, dispatcher.celery, dispatcher.workers)
    app.extensions["cluster_metrics"] = ClusterCollector(dispatcher.redis, settings, limit=lambda alive: pending_limit(
        settings.max_pending_tokens, alive, settings.sync_timeout))

    register_error_handlers(app)

    @app.errorhandler(redis.RedisError)
    @app.errorhandler(OperationalError)
    def _redis_failed(exc: Exception):
        """Any route (jobs, models) that meets Redis down, full or out of memory: a 503 naming it."""
        return error_response(redis_error(exc))

    @app.before_request
    def _identify() -> None:
        g.started = time.perf_counter()
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        request_id.set(g.request_id)
        tracing.current().set_attribute("rerank.request_id", g.request_id)
        conf: Settings = current_app.config["SETTINGS"]
        if needs_token(request.path, metrics_auth=conf.metrics_auth):
            with tracing.span("rerank.auth"):
                require_token(request.headers.get("Authorization"), conf.tokens)

    @app.after_request
    def _tag(response):
        response.headers["X-Request-Id"] = g.get("request_id", "")
        route = request.url_rule.rule if request.url_rule else "<unmatched>"
        metrics.observe(route, request.method, response.status_code, time.perf_counter() - g.get("started", 0))
        return response

    app.register_blueprint(ops.bp)
    app.register_blueprint(rerank.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(tei.bp)
    app.register_blueprint(score.bp)
    ops.register_docs(app)

    log.info("configuration: %s", json.dumps(settings.redacted(), default=str))
    if not settings.tokens:
        log.warning(
            "ACCESS_TOKEN is not set: the API is OPEN, anyone who reaches port %d can use it",
            settings.port,
        )
    return app
