"""The catalog from an Airflow connection: the URL opens the catalog, only a redacted form
leaves the task, and the password is registered with Airflow's secrets masker."""

import json

import pytest
from airflow.sdk import Connection
from airflow.sdk._shared.secrets_masker import redact
from airflow.sdk.exceptions import AirflowFailException

from embedding_run.catalog_connection import (
    CatalogConnectionError,
    CatalogTarget,
    from_connection,
    resolve_catalog,
)

PASSWORD = "s3cr3t@p:ss/w%rd"  # characters a URL must escape: the escaped form is masked too


def _pg(**over):
    fields = {
        "conn_id": "iceberg_catalog",
        "conn_type": "postgres",
        "host": "pg.internal",
        "port": 5432,
        "login": "iceberg",
        "password": PASSWORD,
        "schema": "iceberg",
        **over,
    }
    return Connection(**fields)


def test_postgres_connection_gives_the_url_and_a_redacted_form():
    target = from_connection(_pg(), "iceberg_catalog")
    assert target.uri == "postgresql+psycopg2://iceberg:s3cr3t%40p%3Ass%2Fw%25rd@pg.internal:5432/iceberg"
    assert target.redacted_uri == "postgresql+psycopg2://pg.internal:5432/iceberg"
    public = json.dumps(target.public())
    assert PASSWORD not in public and "s3cr3t" not in public and "iceberg_catalog" in public
    assert "s3cr3t" not in repr(target) and "s3cr3t" not in str(target)


def test_the_password_and_its_url_forms_are_masked_in_logs():
    target = from_connection(_pg(), "iceberg_catalog")
    line = f"could not connect to {target.uri} with password {PASSWORD}"
    masked = redact(line)
    assert "s3cr3t" not in masked and "%40p" not in masked and masked.count("***") >= 2, masked


def test_the_sqlalchemy_url_opens_with_the_password(tmp_path):
    """SQLAlchemy reads back exactly the connection's credentials from the built URL."""
    from sqlalchemy.engine import make_url

    url = make_url(from_connection(_pg(), "iceberg_catalog").uri)
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "iceberg",
        PASSWORD,
        "pg.internal",
        5432,
        "iceberg",
    )


def test_other_shapes():
    sqlite = from_connection(Connection(conn_id="c", conn_type="sqlite", host="/data/cat.db"), "c")
    assert sqlite.uri == sqlite.redacted_uri == "sqlite:////data/cat.db"
    rest = from_connection(
        Connection(conn_id="c", conn_type="http", extra=json.dumps({"pyiceberg_catalog": "prod"})), "c"
    )
    assert rest.uri == "pyiceberg:prod"
    driver = from_connection(_pg(extra=json.dumps({"sqlalchemy_scheme": "postgresql+psycopg"})), "c")
    assert driver.uri.startswith("postgresql+psycopg://") and driver.redacted_uri.startswith("postgresql+psycopg://")
    with pytest.raises(CatalogConnectionError, match="conn_type 'aws'"):
        from_connection(Connection(conn_id="c", conn_type="aws", host="x"), "c")
    with pytest.raises(CatalogConnectionError, match="not a name"):
        from_connection(Connection(conn_id="c", conn_type="http", extra='{"pyiceberg_catalog": "../x"}'), "c")
    with pytest.raises(ValueError):
        CatalogTarget(uri="", redacted_uri="")


def test_resolved_at_run_time_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(
        "AIRFLOW_CONN_ICEBERG_TEST",
        json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "c.db")}),
    )
    assert resolve_catalog("iceberg_test", "/out").uri == f"sqlite:///{tmp_path}/c.db"
    assert resolve_catalog(None, str(tmp_path)).uri == f"sqlite:///{tmp_path}/iceberg_catalog.db"
    with pytest.raises(CatalogConnectionError, match="does not exist"):
        resolve_catalog("no_such_conn", "/out")


def test_a_missing_connection_fails_check_inputs_before_any_cluster(monkeypatch):
    from embedding_run.config import RunConfig
    from embedding_run.steps import catalog_target

    config = RunConfig.from_dict(
        {"catalog_conn_id": "nope", "manifest_uri": "/m", "output_uri": "/out", "model_uri": "/x"}
    )
    with pytest.raises(AirflowFailException, match="catalog connection 'nope' does not exist"):
        catalog_target(config)
