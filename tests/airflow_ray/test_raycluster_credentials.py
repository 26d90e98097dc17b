"""The Ray pods' storage credentials: from the pods' own chain or a Kubernetes Secret, never a
value in the rendered RayCluster (whoever reads the cluster object, or the dashboard, sees
none), whatever the Airflow worker's own environment holds."""

from __future__ import annotations

import json

from tests.airflow_ray.test_kuberay import _deployment_manifest, _pods, _validate

KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def test_ray_pods_take_storage_keys_from_a_secret_and_no_value_is_rendered(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWORKERKEY0000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret-value-0001")
    _, manifest = _deployment_manifest()
    _validate(manifest)
    assert "AKIAWORKERKEY0000001" not in json.dumps(manifest) and "worker-secret-value-0001" not in json.dumps(manifest)
    for name, template in _pods(manifest):
        for container in template["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            for key in KEYS:
                assert "value" not in env[key], (name, key)
                ref = env[key]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": "ray-embeddings-storage", "key": key, "optional": True}, (name, ref)
