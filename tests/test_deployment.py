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


def _substituted(env):
    """Compose's ${VAR:?…} / ${VAR:-…} / ${VAR} references replaced by a sample value."""
    return {k: re.sub(r"\$\{(\w+)[^}]*\}", lambda m: f"sample-{m.group(1).lower()}", str(v)) for k, v in env.items()}


def test_static_every_env_var_the_dag_reads_is_set_and_known(compose):
    from embedding_run.config import build_params
    from embedding_run.deployment import load_defaults

    defaults = load_defaults({})
    keys = (
        {f"EMB_{k.upper()}" for k in defaults["params"]}
        | {f"EMB_DEPLOYMENT_{k.upper()}" for k in defaults["deployment"]}
        | {"EMB_DEFAULTS_FILE", "EMB_SCHEDULE", "EMB_OWNER", "EMB_RETRIES", "EMB_RETRY_DELAY_S"}
    )
    for name in ("airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-apiserver"):
        env = _env(compose["services"][name])
        for required in (
            "EMB_MANIFEST_URI",
            "EMB_OUTPUT_URI",
            "EMB_MODEL_URI",
            "EMB_BACKEND",
            "EMB_CATALOG_CONN_ID",
            "EMB_EXISTING_CONN_ID",
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ):
            assert env.get(required), f"{name}: {required} is not set"
        unknown = sorted(k for k in env if k.startswith("EMB_") and k not in keys)
        assert unknown == [], f"{name}: EMB_ variables the DAG does not read (typos?): {unknown}"
        values = _substituted(env)
        conn = json.loads(values["AIRFLOW_CONN_" + env["EMB_EXISTING_CONN_ID"].upper()])
        assert conn["host"] == "http://ray-head:8265" and conn["conn_type"] == "ray_dashboard"
        catalog = json.loads(values["AIRFLOW_CONN_" + env["EMB_CATALOG_CONN_ID"].upper()])
        assert catalog["conn_type"] == "postgres" and catalog["login"] == "iceberg" and catalog["schema"] == "iceberg"
        assert "${ICEBERG_DB_PASSWORD" in env["AIRFLOW_CONN_" + env["EMB_CATALOG_CONN_ID"].upper()]
        # the stack's settings are a valid deployment and give a valid form
        cfg = load_defaults({k: v for k, v in values.items() if k.startswith("EMB_") and k != "EMB_DEFAULTS_FILE"})
        build_params(cfg)
        assert cfg["params"]["catalog_conn_id"] == "iceberg_catalog"


def test_static_no_plaintext_secret_in_compose(compose):
    referenced = set()
    for name, svc in compose["services"].items():
        for key, value in _env(svc).items():
            value = str(value)
            referenced |= set(re.findall(r"\$\{(\w+)", value))
            if key.endswith("_FILE") and value.startswith("/") and " " not in value:
                continue  # a path to a secret file, not a secret
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
    from airflow_ray.version_guard import EXPECTED_RAY_VERSION

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
    # Airflow 3 on PostgreSQL needs both drivers (sync and async); both are pinned in requirements.txt
    assert "psycopg2-binary" in airflow_text and "asyncpg" in airflow_text
    assert {"psycopg2-binary", "asyncpg"} <= set(pins)


