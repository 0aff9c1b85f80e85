"""Bulk reranking jobs: `POST /v1/rerank/jobs`, status, streamed results, cancel."""

from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, request, stream_with_context
from pydantic import ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from api.auth import presented_token
from api.errors import ApiError
from api.job_inputs import (PARQUET_TYPES, CountingReader, check_input_url, drain, is_parquet, jsonl_entries,
                            lines, open_input_url, parquet_entries, spool)
from api.job_results import PARQUET, pyarrow_available
from api.job_results import parquet as parquet_results
from api.jobs import JobService
from api.openapi import documented
from api.validation import invalid, parse_body, resolve_model
from shared.jobs import owner_of
from shared.schemas import JobCreated, JobItem, JobOptions, JobRequest, JobResultLine, JobStatus, ResultsQuery
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
    summary="Create a bulk rerank job: a JSON body (items, or input_url), or a JSON Lines or Parquet "
            "upload with the options as query parameters",
    body=JobRequest,
    extra_bodies={**{media: {"schema": {"type": "string", "description": "one JobItem per line"}}
                     for media in JSON_LINES[:2]},
                  PARQUET_TYPES[0]: {"schema": {"type": "string", "format": "binary", "description":
                                     "columns id, query, documents (list of strings), top_n (optional)"}}},
    query=JobOptions,
    responses={202: JobCreated},
    schemas=(JobItem,),
    errors=(400, 403, 404, 413, 415, 422, 429, 503, 507),
    tag="jobs",
)
def create_job():
    settings: Settings = current_app.config["SETTINGS"]
    owner = owner_token()
    service = jobs()
    if request.mimetype in JSON_LINES or request.mimetype in PARQUET_TYPES:
        request.max_content_length = settings.max_job_bytes
        try:
            return accepted(_create_from_upload(settings, service, owner))
        except ApiError:
            drain(request.stream)  # the answer reaches a client still sending its body
            raise
    # A JSON body is parsed whole, so it is held to MAX_REQUEST_BYTES: larger inputs stream as JSON Lines.
    too_large = ApiError(413, f"a JSON job body may be at most {settings.max_request_bytes} bytes "
                         "(MAX_REQUEST_BYTES); send larger inputs as JSON Lines (Content-Type: "
                         f"application/jsonl) or Parquet, up to {settings.max_job_bytes} bytes (MAX_JOB_BYTES), "
                         "or name them with input_url")
    if (request.content_length or 0) > settings.max_request_bytes:
        raise too_large
    try:
        body = parse_body(JobRequest)
    except RequestEntityTooLarge:
        raise too_large from None
    model = resolve_model(settings, body.model)
    if body.items is not None:
        job = service.create_from_items(model, ((f"items.{i}", it) for i, it in enumerate(body.items)),
                                        owner=owner, options=body.options())
        return accepted(job)
    url = check_input_url(body.input_url, settings.input_prefixes)
    parquet = is_parquet(url, body.input_format)
    if parquet and not pyarrow_available():
        raise ApiError(415, "Parquet input needs pyarrow on the API server (pip install -r "
                       "requirements/parquet.txt)", error_type="unsupported_media_type")

    def url_entries():
        file = open_input_url(url)
        if parquet:
            return _closing(parquet_entries(file), file)
        return _closing(jsonl_entries(lines(CountingReader(file).blocks())), file)

    return accepted(service.create(model, url_entries, owner=owner, options=body.options()))


def _create_from_upload(settings: Settings, service: JobService, owner: str):
    """A JSON Lines or Parquet body, read as a stream; the options are query parameters."""
    parquet = request.mimetype in PARQUET_TYPES
    if parquet and not pyarrow_available():
        raise ApiError(415, "Parquet input needs pyarrow on the API server (pip install -r "
                       "requirements/parquet.txt); send JSON Lines instead", error_type="unsupported_media_type")
    options = query_options()
    model = resolve_model(settings, options.model)
    body = CountingReader(request.stream, request.content_length)

    def entries():
        if parquet:
            file = spool(body.blocks())
            return _closing(parquet_entries(file), file)
        return jsonl_entries(lines(body.blocks()))

    return service.create(model, entries, owner=owner, options=options.options(), expected_bytes=request.content_length)


def _closing(entries, file):
    try:
        yield from entries
    finally:
        file.close()


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
    summary="A job's results: JSON Lines (default) or Parquet (?format=parquet or Accept); while it runs, "
            "every finished piece so far, in input order",
    query=ResultsQuery,
    responses={200: {"application/jsonl": {"schema": {"type": "string",
                                                      "description": "one JobResultLine per line"}},
                     PARQUET: {"schema": {"type": "string", "format": "binary"}}}},
    errors=(404, 422, 503),
    schemas=(JobResultLine,),
    tag="jobs",
)
def job_results(job_id: str):
    service = jobs()
    job = service.get(job_id, _token())
    try:
        query = ResultsQuery.model_validate(request.args.to_dict())
    except ValidationError as exc:
        raise invalid(exc, "invalid query parameters") from None
    wanted = query.format or ("parquet" if request.accept_mimetypes.best_match(
        ["application/jsonl", PARQUET], default="application/jsonl") == PARQUET else "jsonl")
    complete = service.complete(job)
    if wanted == "parquet":
        if not pyarrow_available():
            raise ApiError(422, "results as Parquet need pyarrow on the API server (pip install -r "
                           "requirements/parquet.txt); ask for JSON Lines instead", error_type="validation")
        pieces, first = service.finished_pieces(job, query.start)
        chunks = parquet_results(service.storage, job.id, pieces, query.start if query.start > first else 0)
        response = Response(stream_with_context(chunks), mimetype=PARQUET)
    else:
        response = Response(stream_with_context(service.result_chunks(job, query.start)), mimetype="application/jsonl")
    response.headers["X-Job-Status"] = job.status
    response.headers["X-Job-Complete"] = "true" if complete else "false"
    return response


@bp.delete("/v1/rerank/jobs/<job_id>")
@documented(summary="Cancel a job in flight (no more pieces start, running ones stop); delete an ended one",
            responses={200: JobStatus}, errors=(404, 503), tag="jobs")
def cancel_job(job_id: str):
    service = jobs()
    return service.cancel_or_delete(service.get(job_id, _token()))
