"""The whole DAG, end to end, exactly as `make demo` runs it: `airflow dags test` on SQLite,
the local Ray backend, local storage (and, in the last test, S3 on loopback)."""

import json
import os
import re
import sqlite3
import subprocess
import sys

import pytest

from airflow_ray.backends.local import processes_referencing

pytestmark = pytest.mark.integration
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AIRFLOW = os.path.join(os.path.dirname(sys.executable), "airflow")


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-home")
    env = _env(home)
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    return home


def _env(home, extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": os.path.join(ROOT, "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "dags")]),
            "EMB_RETRIES": "0",
            # the deployment's local root: pytest's base temp dir, holding the home, assets and outputs
            "EMB_DEPLOYMENT_ALLOWED_URI_PREFIXES": json.dumps(["s3://", "gs://", os.path.dirname(str(home))]),
            **(extra or {}),
        }
    )
    return env


def _dags_test(home, conf, extra_env=None):
    proc = subprocess.run(
        [AIRFLOW, "dags", "test", "multimodal_embeddings", "-c", json.dumps(conf)],
        env=_env(home, extra_env),
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    with open(os.path.join(home, "last-dags-test.log"), "w") as fh:  # kept for a failing test's reader
        fh.write(log)
    finished = [line for line in log.splitlines() if "DagRun Finished" in line]
    assert finished, log[-3000:]
    return ("state=success" in finished[-1]), log


def _conf(assets, output, **over):
    return {
        "manifest_uri": assets.manifest,
        "output_uri": str(output),
        "model_uri": assets.model,
        "partition_rows": 64,
        "batch_size": 16,
        "poll_interval_s": 1,
        "local_num_cpus": 6,
        "max_reject_rate": 0.2,  # the demo assets break 10% of the images on purpose
        **over,
    }


def _report(output):
    runs = sorted(
        (os.path.getmtime(p), p)
        for p in (os.path.join(output, "runs", d, "report.json") for d in os.listdir(os.path.join(output, "runs")))
        if os.path.exists(p)
    )
    with open(runs[-1][1]) as fh:
        return json.load(fh)


def _no_ray_left():
    assert processes_referencing("rayemb-") == [], "a Ray process of ours outlived the run"


@pytest.fixture(scope="module")
def first_run(airflow_home, demo_assets, tmp_path_factory):
    output = tmp_path_factory.mktemp("dag-out")
    ok, log = _dags_test(airflow_home, _conf(demo_assets, output))
    return output, ok, log


def test_run_accounts_for_every_row_and_registers_the_table(first_run, demo_assets, airflow_home):
    output, ok, log = first_run
    assert ok, log[-4000:]
    report = _report(output)
    assert report["rows_in"] == 120 and report["rows_rejected"] == 12 and report["rows_ok"] == 108
    assert len(report["partitions"]) == 2 and report["valid"]
    assert report["rejects_by_reason"]["missing object"] == 2
    from ray_jobs.output.catalog import open_catalog

    cat = report["catalog"]
    table = open_catalog(cat["catalog_uri"], os.path.join(output, "warehouse")).load_table(cat["table"])
    assert table.scan().to_arrow().num_rows == 108
    assert table.current_snapshot().summary["embeddings.plan_id"] == report["plan_id"]
    # the asset event carries the same metadata
    with sqlite3.connect(os.path.join(airflow_home, "airflow.db")) as db:
        rows = db.execute(
            "select e.extra from asset_event e join asset a on a.id = e.asset_id "
            "where a.uri = 'iceberg://embeddings/multimodal'"
        ).fetchall()
    extras = [json.loads(r[0]) for r in rows]
    assert any(e.get("snapshot_id") == cat["snapshot_id"] and e.get("rows_ok") == 108 for e in extras), extras
    runs = [d for d in os.listdir(os.path.join(output, "runs")) if not d.startswith("_")]
    assert os.path.exists(os.path.join(output, "runs", runs[0], "report.md"))
    assert "[ray job emb-" in log, "Ray job logs reach the task log"
    _no_ray_left()


def test_second_run_re_embeds_nothing_and_adds_no_rows(first_run, demo_assets, airflow_home):
    output, ok, _ = first_run
    assert ok
    before = _report(output)["catalog"]["snapshot_id"]
    ok, log = _dags_test(airflow_home, _conf(demo_assets, output))
    assert ok, log[-4000:]
    assert "'todo': []" in log, "committed partitions are skipped"
    report = _report(output)
    assert report["catalog"]["snapshot_id"] == before and report["rows_ok"] == 108
    _no_ray_left()


def test_a_redo_run_embeds_only_the_named_partition_and_execution_settings_reuse_work(
    first_run, demo_assets, airflow_home
):
    output, ok, _ = first_run
    assert ok
    before = _report(output)
    conf = _conf(demo_assets, output, batch_size=8, redo_partitions="1")  # batch size: not the output's identity
    ok, log = _dags_test(airflow_home, conf)
    assert ok, log[-4000:]
    assert "'todo': [1]" in log and "'redo': [1]" in log, "only the named partition runs again"
    report = _report(output)
    assert report["valid"] and report["rows_ok"] == 108
    assert report["catalog"]["table"] == before["catalog"]["table"]
    assert report["catalog"]["rows_added"] == report["catalog"]["rows_removed"] > 0, "partition 1's files replaced"
    _no_ray_left()


def _corrupt_first_row_group(manifest_dir, out_dir):
    """A copy of the manifest whose first file's first row group has unreadable data pages
    (the footer stays intact, so checks and planning pass and the partition's job fails)."""
    import shutil

    import pyarrow.parquet as pq

    shutil.copytree(manifest_dir, out_dir)
    first = sorted(f for f in os.listdir(out_dir) if f.endswith(".parquet"))[0]
    path = os.path.join(out_dir, first)
    column = pq.ParquetFile(path).metadata.row_group(0).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    with open(path, "r+b") as fh:
        fh.seek(start)
        fh.write(b"\xff" * column.total_compressed_size)
    return str(out_dir)


def test_a_failing_partition_fails_the_run_names_it_and_still_tears_down(airflow_home, demo_assets, tmp_path):
    manifest = _corrupt_first_row_group(demo_assets.manifest, tmp_path / "manifest")
    ok, log = _dags_test(airflow_home, _conf(demo_assets, tmp_path / "out", manifest_uri=manifest))
    assert not ok
    assert "(partition 0) ended FAILED" in log
    assert "thrift" in log.lower() or "page header" in log.lower(), "the job's own error is in the task log"
    # the teardown itself says the cluster is down (not just any line naming the cluster)
    assert re.search(r"Ray cluster emb-\S+ is down", log), log[-3000:]
    # the report is written for the failed run too, and names what is missing
    report = _report(tmp_path / "out")
    statuses = {p["index"]: p["status"] for p in report["partitions"]}
    assert statuses[0] != "ok" and not report["valid"], statuses
    assert "run incomplete: 1 of" in log and "partitions not committed or not valid (00000)" in log
    _no_ray_left()


def test_reject_rate_above_the_limit_fails_validation(first_run, demo_assets, airflow_home):
    output, ok, _ = first_run
    assert ok
    ok, log = _dags_test(airflow_home, _conf(demo_assets, output, max_reject_rate=0.05))
    assert not ok and "reject rate 0.1000 exceeds max_reject_rate 0.05" in log
    _no_ray_left()


def test_bad_input_fails_before_any_cluster(airflow_home, demo_assets, tmp_path):
    ok, log = _dags_test(airflow_home, _conf(demo_assets, tmp_path, manifest_uri=str(tmp_path / "nope")))
    assert not ok and "holds no .parquet files" in log
    # no cluster was started (cluster_down still runs, as for any run, and finds none)
    assert not re.search(r"Ray cluster emb-\S+ is up", log) and "local Ray" not in log
    assert "run incomplete: it ended before its inputs were checked" in log


def test_everything_on_s3(airflow_home, s3_bucket, tmp_path):
    """Manifest, images, model, outputs and the Iceberg warehouse on a real S3 endpoint (moto, loopback)."""
    from ray_jobs import storage
    from ray_jobs.demo.assets import write_demo_assets
    from ray_jobs.output.catalog import open_catalog

    assets = write_demo_assets(f"{s3_bucket}/dag-demo", rows=40, bad_images=6, files=2, row_group_rows=8)
    output = f"{s3_bucket}/dag-out"
    extra = {
        k: os.environ[k]
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    extra["RAY_JOBS_CACHE_DIR"] = str(tmp_path / "cache")
    # the catalog through an Airflow connection the deployment lists (a SQLite file here)
    extra["AIRFLOW_CONN_ICEBERG_S3_TEST"] = json.dumps({"conn_type": "sqlite", "host": f"{tmp_path}/catalog.db"})
    extra["EMB_DEPLOYMENT_CATALOG_CONN_IDS"] = "iceberg_s3_test"
    conf = _conf(assets, output, partition_rows=1000, catalog_conn_id="iceberg_s3_test")
    ok, log = _dags_test(airflow_home, conf, extra)
    assert ok, log[-4000:]
    fs, root = storage.filesystem_for(f"{output}/runs")
    reports = fs.glob(f"{root}/*/report.json")
    assert len(reports) == 1
    with fs.open(reports[0], "rb") as fh:
        report = json.loads(fh.read())
    assert (report["rows_in"], report["rows_ok"], report["rows_rejected"]) == (40, 34, 6)
    assert report["catalog"]["catalog_uri"] == f"sqlite:///{tmp_path}/catalog.db"
    table = open_catalog(f"sqlite:///{tmp_path}/catalog.db", f"{output}/warehouse").load_table(
        report["catalog"]["table"]
    )
    assert table.metadata_location.startswith("s3://embeddings-test/dag-out/warehouse/")
    assert table.scan().to_arrow().num_rows == 34
    _no_ray_left()
