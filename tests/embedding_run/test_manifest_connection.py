"""An ``iceberg://`` manifest's catalog from the Airflow connection ``manifest_conn_id`` names:
only connections the deployment lists, resolved at task run time like the output catalog's,
the password masked and never in what leaves the task."""

import json

import pyarrow as pa
import pytest
from airflow.sdk import Connection
from airflow.sdk._shared.secrets_masker import redact
from airflow.sdk.exceptions import AirflowFailException

from embedding_run.catalog_connection import CatalogConnectionError
from embedding_run.config import RunConfig, param_schemas
from embedding_run.deployment import load_defaults
from embedding_run.manifest_connection import from_manifest_connection, manifest_target
from ray_jobs.config.declare import ConfigError

PASSWORD = "m4n1f@st:pw/%"
TABLE_URI = "iceberg://manifests.products"
URIS = {"manifest_uri": TABLE_URI, "output_uri": "s3://b/o/", "model_uri": "s3://b/model/"}


def _deployment(**over):
    environ = {
        "EMB_DEPLOYMENT_MANIFEST_CONN_IDS": "lake_manifests",
        "EMB_DEPLOYMENT_ALLOWED_URI_PREFIXES": "s3://,iceberg://",
        **over,
    }
    return load_defaults(environ, executor="LocalExecutor")["deployment"]


def test_a_postgres_connection_opens_the_catalog_and_only_its_redacted_form_leaves():
    conn = Connection(
        conn_id="lake_manifests",
        conn_type="postgres",
        host="pg.internal",
        port=5432,
        login="reader",
        password=PASSWORD,
        schema="lake",
        extra=json.dumps({"catalog_name": "lake"}),
    )
    target = from_manifest_connection(conn, "lake_manifests")
    catalog = target.catalog()
    assert catalog.uri.startswith("postgresql+psycopg2://reader:") and catalog.name == "lake"
    public = json.dumps(target.public())
    assert "m4n1f" not in public and "pg.internal:5432/lake" in public and "lake_manifests" in public
    assert "m4n1f" not in repr(target) and "m4n1f" not in repr(catalog)
    assert "m4n1f" not in redact(f"cannot open {catalog.uri} ({PASSWORD})")


def test_a_bad_catalog_name_is_refused():
    conn = Connection(conn_id="c", conn_type="sqlite", host="/x.db", extra='{"catalog_name": "a b"}')
    with pytest.raises(CatalogConnectionError, match=r"extra\.catalog_name"):
        from_manifest_connection(conn, "c")


def test_a_parquet_manifest_needs_no_connection_and_a_table_needs_one():
    assert manifest_target(None, "s3://b/m/") is None
    assert manifest_target("never_read", "/data/manifest") is None
    with pytest.raises(CatalogConnectionError, match="set manifest_conn_id"):
        manifest_target(None, TABLE_URI)
    with pytest.raises(CatalogConnectionError, match="'absent' does not exist"):
        manifest_target("absent", TABLE_URI)


def test_the_form_offers_only_the_connections_the_deployment_lists():
    deployment = _deployment()
    assert param_schemas(deployment)["manifest_conn_id"]["enum"] == [None, "lake_manifests"]
    config = RunConfig.from_params({**URIS, "manifest_conn_id": "lake_manifests"}, deployment)
    assert config.catalog.manifest_conn_id == "lake_manifests"
    with pytest.raises(ConfigError, match="param manifest_conn_id"):
        RunConfig.from_params({**URIS, "manifest_conn_id": "someone_elses"}, deployment)
    with pytest.raises(ConfigError, match="manifest_catalog_uri"):  # never a param: it would hold credentials
        RunConfig.from_params({**URIS, "manifest_catalog_uri": "postgresql://u:p@h/db"}, deployment)
    with pytest.raises(ConfigError, match="param manifest_uri"):  # iceberg:// only where the deployment lists it
        RunConfig.from_params(
            {**URIS, "manifest_conn_id": "lake_manifests"}, _deployment(EMB_DEPLOYMENT_ALLOWED_URI_PREFIXES="s3://")
        )


def test_check_inputs_reads_the_table_through_the_connection(monkeypatch, tmp_path):
    """The connection (sqlite, ``extra.catalog_name``) as the task resolves it at run time,
    through the step's own resolver, opens a real pyiceberg catalog and lists the table's files."""
    from pyiceberg.catalog.sql import SqlCatalog

    from embedding_run.steps import manifest_target as step_target
    from ray_jobs.planning.manifest import read_manifest

    db = tmp_path / "lake.db"
    cat = SqlCatalog("lake", uri=f"sqlite:///{db}", warehouse=f"file://{tmp_path}/wh")
    cat.create_namespace("manifests")
    rows = pa.table({"id": ["a", "b"], "text": ["x", "y"], "image_uri": ["/i/a.jpg", "/i/b.jpg"]})
    cat.create_table("manifests.products", schema=rows.schema).append(rows)
    monkeypatch.setenv(
        "AIRFLOW_CONN_LAKE_MANIFESTS",
        json.dumps({"conn_type": "sqlite", "host": str(db), "extra": {"catalog_name": "lake"}}),
    )
    config = RunConfig.from_dict({**URIS, "manifest_conn_id": "lake_manifests"})
    target = step_target(config)
    files = read_manifest(TABLE_URI, catalog=target.catalog())
    assert [f.rows for f in files] == [2] and files[0].uri.startswith(f"{tmp_path}/wh/")
    assert target.public()["manifest_catalog_uri"] == f"sqlite:///{db}"

    missing = RunConfig.from_dict({**URIS, "manifest_conn_id": "nope"})
    with pytest.raises(AirflowFailException, match="manifest connection 'nope' does not exist"):
        step_target(missing)


def test_lineage_names_a_manifest_table_in_its_catalog():
    from embedding_run.lineage import run_lineage

    checked = {
        "config": {"manifest_uri": TABLE_URI},
        "rows": 55,
        "embed_dim": 8,
        "manifest_catalog_uri": "postgresql+psycopg2://pg.internal:5432/lake",
    }
    result = {"table": "embeddings.t", "snapshot_id": 1, "rows": 55, "catalog_uri": "sqlite:////o/c.db"}
    (source,) = run_lineage(checked, result)["inputs"]
    assert (source["namespace"], source["name"]) == (
        "postgresql+psycopg2://pg.internal:5432/lake",
        "manifests.products",
    )
