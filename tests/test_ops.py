"""Operating the service: health, readiness, models, metrics, OpenAPI, request ids, logs, workers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import redis
import requests

from rerank.launch import free_port, visible_gpus, worker_plan
from shared.settings import Settings
from shared.workers import WorkerRegistry
from tests.conftest import TOKENS
from tests.procs import ROOT, base_env, start_api, start_worker, wait_for

pytestmark = pytest.mark.stack

AUTH = {"Authorization": f"Bearer {TOKENS[0]}"}


def test_health_and_ready_are_public(api):
    assert requests.get(api.url + "/health", timeout=5).json() == {"status": "ok"}
    r = requests.get(api.url + "/ready", timeout=5)
    assert r.status_code == 200, r.text
    assert r.json()["models"]["tiny"]["workers"] >= 1 and r.json()["missing"] == []


def test_ready_is_503_naming_what_is_missing(multi_api, stack_env, log_dir):
    r = requests.get(multi_api.url + "/ready", timeout=5)
    assert r.status_code == 503
    assert r.json()["missing"] == ["worker for spare"] and r.json()["redis"] == "ok"
    env = dict(stack_env, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    proc, url = start_api("api-ready-no-redis", env, log_dir)
    try:
        r = requests.get(url + "/ready", timeout=10)
        assert r.status_code == 503 and r.json()["redis"] == "unreachable"
    finally:
        proc.stop()


def test_models_lists_workers_devices_and_needs_the_token(api):
    assert requests.get(api.url + "/v1/models", timeout=5).status_code == 401
    r = requests.get(api.url + "/v1/models", headers=AUTH, timeout=5)
    assert r.status_code == 200
    (card,) = r.json()["data"]
    assert card["id"] == "tiny" and card["workers"] >= 1 and card["max_length"] == 512
    assert card["devices"] == ["cpu"] and card["dtypes"] == ["float32"]
    assert card["source"].endswith("tiny")
    assert card["backends"] == ["torch eager"] and card["capacity"] > 0 and card["simulated"] is False


def test_metrics_cover_api_queues_and_workers(api):
    api.post("/v1/rerank", {"query": "metrics", "documents": ["a", "b", "c"]})
    api.post("/v1/rerank", {"query": ""})  # a 422

    def scrape():
        text = requests.get(api.url + "/metrics", timeout=5).text
        return text if "rerank_batch_size_bucket" in text else None

    text = wait_for(scrape, 10, "worker metrics in /metrics")  # published with the next heartbeat
    assert 'rerank_http_requests_total{method="POST",route="/v1/rerank",status="200"}' in text
    assert 'status="422"' in text and "rerank_http_request_seconds_bucket" in text
    assert 'rerank_workers{model="tiny"} 1.0' in text
    assert 'rerank_queue_depth{model="tiny",queue="realtime"}' in text
    assert 'rerank_pending_tokens{model="tiny"}' in text
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    for name in ("rerank_batch_tokens_bucket", "rerank_batch_seconds_sum", "rerank_pairs_scored_total",
                 "rerank_tokens_scored_total", "rerank_worker_tasks_total"):
        lines = [line for line in samples if line.startswith(name + "{")]
        assert lines and all('worker="' in line and 'model="tiny"' in line for line in lines), name


def test_openapi_documents_every_route_from_the_request_models(api):
    from openapi_spec_validator import validate

    doc = requests.get(api.url + "/openapi.json", timeout=5).json()
    validate(doc)
    from api.app import create_app
    from api.openapi import openapi_path

    app = create_app(Settings(models="tiny=/nowhere", redis_url="redis://127.0.0.1:1/0"))
    for rule in app.url_map.iter_rules():
        if getattr(getattr(app.view_functions[rule.endpoint], "openapi", None), "hidden", False):
            continue  # Swagger UI's static files
        path = openapi_path(rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in doc["paths"][path], (method, path)
    body = doc["paths"]["/v1/rerank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = body["$ref"].rsplit("/", 1)[-1]
    assert name.startswith("RerankRequest")
    schema = doc["components"]["schemas"][name]
    assert set(schema["required"]) == {"query", "documents"}
    assert doc["paths"]["/v1/rerank"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/health"]["get"]
    page = requests.get(api.url + "/docs", timeout=5)
    assert page.status_code == 200 and "openapi.json" in page.text


def test_request_id_is_echoed_and_followed_into_the_worker(api, worker):
    r = api.post("/v1/rerank", {"query": "follow me", "documents": ["x"]}, headers={"X-Request-Id": "trace-abc-123"})
    assert r.headers["X-Request-Id"] == "trace-abc-123" and r.json()["id"] == "trace-abc-123"
    wait_for(lambda: "rid=trace-abc-123" in worker.log_tail(400), 5, "the worker's log line")
    generated = api.post("/v1/rerank", {"query": "q", "documents": ["x"]}).headers["X-Request-Id"]
    assert len(generated) == 32
    bad = api.post("/v1/rerank", {"query": "q", "documents": ["x"]}, headers={"X-Request-Id": "not <a> safe id"})
    assert bad.headers["X-Request-Id"] != "not <a> safe id" and len(bad.headers["X-Request-Id"]) == 32


def test_json_logs_carry_the_request_id(multi_api, log_dir):
    env = dict(multi_api.env, LOG_JSON="true")
    worker = start_worker("worker-spare-json", env, log_dir, "spare")
    try:
        r = multi_api.post("/v1/rerank", {"model": "spare", "query": "q", "documents": ["x"]}, token=None,
                           headers={"X-Request-Id": "json-rid-1"})
        assert r.status_code == 200

        def line():
            for raw in worker.log_tail(400).splitlines():
                if raw.startswith("{") and "json-rid-1" in raw:
                    return json.loads(raw)

        record = wait_for(line, 5, "a JSON log line")
        assert record["request_id"] == "json-rid-1" and record["levelname"] == "INFO"
    finally:
        worker.stop()


def test_startup_log_shows_the_configuration_without_the_token(api):
    log = api.api.log_path.read_text()
    assert "configuration:" in log and "FastGPT rerank URL: http://" in log
    assert "<2 token(s)>" in log and TOKENS[0] not in log


def test_worker_plan_pins_one_engine_and_its_feeders_per_gpu(monkeypatch, model_dir):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    settings = Settings(models=f"a={model_dir},b={model_dir}", gpus="0,1", feeders_per_device=2)
    plan = worker_plan(settings, socket_dir="/run/x")
    engines = [p for p in plan if p.role == "engine"]
    assert [(p.env["CUDA_VISIBLE_DEVICES"], p.model) for p in engines] == [("0", "a"), ("1", "a"), ("0", "b"),
                                                                         ("1", "b")]
    for engine in engines:
        socket_path = engine.argv[engine.argv.index("--socket") + 1]
        feeders = [p for p in plan if p.role == "feeder" and p.env.get("ENGINE_SOCKET") == socket_path]
        # Each engine comes before its feeders (stopped after them), which run on its GPU.
        assert len(feeders) == 2 and all(plan.index(f) > plan.index(engine) for f in feeders)
        assert all(f.env["CUDA_VISIBLE_DEVICES"] == engine.env["CUDA_VISIBLE_DEVICES"] for f in feeders)
    assert len({p.argv[-1] for p in engines}) == 4  # a socket each
    assert visible_gpus("none") == [] and visible_gpus("2, 3") == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert visible_gpus("auto") == ["4", "5"]
    # WORKERS_PER_DEVICE, the old name, still says how many.
    cpu = worker_plan(Settings(models=f"a={model_dir}", gpus="none", workers_per_device=2))
    assert [p.role for p in cpu] == ["engine", "feeder", "feeder"] and all("CUDA_VISIBLE_DEVICES" not in p.env
                                                                          for p in cpu)
    # The model in each worker (a comparison layout): no engine process.
    old = worker_plan(Settings(models=f"a={model_dir}", gpus="none", workers_per_device=2, engine_process=False))
    assert [p.role for p in old] == ["worker", "worker"]


def test_feeders_default_to_the_cores_per_gpu(monkeypatch, model_dir):
    from rerank import launch

    monkeypatch.setattr(launch, "available_cores", lambda: 16)
    assert launch.default_feeders(Settings(models=f"a={model_dir}"), 2) == 7  # 8 cores per GPU, one for its engine
    assert launch.default_feeders(Settings(models=f"a={model_dir}"), 1) == launch.MAX_FEEDERS
    assert launch.default_feeders(Settings(models=f"a={model_dir}", device="cpu"), 0) == 1  # the model needs the cores
    assert launch.default_feeders(Settings(models=f"a={model_dir}", device="sim"), 0) == 8
    monkeypatch.setattr(launch, "available_cores", lambda: 2)
    assert launch.default_feeders(Settings(models=f"a={model_dir}", device="sim"), 0) == 1
    assert launch.default_feeders(Settings(models=f"a={model_dir}", feeders_per_device=3), 8) == 3


def test_workers_command_runs_an_engine_and_two_feeders_and_restarts_what_dies(stack_env, model_dir, tmp_path):
    env = base_env(**dict(stack_env, MODELS=f"pool={model_dir}", GPUS="none", WORKERS_PER_DEVICE="2"))
    log = open(tmp_path / "workers.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "rerank", "workers"], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    registry = WorkerRegistry(redis.Redis.from_url(stack_env["REDIS_URL"]))
    try:
        first = wait_for(lambda: (w := registry.alive("pool", fresh=True)) and len(w) == 2 and w, 90, "2 workers")
        # Two feeders, one engine: one copy of the weights, in a process of its own.
        assert len({w["engine_id"] for w in first}) == 1 and all(w["engine_shared"] for w in first)
        engine_pid = first[0]["engine_pid"]
        assert engine_pid not in {w["pid"] for w in first} and first[0]["engine_memory_mib"] > 0
        assert "libtorch" in open(f"/proc/{engine_pid}/maps").read()
        assert all("libtorch" not in open(f"/proc/{w['pid']}/maps").read() for w in first)
        # The engine dies: its feeders stop announcing themselves (the API answers 503) and, once
        # the launcher has restarted it, they rejoin it (the same feeder processes).
        subprocess.run(["kill", "-9", str(engine_pid)], check=True)
        wait_for(lambda: len(registry.alive("pool", fresh=True)) < 2, 10, "the feeders to see their engine gone")
        back = wait_for(lambda: (w := registry.alive("pool", fresh=True)) and len(w) == 2
                        and all(x["engine_pid"] != engine_pid for x in w) and w, 90, "the engine back")
        assert {w["pid"] for w in back} == {w["pid"] for w in first}
        # A feeder dies: it alone is restarted.
        victim = back[0]["pid"]
        subprocess.run(["kill", "-9", str(victim)], check=True)
        wait_for(lambda: len(registry.alive("pool", fresh=True)) == 2
                 and victim not in {w["pid"] for w in registry.alive("pool", fresh=True)}, 90, "a restarted worker")
        assert {w["engine_pid"] for w in registry.alive("pool", fresh=True)} == {back[0]["engine_pid"]}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        time.sleep(0.5)
        assert registry.alive("pool", fresh=True) == []  # both withdrew on the way down
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert "restarting" in (tmp_path / "workers.log").read_text()