def test_static_kubernetes_manifests_parse_and_validate():
    from tests.airflow_ray.test_kuberay import _validate

    for path in ("include/kuberay/rbac.yaml", "include/helm/airflow-values.yaml"):
        with open(os.path.join(ROOT, path)) as fh:
            assert list(yaml.safe_load_all(fh))
    example = _load("include/kuberay/raycluster-gpu-example.yaml")
    _validate(example)
    with open(os.path.join(ROOT, "include/kuberay/raycluster-gpu-example.yaml")) as fh:
        config = json.loads(next(line for line in fh if line.startswith("# Config: "))[len("# Config: ") :])
    from airflow_ray.backends.kuberay import KubeRayBackend

    assert KubeRayBackend.from_config(config).render("emb-example") == example, "example is stale: regenerate it"
    gpu = next(g for g in example["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-stages")
    assert gpu["template"]["spec"]["tolerations"] and gpu["template"]["spec"]["nodeSelector"]


def test_version_skew_guard():
    from airflow_ray.errors import RayJobError
    from airflow_ray.version_guard import check_compatible

    check_compatible("2.60.3", "2.60.0")
    with pytest.raises(RayJobError, match=r"runs Ray 2\.59\.1 but this Airflow deployment is built for Ray 2\.60\.0"):
        check_compatible("2.59.1", "2.60.0")
    with pytest.raises(RayJobError, match="cannot read Ray version"):
        check_compatible("", "2.60.0")


# ---------------------------------------------------------------------------------------------- secrets, login
SECRETS = (
    "POSTGRES_PASSWORD",
    "ICEBERG_DB_PASSWORD",
    "MINIO_ROOT_PASSWORD",
    "RAY_AUTH_TOKEN",
    "AIRFLOW_ADMIN_PASSWORD",
    "AIRFLOW_JWT_SECRET",
)


def _env_example():
    with open(os.path.join(ROOT, ".env.example")) as fh:
        return dict(line.strip().split("=", 1) for line in fh if "=" in line and not line.startswith("#"))


def _preflight(env):
    import subprocess

    return subprocess.run(
        ["sh", os.path.join(ROOT, "docker", "preflight.sh")],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_static_env_example_has_no_usable_secret_and_compose_requires_each(compose):
    example = _env_example()
    assert {name: example[name] for name in SECRETS} == dict.fromkeys(SECRETS, "")
    with open(os.path.join(ROOT, "docker-compose.yaml")) as fh:
        text = fh.read()
    for name in SECRETS:  # ${VAR:?…} refuses an empty value as well as a missing one
        refs = re.findall(r"\$\{" + name + r"(:\?|:-|-|\?|\})", text)
        assert refs and all(r == ":?" for r in refs), f"{name}: {refs}"


def test_preflight_refuses_placeholder_weak_or_unquotable_secrets_and_accepts_strong_ones():
    strong = {name: f"{i}f3a9c0d2b7e14a5c6d8e9f0a1b2c3d4" for i, name in enumerate(SECRETS)}
    ok = _preflight(strong)
    assert ok.returncode == 0, ok.stderr
    for bad in ("", "change-me-postgres", "short-but-ok", 'has"quote0123456789', "has space 0123456789"):
        result = _preflight({**strong, "POSTGRES_PASSWORD": bad})
        assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr, (bad, result.stderr)
    old_placeholders = {
        "POSTGRES_PASSWORD": "change-me-postgres",
        "MINIO_ROOT_PASSWORD": "change-me-minio-secret",
        "RAY_AUTH_TOKEN": "change-me-long-random-ray-token",
        "AIRFLOW_ADMIN_PASSWORD": "change-me-airflow-admin",
        "AIRFLOW_JWT_SECRET": "change-me-shared-jwt-secret",
    }
    result = _preflight({**strong, **old_placeholders})
    assert result.returncode != 0 and all(name in result.stderr for name in old_placeholders)


def _depends(svc):
    deps = svc.get("depends_on") or {}
    return set(deps) if isinstance(deps, (dict, list)) else set()


def test_static_every_service_waits_for_preflight(compose):
    services = compose["services"]
    assert services["preflight"]["entrypoint"] == ["sh", "/preflight.sh"]
    assert set(_env(services["preflight"])) == set(SECRETS)

    def waits(name, seen=()):
        deps = _depends(services[name])
        return "preflight" in deps or any(waits(d, (*seen, name)) for d in deps if d not in seen)

    assert sorted(n for n in services if n != "preflight" and not waits(n)) == []
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            if dep == "preflight":
                assert cond == {"condition": "service_completed_successfully"}, name


def test_static_the_ui_has_a_real_login_not_all_admins(compose):
    services = compose["services"]
    for name, svc in services.items():
        env = _env(svc)
        if any(k.startswith("AIRFLOW__") for k in env):
            assert env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS") == "False", name
            assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == "admin:admin", name
    path = _env(services["airflow-apiserver"])["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    init = services["airflow-init"]
    assert "${AIRFLOW_ADMIN_PASSWORD" in _env(init)["AIRFLOW_ADMIN_PASSWORD"]
    script = " ".join(init["command"])
    assert path in script and "umask 077" in script and "airflow db migrate" in script
    volume = os.path.dirname(path)
    for name in ("airflow-init", "airflow-apiserver"):
        mounts = [m.split(":") for m in services[name]["volumes"]]
        assert any(m[1] == volume for m in mounts if len(m) > 1), f"{name} lacks the password volume"
    assert "AIRFLOW_ADMIN_PASSWORD" not in _env(services["airflow-scheduler"])


@pytest.mark.integration
def test_postgres_init_gives_the_catalog_its_own_role_and_database(tmp_path):
    """docker/postgres-init.sh against a real PostgreSQL, as the postgres image runs it."""
    import subprocess

    from tests import postgres_server

    if not postgres_server.available():
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl, psql) not installed")
    import psycopg2

    with postgres_server.PostgresServer("admin-0123456789abcdef") as pg:
        env = {
            "PATH": os.path.dirname(postgres_server._bin("psql")) + os.pathsep + os.environ["PATH"],
            "PGHOST": "127.0.0.1",
            "PGPORT": str(pg.port),
            "PGPASSWORD": pg.password,
            "POSTGRES_USER": pg.user,
            "ICEBERG_DB_PASSWORD": "iceberg-0123456789abcdef",
        }
        subprocess.run(["sh", os.path.join(ROOT, "docker", "postgres-init.sh")], env=env, check=True, timeout=60)
        with (
            psycopg2.connect(
                host="127.0.0.1", port=pg.port, user="iceberg", password="iceberg-0123456789abcdef", dbname="iceberg"
            ) as conn,
            conn.cursor() as cur,
        ):
            cur.execute("select current_user, current_database()")
            assert cur.fetchone() == ("iceberg", "iceberg")
            cur.execute("select rolsuper from pg_roles where rolname = 'iceberg'")
            assert cur.fetchone() == (False,)
