"""Params: an invalid conf is rejected before a run exists, naming the field."""

import copy

import pytest
from airflow.sdk.exceptions import ParamValidationError

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


def test_valid_conf_resolves(dag):
    resolved = _resolve(dag, VALID)
    assert resolved["backend"] == "local" and resolved["num_stages"] >= 1


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"backend": "docker"}, "backend"),
        ({"partition_rows": -5}, "partition_rows"),
        ({"batch_size": 0}, "batch_size"),
        ({"manifest_uri": ""}, "manifest_uri"),
        ({"max_reject_rate": 1.5}, "max_reject_rate"),
        ({"stage_pool": "two"}, "stage_pool"),
        ({"max_partitions": 5000}, "max_partitions"),
    ],
)
def test_invalid_conf_names_the_field(dag, override, field):
    with pytest.raises(ParamValidationError, match=field):
        _resolve(dag, {**VALID, **override})


def test_missing_manifest_uri_is_rejected(dag):
    with pytest.raises(ParamValidationError, match="manifest_uri"):
        _resolve(dag, {k: v for k, v in VALID.items() if k != "manifest_uri"})
