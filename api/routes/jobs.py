"""Bulk reranking jobs: `POST /v1/rerank/jobs`, status, streamed results, cancel."""

from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, request, stream_with_context
from pydantic import ValidationError

from api.auth import presented_token
from api.jobs import JobService
from api.validation import invalid, parse_body, resolve_model
from shared.jobs import owner_of
from api.openapi import documented
from shared.schemas import JobCreated, JobItem, JobOptions, JobRequest, JobResultLine, JobStatus
from shared.settings import Settings

bp = Blueprint("jobs", __name__)

JSON_LINES = ("application/jsonl", "application/x-ndjson", "application/x-jsonlines", "text/jsonl")


def jobs() -> JobService:
    return current_app.extensions["jobs"]


def _token() -> str | None:
    return presented_token(request.headers.get("Authorization")) if current_app.config["SETTINGS"].tokens else None


def owner_token() -> str:
    """The owner mark of jobs created by this request (a digest of its token)."""
    return owner_of(_token())


def accepted(job) -> Response:
    response = current_app.json.response(
        id=job.id,
        status=job.status,
        status_url=f"/v1/rerank/jobs/{job.id}",
        results_url=f"/v1/rerank/jobs/{job.id}/results",
    )
    response.status_code = 202
    response.headers["Location"] = f"/v1/rerank/jobs/{job.id}"
    return response


@bp.post("/v1/rerank/jobs")
@documented(
    summary="Create a bulk rerank job (JSON body, or JSON Lines with options as query parameters)",
    body=JobRequest,
    extra_bodies={media: {"schema": {"type": "string", "description": "one JobItem per line"}}
                  for media in JSON_LINES[:2]},
    query=JobOptions,
    responses={202: JobCreated},
    schemas=(JobItem,),
    errors=(400, 404, 413, 422, 503),
    tag="jobs",
)
def create_job():
    settings: Settings = current_app.config["SETTINGS"]
    request.max_content_length = settings.max_job_bytes
    owner = owner_token()
    if request.mimetype in JSON_LINES:
        options = query_options()
        model = resolve_model(settings, options.model)
        job = jobs().create_from_lines(model, request.stream, owner=owner, options=options)
    else:
        body = parse_body(JobRequest)
        model = resolve_model(settings, body.model)
        job = jobs().create_from_items(model, ((f"items.{i}", it) for i, it in enumerate(body.items)),
                                       owner=owner, options=body)
    return accepted(job)


def query_options() -> JobOptions:
    """JobOptions from query parameters: true/false spelled as text, numbers and JSON as text."""
    raw: dict[str, object] = {}
    for key, value in request.args.items():
        text = value.strip()
        if text.lower() in ("true", "false"):
            raw[key] = text.lower() == "true"
        elif text.lstrip("-").isdigit():
            raw[key] = int(text)
        elif text.startswith("{"):
            try:
                raw[key] = json.loads(text)
            except ValueError:
                raw[key] = text
        else:
            raw[key] = text
    try:
        return JobOptions.model_validate(raw)
    except ValidationError as exc:
        raise invalid(exc, "invalid query parameters") from None


@bp.get("/v1/rerank/jobs/<job_id>")
@documented(summary="A job's status and progress", responses={200: JobStatus}, errors=(404, 503), tag="jobs")
def job_status(job_id: str):
    service = jobs()
    return service.status(service.get(job_id, _token()))


@bp.get("/v1/rerank/jobs/<job_id>/results")
@documented(
    summary="A job's results as JSON Lines in input order (finished pieces so far while it runs)",
    responses={200: {"application/jsonl": {"schema": {"type": "string",
                                                      "description": "one JobResultLine per line"}}}},
    errors=(404, 503),
    schemas=(JobResultLine,),
    tag="jobs",
)
def job_results(job_id: str):
    service = jobs()
    job = service.get(job_id, _token())
    response = Response(stream_with_context(service.result_chunks(job)), mimetype="application/jsonl")
    response.headers["X-Job-Status"] = job.status
    response.headers["X-Job-Complete"] = "true" if job.finished and service.complete_prefix(job) else "false"
    return response


@bp.delete("/v1/rerank/jobs/<job_id>")
@documented(summary="Cancel a job: no more pieces start", responses={200: JobStatus}, errors=(404, 503), tag="jobs")
def cancel_job(job_id: str):
    service = jobs()
    job = service.get(job_id, _token())
    service.store.cancel(job.id)
    return service.status(service.get(job_id, _token()))
