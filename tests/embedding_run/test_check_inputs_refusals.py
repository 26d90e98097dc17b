"""What ``check_inputs`` (the run's first task, before any cluster) refuses, each time naming
what to fix: a param the DAG does not declare, a URI the deployment does not allow, a protocol
whose filesystem package is not installed, a catalog that would not outlast its task."""

from __future__ import annotations

import json
import sys

import pytest
from airflow.sdk.exceptions import AirflowFailException

from embedding_run import steps
from embedding_run.config import build_params
from embedding_run.deployment import load_defaults


@pytest.fixture
def params(monkeypatch, demo_assets, tmp_path, tmp_path_factory):
    """The params Airflow hands the task (every declared default, then the conf), for the demo
    assets and an output under a local root the deployment lists."""
    root = str(tmp_path_factory.getbasetemp())  # holds the demo assets and tmp_path
    monkeypatch.setenv("EMB_DEPLOYMENT_ALLOWED_URI_PREFIXES", json.dumps(["s3://", "gs://", root]))
    monkeypatch.delenv("EMB_CATALOG_CONN_ID", raising=False)
    defaults = {name: p.resolve(suppress_exception=True) for name, p in build_params(load_defaults()).items()}
    conf = {"manifest_uri": demo_assets.manifest, "output_uri": str(tmp_path / "out"), "model_uri": demo_assets.model}
    return {**defaults, **conf}


def _no_read(monkeypatch):
    """Fail the test if check_inputs reads the manifest (it must refuse before)."""
    import ray_jobs.planning.manifest as manifest

    def refuse(*a, **k):
        raise AssertionError("the manifest was read before the refusal")

    monkeypatch.setattr(manifest, "read_manifest", refuse)


def test_the_params_as_given_pass(params):
    checked = steps.check_inputs(params)
    assert checked["rows"] == 120 and checked["config"]["batch_size"] == params["batch_size"]


def test_an_unknown_conf_key_fails_naming_it_and_the_closest_param(params, monkeypatch):
    _no_read(monkeypatch)
    with pytest.raises(AirflowFailException, match=r"unknown param 'batchsize' \(did you mean 'batch_size'\?\)"):
        steps.check_inputs({**params, "batchsize": 8})
    with pytest.raises(
        AirflowFailException, match=r"unknown params 'max_reject' \(did you mean 'max_reject_rate'\?\), 'zz'"
    ):
        steps.check_inputs({**params, "max_reject": 0.1, "zz": 1})


@pytest.mark.parametrize("name", ["manifest_uri", "output_uri", "model_uri"])
def test_a_uri_outside_the_deployments_prefixes_fails_naming_the_param(params, monkeypatch, name):
    _no_read(monkeypatch)
    with pytest.raises(AirflowFailException, match=rf"param {name}: 'http://169\.254\.169\.254/latest/' is not under"):
        steps.check_inputs({**params, name: "http://169.254.169.254/latest/"})
    with pytest.raises(AirflowFailException, match=rf"param {name}: '/etc/x' .* not under a local root"):
        steps.check_inputs({**params, name: "/etc/x"})


def test_a_protocol_without_its_filesystem_package_fails_naming_the_package(params, monkeypatch):
    """gs:// is allowed by the default deployment; its package (gcsfs) is made absent here (an
    import of it fails), whether or not this environment has it installed."""
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "gs", raising=False)
    _no_read(monkeypatch)
    with pytest.raises(AirflowFailException) as info:
        steps.check_inputs({**params, "manifest_uri": "gs://bucket/manifest/"})
    assert str(info.value) == (
        "param manifest_uri: gs:// needs the gcsfs package on the Airflow workers and the Ray image "
        "(pip install gcsfs); it is not installed here"
    )


def test_a_catalog_in_airflow_home_is_refused_under_a_remote_executor(params, monkeypatch):
    """The executor as the task sees it (CeleryExecutor, EdgeExecutor: workers share the
    scheduler's configuration) refuses a run without a catalog connection, naming it."""
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")
    _no_read(monkeypatch)
    with pytest.raises(Exception, match=r"catalog_conn_id is empty, but the executor \(CeleryExecutor\)"):
        steps.check_inputs({**params, "output_uri": "s3://bucket/out/"})


def test_image_uris_of_a_protocol_without_its_package_fail_naming_the_package(params, monkeypatch, tmp_path):
    """A manifest whose images are on gs:// (its first row group is sampled), gcsfs absent:
    refused before any cluster, rather than every row rejected as unreadable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setitem(sys.modules, "gcsfs", None)
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "gs", raising=False)
    table = pq.read_table(params["manifest_uri"])
    gs = pa.array([f"gs://images/{i}.jpg" for i in range(table.num_rows)])
    manifest = tmp_path / "gs-manifest"
    manifest.mkdir()
    pq.write_table(table.set_column(table.schema.get_field_index("image_uri"), "image_uri", gs), manifest / "m.parquet")
    with pytest.raises(AirflowFailException, match=r"image_uri gs://images/\d+\.jpg \(manifest file .*m\.parquet\): "
                       r"gs:// needs the gcsfs package on the Airflow workers and the Ray image"):  # fmt: skip
        steps.check_inputs({**params, "manifest_uri": str(manifest)})
