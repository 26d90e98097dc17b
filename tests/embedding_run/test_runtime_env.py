"""The partitions' Ray job submissions carry no credential in their ``runtime_env`` (the Ray
dashboard and its job API show it), whatever the Airflow worker's environment holds."""

from __future__ import annotations

import json

import pytest

from embedding_run.config import RunConfig, build_params
from embedding_run.deployment import load_defaults
from embedding_run.jobs import partition_jobs

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAAIRFLOWWORKER001",
    "AWS_SECRET_ACCESS_KEY": "airflow-worker-secret-0001",
    "AWS_SESSION_TOKEN": "airflow-worker-session-0001",
}


@pytest.mark.parametrize("backend", ["local", "kuberay", "existing"])
def test_job_submissions_carry_no_credential(monkeypatch, backend):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    cfg = load_defaults({})
    params = {name: p.resolve(suppress_exception=True) for name, p in build_params(cfg).items()}
    uris = {"manifest_uri": "s3://b/m/", "output_uri": "s3://b/o/", "model_uri": "s3://b/model/"}
    config = RunConfig.from_params({**params, **uris, "backend": backend}, cfg["deployment"])
    jobs = partition_jobs(config, "s3://b/o/runs/r/plan.json", [0, 1], "tiny-0123456789", None)
    assert len(jobs) == 2
    text = json.dumps(jobs)
    assert not [v for v in SECRETS.values() if v in text], text
    assert not [k for k in SECRETS if k in text], text
