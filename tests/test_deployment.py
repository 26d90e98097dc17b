"""Deployment files, checked statically: no Docker engine or Kubernetes runs here."""

import json
import os
import re

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.I)


def _load(path):
    with open(os.path.join(ROOT, path)) as fh:
        return yaml.safe_load(fh)


def _requirements():
    pins = {}
    with open(os.path.join(ROOT, "requirements.txt")) as fh:
        for line in fh:
            line = line.split("#")[0].strip()
            if "==" in line:
                name, version = line.split("==")
                pins[re.sub(r"\[.*\]", "", name).lower()] = version
    return pins


@pytest.fixture(scope="module")
def compose():
    return _load("docker-compose.yaml")


def _env(service):
    env = service.get("environment") or {}
    return env if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


def test_static_compose_parses_and_every_service_has_a_healthcheck(compose):
    services = compose["services"]
    assert {
        "postgres",
        "minio",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "ray-head",
        "ray-worker",
    } <= set(services)
    missing = [name for name, svc in services.items() if "healthcheck" not in svc]
    assert missing == []


def test_static_every_built_image_has_its_dockerfile(compose):
    for name, svc in compose["services"].items():
        if "build" in svc:
            dockerfile = os.path.join(ROOT, svc["build"].get("context", "."), svc["build"]["dockerfile"])
            assert os.path.isfile(dockerfile), f"{name}: {dockerfile} missing"


def test_static_every_env_var_the_dag_reads_is_set_and_known(compose):
    from ray_embeddings.dag_config import load_defaults

    keys = {f"EMB_{k.upper()}" for k in load_defaults({})["params"]} | {
        "EMB_DEFAULTS_FILE",
        "EMB_SCHEDULE",
        "EMB_OWNER",
        "EMB_RETRIES",
        "EMB_RETRY_DELAY_S",
    }
    for name in ("airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-apiserver"):
        env = _env(compose["services"][name])
        for required in (
            "EMB_MANIFEST_URI",
            "EMB_OUTPUT_URI",
            "EMB_MODEL_URI",
            "EMB_BACKEND",
            "EMB_CATALOG_URI",
            "EMB_EXISTING_CONN_ID",
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ):
            assert env.get(required), f"{name}: {required} is not set"
        unknown = sorted(k for k in env if k.startswith("EMB_") and k not in keys)
        assert unknown == [], f"{name}: EMB_ variables the DAG does not read (typos?): {unknown}"
        conn_var = "AIRFLOW_CONN_" + env["EMB_EXISTING_CONN_ID"].upper()
        conn = json.loads(env[conn_var].replace("${RAY_AUTH_TOKEN:?set in .env}", "x"))
        assert conn["host"] == "http://ray-head:8265"


def test_static_no_plaintext_secret_in_compose(compose):
    referenced = set()
    for name, svc in compose["services"].items():
        for key, value in _env(svc).items():
            value = str(value)
            referenced |= set(re.findall(r"\$\{(\w+)", value))
            if SECRETISH.search(key) or "password" in value.lower():
                assert "${" in value, f"{name}: {key} holds a literal secret"
    with open(os.path.join(ROOT, ".env.example")) as fh:
        example = {line.split("=", 1)[0] for line in fh if "=" in line and not line.startswith("#")}
    assert referenced - {"AIRFLOW_UID"} <= example, "every variable compose needs is in .env.example"
    with open(os.path.join(ROOT, ".gitignore")) as fh:
        assert ".env" in fh.read().split(), "a real .env never gets committed"


def test_static_ports_are_bound_to_loopback(compose):
    ports = {}
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
            ports[name] = port
    assert ports == {
        "minio": "127.0.0.1:9001:9001",
        "ray-head": "127.0.0.1:8265:8265",
        "airflow-apiserver": "127.0.0.1:8080:8080",
    }


def _args(dockerfile):
    with open(os.path.join(ROOT, "docker", dockerfile)) as fh:
        text = fh.read()
    return dict(re.findall(r"^ARG (\w+)=(\S*)", text, re.M)), text


def test_static_dockerfiles_pin_the_versions_of_requirements_txt():
    from ray_embeddings.version_guard import EXPECTED_RAY_VERSION

    pins = _requirements()
    airflow, airflow_text = _args("airflow.Dockerfile")
    ray, ray_text = _args("ray.Dockerfile")
    assert airflow["AIRFLOW_VERSION"] == pins["apache-airflow"]
    assert airflow["PROVIDER_CNCF_KUBERNETES_VERSION"] == pins["apache-airflow-providers-cncf-kubernetes"]
    assert airflow["RAY_VERSION"] == ray["RAY_VERSION"] == pins["ray"] == EXPECTED_RAY_VERSION
    assert ray["TORCH_VERSION"] == pins["torch"]
    assert airflow["PYTHON_VERSION"] == "3.11" and ray["PYTHON_TAG"] == "py311"
    for text in (airflow_text, ray_text):
        assert re.search(r"^USER (?!root)\w+", text, re.M), "images run as a non-root user"
        assert not re.search(r"build-essential|\bgcc\b|apt-get install", text), "no build tools left in"
        assert "--no-cache-dir" in text and "constraints.txt" in text


def test_static_kubernetes_manifests_parse_and_validate():
    from tests.plugins.ray_embeddings.test_kuberay import _validate

    for path in ("include/kuberay/rbac.yaml", "include/helm/airflow-values.yaml"):
        with open(os.path.join(ROOT, path)) as fh:
            assert list(yaml.safe_load_all(fh))
    example = _load("include/kuberay/raycluster-gpu-example.yaml")
    _validate(example)
    with open(os.path.join(ROOT, "include/kuberay/raycluster-gpu-example.yaml")) as fh:
        config = json.loads(next(line for line in fh if line.startswith("# Config: "))[len("# Config: ") :])
    from ray_embeddings.backends.kuberay import KubeRayBackend

    assert KubeRayBackend.from_config(config).render("emb-example") == example, "example is stale: regenerate it"
    gpu = next(g for g in example["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-stages")
    assert gpu["template"]["spec"]["tolerations"] and gpu["template"]["spec"]["nodeSelector"]


def test_version_skew_guard():
    from ray_embeddings.errors import RayJobError
    from ray_embeddings.version_guard import check_compatible

    check_compatible("2.60.3", "2.60.0")
    with pytest.raises(RayJobError, match=r"runs Ray 2\.59\.1 but this Airflow deployment is built for Ray 2\.60\.0"):
        check_compatible("2.59.1", "2.60.0")
    with pytest.raises(RayJobError, match="cannot read Ray version"):
        check_compatible("", "2.60.0")
