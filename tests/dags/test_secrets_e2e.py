"""A full run with the Iceberg catalog on a real PostgreSQL whose credentials come from an
Airflow connection (``AIRFLOW_CONN_…``): the password is used (the table is registered in
PostgreSQL) and appears nowhere the run leaves things: XCom, task logs, the asset event,
the serialised DAG and the rest of the metadata database, report files, the run's output.
"""

import json
import os
import sqlite3
from urllib.parse import quote

import pytest

from tests import postgres_server
from tests.dags.test_multimodal_embeddings_e2e import AIRFLOW, _conf, _dags_test, _env, _no_ray_left, _report

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not postgres_server.available(), reason="PostgreSQL binaries (initdb, pg_ctl) not installed"),
]
PASSWORD = "Pg-S3cret!@:/%x9"  # a URL must escape some of these: the escaped form is searched for too
EXTRA_SECRET = "xtra-S3cret-7f3a"


def _forms(secret):
    return {secret, quote(secret, safe=""), quote(secret)}


def _files_containing(root, needles):
    hits = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            except OSError:
                continue
            hits += [(path, n) for n in needles if n.encode() in data]
    return hits


def test_the_catalog_password_appears_nowhere_after_a_full_run(demo_assets, tmp_path_factory):
    import subprocess

    home = tmp_path_factory.mktemp("airflow-home-secrets")
    subprocess.run([AIRFLOW, "db", "migrate"], env=_env(home), check=True, capture_output=True, timeout=300)
    output = tmp_path_factory.mktemp("dag-out-secrets")
    with postgres_server.PostgresServer(PASSWORD) as pg:
        pg.create_database("iceberg")
        conn = {
            "conn_type": "postgres",
            "host": "127.0.0.1",
            "port": pg.port,
            "login": pg.user,
            "password": PASSWORD,
            "schema": "iceberg",
            "extra": {"note": EXTRA_SECRET},
        }
        extra_env = {
            "AIRFLOW_CONN_ICEBERG_PROD": json.dumps(conn),
            "EMB_DEPLOYMENT_CATALOG_CONN_IDS": "iceberg_prod",
        }
        ok, log = _dags_test(home, _conf(demo_assets, output, catalog_conn_id="iceberg_prod"), extra_env)
        assert ok, log[-4000:]

        # the password was really used: the table is in PostgreSQL
        from ray_jobs.output.catalog import open_catalog

        report = _report(output)
        cat = report["catalog"]
        assert cat["catalog_uri"] == f"postgresql+psycopg2://127.0.0.1:{pg.port}/iceberg"
        assert cat["catalog_conn_id"] == "iceberg_prod"
        url = f"postgresql+psycopg2://{pg.user}:{quote(PASSWORD, safe='')}@127.0.0.1:{pg.port}/iceberg"
        table = open_catalog(url, os.path.join(output, "warehouse")).load_table(cat["table"])
        assert table.scan().to_arrow().num_rows == report["rows_ok"] == 108

    needles = sorted(_forms(PASSWORD) | {EXTRA_SECRET})
    leaks = [n for n in needles if n in log]
    assert leaks == [], f"secret in the run's output/task logs: {leaks}"
    with sqlite3.connect(os.path.join(home, "airflow.db")) as db:
        xcoms = db.execute("select task_id, value from xcom").fetchall()
        extras = db.execute("select extra from asset_event").fetchall()
        serialized = db.execute("select data from serialized_dag").fetchall()
    assert xcoms and extras and serialized
    for what, rows in (("xcom", xcoms), ("asset_event", extras), ("serialized_dag", serialized)):
        text = json.dumps([[str(c) for c in row] for row in rows])
        assert not [n for n in needles if n in text], f"secret in {what}"
    catalog_xcom = [v for task, v in xcoms if task == "catalog"]
    assert catalog_xcom and "127.0.0.1" in str(catalog_xcom[0]) and "iceberg_prod" in str(catalog_xcom[0])
    # every file the run left: the metadata DB (all tables), task logs, reports, plans, markers
    assert _files_containing(home, needles) == []
    assert _files_containing(output, needles) == []
    assert os.path.exists(os.path.join(home, "airflow.db"))
    _no_ray_left()
