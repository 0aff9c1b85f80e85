"""The Flask app factory: settings in one place, the task client built from them, thin routes.

Nothing here imports torch: the API only validates, dispatches to Redis and shapes answers.
"""

from __future__ import annotations

import logging
import re
import uuid

from flask import Flask, current_app, g, request

from api.auth import require_token
from api.dispatch import Dispatcher
from api.errors import register_error_handlers
from api.jobs import JobService
from api.routes import health, jobs, rerank
from shared.settings import Settings, get_settings

log = logging.getLogger("api")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    app = Flask(__name__, static_folder=None)
    app.config.update(SETTINGS=settings, MAX_CONTENT_LENGTH=settings.max_request_bytes)
    app.json.sort_keys = False  # keep fields in the order of the response models
    app.json.ensure_ascii = False  # Chinese documents come back readable and smaller
    dispatcher = Dispatcher(settings)
    app.extensions["dispatcher"] = dispatcher
    app.extensions["jobs"] = JobService(settings, dispatcher.redis, dispatcher.celery, dispatcher.workers)

    register_error_handlers(app)

    @app.before_request
    def _identify() -> None:
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        if request.path.startswith("/v1/"):
            require_token(request.headers.get("Authorization"), current_app.config["SETTINGS"].tokens)

    @app.after_request
    def _tag(response):
        response.headers["X-Request-Id"] = g.get("request_id", "")
        return response

    app.register_blueprint(health.bp)
    app.register_blueprint(rerank.bp)
    app.register_blueprint(jobs.bp)

    if not settings.tokens:
        log.warning(
            "ACCESS_TOKEN is not set: the API is OPEN, anyone who reaches port %d can use it",
            settings.port,
        )
    return app
