"""No credential goes into a job's ``runtime_env`` (the Ray dashboard and its job API show it):
the workers of a cluster use their own credential chain, and a local Ray inherits the
driver's environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ray_jobs.job import ray_start

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID0001",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-example-secret-0001",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLEsessiontoken0001",
}
CONFIG = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1", "RAY_JOBS_CACHE_DIR": "/tmp/c"}


class _Job:
    """What ``ensure_ray`` reads of a prepared job: its Ray address and its footprint."""

    def __init__(self, ray_address: str | None):
        self.config = type("Config", (), {"ray_address": ray_address})()
        self.footprint = type("Footprint", (), {"driver_cpus": 1.0, "total": lambda self: {"CPU": 2.0}})()


def test_the_runtime_env_carries_where_storage_is_never_a_credential(monkeypatch):
    for k, v in {**SECRETS, **CONFIG}.items():
        monkeypatch.setenv(k, v)
    env = ray_start.job_runtime_env()
    assert not set(SECRETS) & set(env), env
    assert {k: env[k] for k in CONFIG} == CONFIG and env["HF_HUB_OFFLINE"] == "1"


def test_ray_address_connects_without_credentials_in_its_runtime_env(monkeypatch):
    """``--ray-address``: what ``ray.init`` is given, recorded in place of connecting (a stand-in
    for the remote cluster: its dashboard would show exactly this ``runtime_env``)."""
    import ray

    for k, v in {**SECRETS, **CONFIG}.items():
        monkeypatch.setenv(k, v)
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    ray_start.ensure_ray(_Job("ray://head.example:10001"))
    (kw,) = calls
    assert kw["address"] == "ray://head.example:10001"
    text = json.dumps(kw["runtime_env"])
    assert not [v for v in SECRETS.values() if v in text], text
    assert kw["runtime_env"]["env_vars"]["AWS_ENDPOINT_URL"] == CONFIG["AWS_ENDPOINT_URL"]


def test_a_local_ray_is_loopback_only_and_sized_for_the_footprint(monkeypatch):
    """What the job gives ``ray.init`` when it starts its own Ray (``bench/job_side.py`` starts
    the same one)."""
    import ray

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    ray_start.ensure_ray(_Job(None))
    (kw,) = calls
    assert kw["num_cpus"] == max(os.cpu_count() or 1, 3)  # a footprint of 1 CPU besides the driver, + 2
    assert kw["_node_ip_address"] == "127.0.0.1" and kw["include_dashboard"] is False and "address" not in kw
    assert kw["runtime_env"] == {"env_vars": ray_start.job_runtime_env()}


_PROBE = textwrap.dedent(
    """
    import json, os, sys
    import ray
    from ray_jobs.job import ray_start

    class Job:
        config = type("C", (), {"ray_address": sys.argv[1] or None})()
        footprint = type("F", (), {"driver_cpus": 1.0, "total": lambda self: {"CPU": 2.0}})()

    ray_start.ensure_ray(Job())

    @ray.remote(num_cpus=0)
    def worker_env():
        return {k: os.environ.get(k) for k in ("AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}

    runtime_env = ray.get_runtime_context().runtime_env
    print(json.dumps({"runtime_env": runtime_env, "worker": ray.get(worker_env.remote())}))
    ray.shutdown()
    """
)


def _probe(address: str, env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, address], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    return {**base, "PYTHONPATH": ROOT, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", **extra}


@pytest.mark.integration
def test_a_local_ray_inherits_the_credentials_and_its_runtime_env_holds_none(tmp_path):
    out = _probe("", _env(**SECRETS, **CONFIG))
    assert not [v for v in SECRETS.values() if v in json.dumps(out["runtime_env"])], out["runtime_env"]
    assert out["worker"] == {
        "AWS_SECRET_ACCESS_KEY": SECRETS["AWS_SECRET_ACCESS_KEY"],
        "AWS_ENDPOINT_URL": CONFIG["AWS_ENDPOINT_URL"],
    }


@pytest.mark.integration
def test_a_driver_with_credentials_sends_none_to_a_running_cluster(tmp_path, monkeypatch):
    """``--ray-address`` against a real cluster (the local backend's ``ray start --head``,
    started without storage keys): the driver holds AWS keys; the job's ``runtime_env``, which
    the cluster's dashboard shows, holds none, and the cluster's workers see none of them."""
    from airflow_ray.backends.local import TOKEN_FILE, LocalRayBackend

    for k in (*SECRETS, *CONFIG):
        monkeypatch.delenv(k, raising=False)
    backend = LocalRayBackend(num_cpus=1)  # its own short temp root: AF_UNIX paths are short
    handle = backend.up("emb-ray-start-test")
    try:
        token = os.path.join(handle.details["temp_dir"], TOKEN_FILE)
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        out = _probe(handle.details["gcs_address"], _env(**SECRETS, **CONFIG, **auth))
    finally:
        backend.down(handle)
    assert not [v for v in SECRETS.values() if v in json.dumps(out["runtime_env"])], out["runtime_env"]
    assert out["runtime_env"]["env_vars"]["AWS_ENDPOINT_URL"] == CONFIG["AWS_ENDPOINT_URL"]
    assert out["worker"] == {"AWS_SECRET_ACCESS_KEY": None, "AWS_ENDPOINT_URL": CONFIG["AWS_ENDPOINT_URL"]}
