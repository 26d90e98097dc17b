"""Params: the form submits with its defaults once the three URIs are given; an invalid conf
is rejected before a run exists, naming the field; the choices are the deployment's."""

import copy
import json

import pytest
from airflow.sdk.exceptions import ParamValidationError

from embedding_run.config import REQUIRED, build_params
from embedding_run.deployment import load_defaults
from ray_jobs.config.declare import ConfigError

VALID = {"manifest_uri": "s3://b/m/", "output_uri": "s3://b/o/", "model_uri": "s3://b/model/"}


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    from tests.dags.test_dag_integrity import DAGS

    return DagBag(dag_folder=DAGS).dags["multimodal_embeddings"]


def _resolve(dag, conf):
    params = copy.deepcopy(dag.params)
    params.update(conf)
    return params.validate()


def _form_requires(param) -> bool:
    """The Airflow 3.3 trigger form's own rule (ui FlexibleForm): a param whose schema has a
    type without "null" is required, and an empty value blocks the Trigger button."""
    kind = param.schema.get("type")
    return bool(kind) and not (isinstance(kind, list) and "null" in kind)


def test_only_the_three_uris_are_required_in_the_form(dag):
    required = sorted(name for name in dag.params if _form_requires(dag.params.get_param(name)))
    blocking = [
        name for name in required if name not in REQUIRED and dag.params.get_param(name).value in (None, "", [], {})
    ]
    assert blocking == [], f"optional params the form would mark required and empty: {blocking}"


def test_the_three_uris_alone_validate(dag):
    resolved = _resolve(dag, VALID)
    assert resolved["backend"] == "local" and resolved["num_stages"] == "auto"
    assert resolved["stages"] is None and resolved["catalog_conn_id"] is None
    for name in VALID:  # and each one param at a time through Param.resolve
        copy.deepcopy(dag.params).get_param(name).resolve(VALID[name])


def test_removed_params_are_gone(dag):
    assert "embed_extra_args" not in dag.params and "kuberay" not in dag.params
    assert "catalog_uri" not in dag.params


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"backend": "docker"}, "backend"),
        ({"partition_rows": -5}, "partition_rows"),
        ({"batch_size": 0}, "batch_size"),
        ({"manifest_uri": ""}, "manifest_uri"),
        ({"max_reject_rate": 1.5}, "max_reject_rate"),
        ({"stage_pool": "two"}, "stage_pool"),
        ({"stage_pool": "1-2; touch /tmp/x"}, "stage_pool"),
        ({"stages": "text|image; id"}, "stages"),
        ({"num_stages": "lots"}, "num_stages"),
        ({"num_stages": 0}, "num_stages"),
        ({"max_stage_memory": "4 pigs"}, "max_stage_memory"),
        ({"max_partitions": 5000}, "max_partitions"),
        ({"rows_per_file": 0}, "rows_per_file"),
        ({"local_num_cpus": 10_000}, "local_num_cpus"),
        ({"existing_conn_id": "aws_default"}, "existing_conn_id"),
        ({"catalog_conn_id": "airflow_db"}, "catalog_conn_id"),
        ({"kuberay_image": "evil.example/ray:latest"}, "kuberay_image"),
        ({"kuberay_gpu_workers_max": 10_000}, "kuberay_gpu_workers_max"),
        ({"dataset": "../other"}, "dataset"),
    ],
)
def test_invalid_conf_names_the_field(dag, override, field):
    with pytest.raises(ParamValidationError, match=f"param {field}:"):
        _resolve(dag, {**VALID, **override})


def test_missing_manifest_uri_is_rejected(dag):
    with pytest.raises(ParamValidationError, match="manifest_uri"):
        _resolve(dag, {k: v for k, v in VALID.items() if k != "manifest_uri"})


def test_the_form_offers_exactly_the_deployments_choices():
    env = {
        "EMB_DEPLOYMENT_CATALOG_CONN_IDS": "iceberg_catalog,iceberg_staging",
        "EMB_DEPLOYMENT_EXISTING_CONN_IDS": '["ray_prod"]',
        "EMB_EXISTING_CONN_ID": "ray_prod",
        "EMB_DEPLOYMENT_KUBERAY": json.dumps(
            {"images": ["r.example/ray:a", "r.example/ray:b"], "gpu_workers": {"max_replicas": 4}}
        ),
        "EMB_DEPLOYMENT_BACKENDS": "kuberay",
        "EMB_BACKEND": "kuberay",
    }
    cfg = load_defaults(env)
    params = build_params(cfg)
    assert params["catalog_conn_id"].schema["enum"] == [None, "iceberg_catalog", "iceberg_staging"]
    assert params["existing_conn_id"].schema["enum"] == ["ray_prod"]
    assert params["kuberay_image"].schema["enum"] == [None, "r.example/ray:a", "r.example/ray:b"]
    assert params["kuberay_gpu_workers_max"].schema["maximum"] == 4
    assert params["backend"].schema["enum"] == ["kuberay"]
    # the merge kept the rest of the deployment's kuberay settings
    assert cfg["deployment"]["kuberay"]["gpu_workers"]["gpus"] == 1
    assert cfg["deployment"]["kuberay"]["namespace"] == "ray-embeddings"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EMB_BACKEND": "docker"}, "deployment.backends"),
        ({"EMB_DEPLOYMENT_BACKENDS": "kuberay"}, "'local' is not in deployment.backends"),
        ({"EMB_EXISTING_CONN_ID": "aws_default"}, "not in deployment.existing_conn_ids"),
        ({"EMB_DEPLOYMENT_KUBERAY": '{"cpu_workers": {"min_replicas": 9, "max_replicas": 2}}'}, "cpu_workers"),
        ({"EMB_DEPLOYMENT_LOCAL_MAX_NUM_CPUS": "0"}, "local_max_num_cpus"),
    ],
)
def test_an_invalid_deployment_fails_the_parse_naming_the_key(env, message):
    with pytest.raises(ConfigError, match=message):
        load_defaults(env)


def test_an_invalid_default_fails_the_parse_naming_the_param():
    cfg = load_defaults({"EMB_BATCH_SIZE": "0"})
    with pytest.raises(ConfigError, match="EMB_BATCH_SIZE"):
        build_params(cfg)


def test_nullable_defaults_from_the_environment():
    cfg = load_defaults({"EMB_STAGES": "null", "EMB_PARTITION_BYTES": "1000000", "EMB_PARTITION_ROWS": "none"})
    assert cfg["params"]["stages"] is None and cfg["params"]["partition_bytes"] == 1_000_000
    assert cfg["params"]["partition_rows"] is None
    build_params(cfg)
