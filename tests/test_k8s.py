"""deploy/k8s: the overlays render with kustomize, every object validates against the Kubernetes
schemas (KEDA's ScaledObject against the model generated from KEDA's CRD), and the KEDA triggers
watch the Redis lists where the API really puts each model's tasks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis
import requests
import yaml

from shared import names
from shared.settings import Settings
from shared.workers import WorkerRegistry
from tests.procs import ROOT, start_worker, wait_for

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("single-gpu", "fleet", "qwen3-reranker")
#: The oldest Kubernetes the manifests are checked against, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29.0", "latest")
#: Fields of KEDA's Redis list scaler (keda.sh/docs/scalers/redis-lists); its metadata is a free
#: map in the CRD, so a misspelt key would pass the schema and be ignored by KEDA.
REDIS_SCALER_KEYS = {"address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
                     "usernameFromEnv", "passwordFromEnv", "listName", "listLength",
                     "activationListLength", "enableTLS", "unsafeSsl", "databaseIndex"}


def kustomize(path: Path) -> list[dict]:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl (kustomize) is not installed")
    out = subprocess.run([exe, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def config(docs: list[dict]) -> dict[str, str]:
    (cm,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("rerank-config")]
    return cm["data"]


def workers(docs: list[dict]) -> dict[str, dict]:
    """Worker Deployments by the model their pods serve."""
    return {d["spec"]["template"]["metadata"]["labels"]["rerank-service/model"]: d
            for d in of_kind(docs, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"}


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def byte_size(value: str) -> int:
    """'2gb' (Docker) or '2Gi' (Kubernetes) in bytes."""
    number, unit = re.fullmatch(r"(\d+)\s*([a-zA-Z]*)", str(value)).groups()
    powers = {"": 0, "b": 0, "k": 1, "kb": 1, "ki": 1, "m": 2, "mb": 2, "mi": 2, "g": 3, "gb": 3, "gi": 3}
    return int(number) * 1024 ** powers[unit.lower()]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(rendered, overlay):
    from kubernetes_validate import utils

    docs = rendered[overlay]
    checked = 0
    for doc in docs:
        if doc["kind"] == "ScaledObject":
            continue  # a CRD: next test
        for version in KUBERNETES_VERSIONS:
            utils.validate(doc, utils.latest_version() if version == "latest" else version, strict=True)
        checked += 1
    assert checked >= 9 and {"Namespace", "ConfigMap", "Service", "Deployment", "StatefulSet",
                             "HorizontalPodAutoscaler", "PersistentVolumeClaim"} <= {d["kind"] for d in docs}


def test_scaled_objects_fit_kedas_crd_and_watch_each_models_queues(rendered):
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    docs = rendered["fleet"]
    served = [spec.name for spec in Settings(models=config(docs)["MODELS"]).served_models]
    deployments = workers(docs)
    assert sorted(deployments) == sorted(served) == ["bge-reranker-base", "bge-reranker-v2-m3"]
    scaled = of_kind(docs, "ScaledObject")
    assert len(scaled) == len(served)
    for doc in scaled:
        # Strict, and nothing dropped on the way back: no unknown (misspelt) field, no wrong type.
        model = ScaledObject.model_validate(doc, strict=True)
        assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc
        spec = doc["spec"]
        target = named(docs, "Deployment", spec["scaleTargetRef"]["name"])
        served_model = target["spec"]["template"]["metadata"]["labels"]["rerank-service/model"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        container_env = env_of(target["spec"]["template"]["spec"]["containers"][0])
        triggers = {t["name"]: t for t in spec["triggers"]}
        assert set(triggers) == {"realtime", "bulk", "realtime-celery"}
        for trigger in triggers.values():
            meta = trigger["metadata"]
            assert trigger["type"] == "redis" and set(meta) <= REDIS_SCALER_KEYS, meta
            assert int(meta["listLength"]) >= 1 and meta["databaseIndex"] == "0"
            # KEDA reads these variables off the target's container: they must be set there.
            for key in ("addressFromEnv", "passwordFromEnv"):
                assert meta[key] in container_env, (key, meta[key])
        # The queue names the workers consume, from the code that names them.
        assert triggers["realtime"]["metadata"]["listName"] == names.realtime_list(served_model)
        assert triggers["realtime-celery"]["metadata"]["listName"] == names.realtime_queue(served_model)
        assert triggers["bulk"]["metadata"]["listName"] == names.bulk_queue(served_model)
        # A waiting realtime call asks for more replicas than a waiting bulk piece.
        assert int(triggers["realtime"]["metadata"]["listLength"]) < int(triggers["bulk"]["metadata"]["listLength"])


def test_qwen3_overlay_serves_it_beside_bge_on_its_own_queues(rendered):
    docs = rendered["qwen3-reranker"]
    specs = {spec.name: spec for spec in Settings(models=config(docs)["MODELS"]).served_models}
    assert sorted(workers(docs)) == sorted(specs) == ["bge-reranker-base", "qwen3-reranker-0.6b"]
    assert (specs["qwen3-reranker-0.6b"].source, specs["qwen3-reranker-0.6b"].family) == ("Qwen/Qwen3-Reranker-0.6B", "qwen3")
    scaled = named(docs, "ScaledObject", "worker-qwen3-reranker-0.6b")
    lists = {t["name"]: t["metadata"]["listName"] for t in scaled["spec"]["triggers"]}
    assert lists == {"realtime": names.realtime_list("qwen3-reranker-0.6b"), "bulk": names.bulk_queue("qwen3-reranker-0.6b"),
                     "realtime-celery": names.realtime_queue("qwen3-reranker-0.6b")}
    assert scaled["spec"]["scaleTargetRef"]["name"] == "worker-qwen3-reranker-0.6b"


def test_worker_pods_have_a_gpu_a_model_cache_shared_memory_and_time_to_finish(rendered):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    hf_home = re.search(r"HF_HOME=(\S+)", (ROOT / "Dockerfile.worker").read_text()).group(1)
    for overlay, docs in rendered.items():
        for model, deployment in workers(docs).items():
            pod = deployment["spec"]["template"]["spec"]
            (container,) = pod["containers"]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            assert mounts[hf_home]["persistentVolumeClaim"]["claimName"] == "rerank-model-cache"
            shm = mounts["/dev/shm"]["emptyDir"]
            assert shm["medium"] == "Memory"
            assert byte_size(shm["sizeLimit"]) == byte_size(compose["services"]["worker"]["shm_size"])
            # A worker finishes what it holds before it goes: a realtime call lasts SYNC_TIMEOUT at most.
            assert pod["terminationGracePeriodSeconds"] >= 2 * Settings().sync_timeout
            # One engine and its feeders per pod (the launcher), for the model the pod's label
            # names; its health is that model's.
            env = env_of(container)
            assert env["WORKER_MODEL"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['rerank-service/model']"
            assert container["command"] == ["rerank", "workers", "--model", "$(WORKER_MODEL)"]
            # A core for the engine, one for each feeder: the feeders fit the pod's CPU request.
            feeders = int(env["FEEDERS_PER_DEVICE"]["value"])
            assert 1 <= feeders and feeders + 1 <= int(container["resources"]["requests"]["cpu"])
            assert Settings(feeders_per_device=feeders).feeders_per_device == feeders
            for probe in ("startupProbe", "livenessProbe"):
                assert "worker.healthcheck --model \"$WORKER_MODEL\"" in container[probe]["exec"]["command"][-1]
            assert model in config(docs)["MODELS"].split(",")
            assert pod["securityContext"]["runAsNonRoot"] is True


def test_api_serves_6006_with_probes_a_token_from_a_secret_and_scales_on_cpu(rendered):
    for docs in rendered.values():
        service = named(docs, "Service", "api")
        assert service["spec"]["ports"][0]["port"] == 6006
        pod = named(docs, "Deployment", "api")["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["ports"][0]["containerPort"] == 6006
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        env = env_of(container)
        assert env["ACCESS_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "rerank-secrets", "key": "ACCESS_TOKEN"}
        # REDIS_URL is composed of variables defined before it (Kubernetes expands only those).
        order = [e["name"] for e in container["env"]]
        refs = re.findall(r"\$\((\w+)\)", env["REDIS_URL"]["value"])
        assert refs and all(r in config(docs) or order.index(r) < order.index("REDIS_URL") for r in refs)
        hpa = named(docs, "HorizontalPodAutoscaler", "api")
        assert hpa["spec"]["scaleTargetRef"]["name"] == "api"
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_redis_keeps_an_append_only_file_on_a_volume(rendered):
    for docs in rendered.values():
        redis_set = named(docs, "StatefulSet", "redis")
        (container,) = redis_set["spec"]["template"]["spec"]["containers"]
        assert "--appendonly yes" in " ".join(container["command"] + container["args"])
        assert {m["name"] for m in container["volumeMounts"]} == {
            t["metadata"]["name"] for t in redis_set["spec"]["volumeClaimTemplates"]}
        assert config(docs)["REDIS_ADDRESS"].startswith("redis.")  # the Service of that StatefulSet


def test_overlays_differ_where_they_should(rendered):
    single, fleet = rendered["single-gpu"], rendered["fleet"]
    assert not of_kind(single, "ScaledObject")  # one GPU: nothing to scale, no KEDA needed
    assert list(workers(single)) == ["bge-reranker-base"]
    assert workers(single)["bge-reranker-base"]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    claims = {d["metadata"]["name"]: d for d in of_kind(single, "PersistentVolumeClaim")}
    assert set(claims) == {"rerank-model-cache", "rerank-jobs"}
    # The fleet keeps jobs in object storage named by a Secret, and shares the model cache.
    assert named(fleet, "PersistentVolumeClaim", "rerank-model-cache")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert not [d for d in of_kind(fleet, "PersistentVolumeClaim") if d["metadata"]["name"] == "rerank-jobs"]
    for deployment in [named(fleet, "Deployment", "api"), *workers(fleet).values()]:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert env_of(container)["JOBS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "rerank-storage"


def test_external_redis_component_drops_the_statefulset(tmp_path):
    overlay = tmp_path / "external"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({  # kustomize takes relative paths only
        "resources": [os.path.relpath(K8S / "overlays" / "fleet", overlay)],
        "components": [os.path.relpath(K8S / "components" / "external-redis", overlay)],
        "configMapGenerator": [{"name": "rerank-config", "behavior": "merge",
                                "literals": ["REDIS_ADDRESS=redis.example.internal:6379"]}],
    }))
    docs = kustomize(overlay)
    assert not of_kind(docs, "StatefulSet")
    assert not [d for d in of_kind(docs, "Service") if d["metadata"]["name"] == "redis"]
    assert config(docs)["REDIS_ADDRESS"] == "redis.example.internal:6379"
    assert len(of_kind(docs, "ScaledObject")) == 2


@pytest.mark.stack
def test_the_api_puts_tasks_exactly_on_the_lists_the_triggers_watch(multi_api, redis_url):
    """kombu's Redis transport keeps a queue in the list of its name, and a message sent with a
    priority in `<queue>\\x06\\x16<step>` lists: the API must send none, or KEDA would miss them."""
    client = redis.Redis.from_url(redis_url)
    model = "spare"  # served by multi_api, no worker: what is queued stays there
    bulk, realtime = names.bulk_queue(model), names.realtime_queue(model)
    try:
        r = requests.post(f"{multi_api.url}/v1/rerank/jobs", timeout=30, json={
            "model": model, "items": [{"query": "q", "documents": ["a", "b"]} for _ in range(3)]})
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        pieces = client.llen(bulk)
        assert pieces >= 1
        assert [k.decode() for k in client.keys(f"{bulk}*")] == [bulk]
        requests.delete(f"{multi_api.url}/v1/rerank/jobs/{job}", timeout=10)

        # A realtime call needs a live worker: a heartbeat as a worker sends it, from no process.
        # One that takes the direct path gets the call on its list; one that does not (an older
        # release) gets it as a Celery task on the queue of that name.
        registry = WorkerRegistry(client)
        for direct, key in ((True, names.realtime_list(model)), (False, realtime)):
            registry.announce(model, "k8s-test-worker", {"id": "k8s-test-worker", "model": model, "host": "nowhere",
                                                         "pid": 0, "realtime_direct": direct}, ttl=30)
            time.sleep(1.1)  # the API caches worker liveness for a second
            answer: list[requests.Response] = []
            call = threading.Thread(target=lambda: answer.append(requests.post(
                f"{multi_api.url}/v1/rerank", json={"model": model, "query": "q", "documents": ["a"]}, timeout=30)))
            call.start()
            wait_for(lambda: client.llen(key) == 1, 10, f"the realtime call on {key}")
            assert [k.decode() for k in client.keys(f"{key}*")] == [key]
            registry.withdraw(model, "k8s-test-worker")
            call.join(30)
            assert answer and answer[0].status_code in (503, 504)  # nobody scored it
            client.delete(key)
    finally:
        WorkerRegistry(client).withdraw(model, "k8s-test-worker")
        client.delete(bulk, realtime, names.realtime_list(model))


@pytest.mark.stack
def test_a_worker_scaled_down_mid_job_loses_nothing(small_pieces_api, log_dir):
    """What Kubernetes does to a worker pod KEDA scales down: SIGTERM, then time to finish. The job
    still ends with every item once, with no help from VISIBILITY_TIMEOUT (15 min by default)."""
    from tests.test_jobs import make_items, results, status, submit, wait_finished

    multi_api = small_pieces_api  # pieces of 200 pairs: the worker stops between them
    env = dict(multi_api.env, WORKER_CONCURRENCY="4")
    first = start_worker("worker-spare-scaled-down", env, log_dir, "spare")
    items = make_items(300, seed=14, docs=(5, 12))
    job_id = submit(multi_api, items, token=None, model="spare")
    wait_for(lambda: status(multi_api, job_id, None)["progress"]["items_done"] > 0, 60, "the job to start")
    assert first.stop(grace=60) == 0  # a warm shutdown, as terminationGracePeriodSeconds allows
    at_stop = status(multi_api, job_id, None)["progress"]["items_done"]
    assert at_stop < 300, "stop the worker in the middle of the job"
    second = start_worker("worker-spare-scaled-up", env, log_dir, "spare")
    try:
        final, _ = wait_finished(multi_api, job_id, timeout=120, token=None)
    finally:
        second.stop()
    assert final["status"] == "succeeded" and final["progress"]["items_done"] == 300, final
    lines, _ = results(multi_api, job_id, None)
    assert [line["index"] for line in lines] == list(range(300))  # each item once, in order


# --- the Redis Sentinel component ---------------------------------------------------------------

#: Fields of KEDA's Redis list scaler with Sentinel (keda.sh/docs/scalers/redis-sentinel-lists).
REDIS_SENTINEL_SCALER_KEYS = {"addresses", "addressesFromEnv", "hosts", "hostsFromEnv", "ports", "portsFromEnv",
                              "sentinelMaster", "sentinelMasterFromEnv", "usernameFromEnv", "passwordFromEnv",
                              "sentinelUsernameFromEnv", "sentinelPasswordFromEnv", "listName", "listLength",
                              "activationListLength", "enableTLS", "unsafeSsl", "databaseIndex"}


@pytest.fixture(scope="module")
def with_sentinel(tmp_path_factory) -> list[dict]:
    overlay = tmp_path_factory.mktemp("sentinel-overlay")
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({  # kustomize takes relative paths only
        "resources": [os.path.relpath(K8S / "overlays" / "fleet", overlay)],
        "components": [os.path.relpath(K8S / "components" / "redis-sentinel", overlay)],
    }))
    return kustomize(overlay)


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def test_sentinel_component_validates_and_points_every_pod_at_the_sentinels(with_sentinel):
    from cloudcoil.models.keda.v1alpha1 import ScaledObject
    from kubernetes_validate import utils

    from shared import redis_client

    docs = with_sentinel
    for doc in docs:
        if doc["kind"] != "ScaledObject":
            utils.validate(doc, utils.latest_version(), strict=True)
    assert not [d for d in of_kind(docs, "StatefulSet") if d["metadata"]["name"] == "redis"]
    redis_set = named(docs, "StatefulSet", "redis-sentinel")
    assert redis_set["spec"]["replicas"] == 3
    assert {c["name"] for c in redis_set["spec"]["template"]["spec"]["containers"]} == {"redis", "sentinel"}
    headless = named(docs, "Service", redis_set["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    namespace = redis_set["metadata"]["namespace"]
    pods = {f"redis-sentinel-{i}.{headless['metadata']['name']}.{namespace}.svc" for i in range(3)}
    cfg = config(docs)
    containers = [d["spec"]["template"]["spec"]["containers"][0] for d in of_kind(docs, "Deployment")]
    assert len(containers) == 3  # the API and two models' workers
    for container in containers:
        env = {**cfg, "REDIS_PASSWORD": "pw"}
        url = expand(env_of(container)["REDIS_URL"]["value"], env)
        target = redis_client.parse_sentinel_url(url)
        assert {host for host, _ in target.sentinels} == pods and {p for _, p in target.sentinels} == {26379}
        assert target.password == "pw" and target.db == 0
        assert env_of(container)["REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "REDIS_PASSWORD"
    settings = Settings(redis_url=url, redis_master_name=cfg["REDIS_MASTER_NAME"])
    assert redis_client.replicas_to_wait_for(settings) == 1
    for doc in of_kind(docs, "ScaledObject"):
        ScaledObject.model_validate(doc, strict=True)
        container_env = env_of(named(docs, "Deployment", doc["spec"]["scaleTargetRef"]["name"])
                               ["spec"]["template"]["spec"]["containers"][0])
        for trigger in doc["spec"]["triggers"]:
            meta = trigger["metadata"]
            assert trigger["type"] == "redis-sentinel" and set(meta) <= REDIS_SENTINEL_SCALER_KEYS, meta
            for key in ("addressesFromEnv", "sentinelMasterFromEnv", "passwordFromEnv", "sentinelPasswordFromEnv"):
                assert meta[key] in container_env, (key, meta[key])


def test_sentinel_component_scripts_start_a_real_redis_and_sentinel(with_sentinel, tmp_path):
    """The pods' scripts, run with the installed redis-server (names and paths made local): Redis
    takes every option redis.sh gives it and Sentinel every line of the file sentinel.sh writes."""
    import redis as redis_lib

    from rerank.launch import free_port, redis_server_binary
    from tests.procs import Proc, base_env

    if shutil.which("redis-cli") is None:
        pytest.skip("sentinel.sh waits for the primary with redis-cli, which is not installed")
    scripts = named(with_sentinel, "ConfigMap", "redis-sentinel-scripts")["data"]
    cfg = config(with_sentinel)
    redis_port, sentinel_port = free_port(), free_port()
    env = base_env(POD_NAMESPACE="rerank", REDIS_PASSWORD="pw", REDIS_MASTER_NAME=cfg["REDIS_MASTER_NAME"],
                   REDIS_SENTINEL_DOWN_AFTER_MS=cfg["REDIS_SENTINEL_DOWN_AFTER_MS"])
    local = {'self="$(hostname).redis-sentinel.${POD_NAMESPACE}.svc"': 'self=127.0.0.1',
             "$(sh /scripts/primary.sh)": "127.0.0.1", "/data": str(tmp_path), "/sentinel/": f"{tmp_path}/",
             "exec redis-server": f"exec {redis_server_binary()}"}
    redis_sh, sentinel_sh = scripts["redis.sh"], scripts["sentinel.sh"]
    for old, new in local.items():
        assert old in redis_sh + sentinel_sh, old
        redis_sh, sentinel_sh = redis_sh.replace(old, new), sentinel_sh.replace(old, new)
    assert redis_sh.count("redis-server \"$@\"") == 1
    redis_sh = redis_sh.replace('redis-server "$@"', f'redis-server "$@" --port {redis_port} --bind 127.0.0.1')
    sentinel_sh = (sentinel_sh.replace("port 26379", f"port {sentinel_port}\nbind 127.0.0.1")
                   .replace("-h \"$primary\" ping", f"-h \"$primary\" -p {redis_port} ping")
                   .replace("$primary 6379 2", f"$primary {redis_port} 2"))
    (tmp_path / "redis.sh").write_text(redis_sh)
    (tmp_path / "sentinel.sh").write_text(sentinel_sh)
    procs = [Proc("k8s-redis", ["sh", str(tmp_path / "redis.sh")], env, tmp_path)]
    try:
        wait_for(redis_lib.Redis(port=redis_port, password="pw").ping, 15, "redis.sh's Redis", procs[0])
        procs.append(Proc("k8s-sentinel", ["sh", str(tmp_path / "sentinel.sh")], env, tmp_path))
        sentinel = redis_lib.Redis(port=sentinel_port, password="pw", decode_responses=True)
        master = wait_for(lambda: sentinel.sentinel_master(cfg["REDIS_MASTER_NAME"]), 15, "sentinel.sh's Sentinel",
                          procs[1])
        assert int(master["port"]) == redis_port and "s_down" not in master["flags"]
    finally:
        for proc in procs:
            proc.stop()
