"""Deployment files and the API/worker split, checked without a Docker engine."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from tests.procs import ROOT


@pytest.fixture(scope="module")
def compose() -> dict:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose (Debian package) is not installed")
    out = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "config"], cwd=ROOT,
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "ACCESS_TOKEN": "t0k"})
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


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


def test_api_image_carries_no_torch():
    lines = [line for name in ("api.txt", "base.txt")
             for line in (ROOT / "requirements" / name).read_text().splitlines() if not line.startswith("#")]
    assert not [line for line in lines if "torch" in line or "transformers" in line]
    dockerfile = (ROOT / "Dockerfile.api").read_text()
    assert "worker.txt" not in dockerfile and "COPY worker" not in dockerfile


def test_api_process_never_imports_torch():
    code = ("import sys; from api.app import create_app; create_app(); "
            "bad = [m for m in ('torch', 'transformers', 'worker') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_gpu_node_compose_file_needs_shared_redis_and_storage():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose (Debian package) is not installed")
    path = str(ROOT / "docker-compose.worker.yml")
    missing = subprocess.run([exe, "-f", path, "config"], cwd=ROOT, capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode != 0 and "REDIS_URL" in missing.stderr
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": "redis://:pw@redis-host:6379/0", "JOBS_URL": "s3://bucket/jobs"}
    out = subprocess.run([exe, "-f", path, "config"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    worker = yaml.safe_load(out.stdout)["services"]["worker"]
    assert worker["environment"]["REDIS_URL"] == env["REDIS_URL"] and worker["shm_size"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
