"""Shared fixtures: demo assets, one local Ray for the session, a real S3 server on loopback."""

from __future__ import annotations

import os
import socket
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "dags")):  # Airflow puts the DAGs folder on sys.path too
    if _path not in sys.path:
        sys.path.insert(0, _path)

# Airflow reads its config at import: give the test session its own home, our DAGs.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="airflow-home-"))
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", os.path.join(ROOT, "dags"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _credentials_looked_up_afresh():
    """Each test looks its clusters' credentials up anew: the triggerer's short reuse of an
    answer would carry one test's token or address into the next."""
    from airflow_ray.backends import forget_credentials

    forget_credentials()


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> str:
    from ray_jobs.demo.checkpoint import build_demo_checkpoint

    return build_demo_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "model"))


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """120 rows, every broken-image kind twice."""
    from ray_jobs.demo.assets import write_demo_assets

    return write_demo_assets(str(tmp_path_factory.mktemp("demo")), rows=120, bad_images=12, files=2, row_group_rows=16)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto's server mode) on loopback; the environment points s3fs at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
    from ray_jobs import storage

    storage._remote_fs.cache_clear()
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage._remote_fs.cache_clear()


@pytest.fixture(scope="session")
def s3_bucket(s3_server) -> str:
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="embeddings-test")
    return "s3://embeddings-test"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for every integration test (started after the S3 env is set, so workers see it)."""
    import ray

    ray.init(
        num_cpus=6,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": {k: os.environ[k] for k in (*S3_ENV, "AWS_ENDPOINT_URL", "HF_HUB_OFFLINE")}},
    )
    yield ray
    ray.shutdown()
