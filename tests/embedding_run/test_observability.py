"""What an operator sees, unit by unit: the morning deadline, the run's lineage, its metrics,
the mapped tasks' names, and the run page rendered from a report (the real-topology test
tests/topology/test_run_observability.py runs them all on one run)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import ClassVar

import pytest

from embedding_run.deadline import DeadlineSettings, FinishBy, deadline_alert, deadline_missed, first_after, time_of_day
from embedding_run.jobs import partition_label
from embedding_run.lineage import dataset_name, operator_lineage, run_lineage
from embedding_run.metrics import NAMES, emit_run_metrics
from embedding_run.run_page import render_page, run_page_path
from embedding_run.run_plots import PLOTS
from embedding_run.run_view import RunView
from ray_jobs.config.declare import ConfigError

UTC = dt.UTC


# ------------------------------------------------------------------ deadline
def test_finish_by_is_the_first_time_of_day_at_or_after_the_night():
    at = time_of_day("07:00")
    assert first_after(dt.datetime(2026, 3, 1, 2, 0, tzinfo=UTC), at) == dt.datetime(2026, 3, 1, 7, 0, tzinfo=UTC)
    assert first_after(dt.datetime(2026, 3, 1, 7, 0, tzinfo=UTC), at) == dt.datetime(2026, 3, 1, 7, 0, tzinfo=UTC)
    assert first_after(dt.datetime(2026, 3, 1, 23, 0, tzinfo=UTC), at) == dt.datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
    assert time_of_day("06:59:30") == dt.time(6, 59, 30, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["7am", "24:00", "07:60", "", "07:00:00:00"])
def test_a_bad_finish_by_fails_the_parse_naming_the_setting(bad):
    with pytest.raises(ConfigError, match="finish_by"):
        DeadlineSettings(finish_by=bad)


def test_the_deployment_names_the_deadline_and_its_notifier():
    assert deadline_alert({"finish_by": None}) is None
    alert = deadline_alert(
        {"finish_by": "07:00", "deadline_notifier": "pkg.mod.Notifier", "deadline_notifier_kwargs": {"a": 1}}
    )
    assert alert.reference == FinishBy("07:00") and alert.interval == dt.timedelta(0)
    assert alert.callback.path == "embedding_run.deadline.deadline_missed"
    assert alert.callback.kwargs == {"finish_by": "07:00", "notifier": "pkg.mod.Notifier", "notifier_kwargs": {"a": 1}}
    assert FinishBy.deserialize_reference(alert.reference.serialize_reference()) == FinishBy("07:00")
    with pytest.raises(ConfigError, match="deadline_notifier"):
        deadline_alert({"finish_by": "07:00", "deadline_notifier": "not a path"})


class _Notifier:
    seen: ClassVar[list] = []

    def __init__(self, channel: str):
        self.channel = channel

    async def async_notify(self, context):
        _Notifier.seen.append((self.channel, context["deadline_message"]))


def test_the_callback_logs_and_notifies_through_the_named_notifier(caplog):
    context = {"dag_run": {"dag_run_id": "scheduled__x", "dag_id": "multimodal_embeddings", "state": "running"}}
    message = asyncio.run(deadline_missed(context, "07:00", f"{__name__}._Notifier", {"channel": "#night-shift"}))
    assert "run scheduled__x of multimodal_embeddings was not finished by 07:00 UTC" in message
    assert _Notifier.seen == [("#night-shift", message)]
    assert message in caplog.text


# ------------------------------------------------------------------ lineage
CHECKED = {"config": {"manifest_uri": "s3://bucket/manifests/2026-03-01/"}, "rows": 120, "embed_dim": 8}
RESULT = {
    "table": "embeddings.demo__tt-0123456789",
    "snapshot_id": 8123456789012345678,
    "rows": 108,
    "new_snapshot": True,
    "model_id": "tt-0123456789",
    "catalog_uri": "postgresql://db/iceberg",
}


def test_lineage_names_the_manifest_in_and_the_table_out_with_schema_rows_and_snapshot():
    assert dataset_name("/data/m.parquet") == ("file", "/data/m.parquet")
    lineage = run_lineage(CHECKED, RESULT)
    assert lineage["inputs"] == [
        {
            "namespace": "s3://bucket",
            "name": "manifests/2026-03-01/",
            "uri": CHECKED["config"]["manifest_uri"],
            "rows": 120,
        }
    ]
    (out,) = lineage["outputs"]
    assert (out["namespace"], out["name"], out["row_count"], out["snapshot_id"]) == (
        "postgresql://db/iceberg",
        RESULT["table"],
        108,
        RESULT["snapshot_id"],
    )
    assert [f["name"] for f in out["schema"]] == ["id", "text_embedding", "image_embedding"]
    json.dumps(lineage)  # the Asset event carries it as is

    ol = operator_lineage(lineage)
    assert [(d.namespace, d.name) for d in ol.inputs] == [("s3://bucket", "manifests/2026-03-01/")]
    (table,) = ol.outputs
    assert table.outputFacets["outputStatistics"].rowCount == 108
    assert table.facets["icebergSnapshot"].snapshotId == str(RESULT["snapshot_id"])
    assert [f.name for f in table.facets["schema"].fields] == ["id", "text_embedding", "image_embedding"]


# ------------------------------------------------------------------ metrics and names
REPORT = {
    "run_id": "night3",
    "finished_at": "2026-03-03T05:00:00Z",
    "valid": True,
    "rows_in": 120,
    "rows_ok": 108,
    "rows_rejected": 12,
    "rows_per_s": 2.5,
    "wall_s": 48.0,
    "partitions": [
        {
            "index": 0,
            "rows_planned": 64,
            "rows_in": 64,
            "rows_ok": 58,
            "rows_rejected": 6,
            "status": "ok",
            "rows_per_s": 3.1,
            "wall_s": 20.5,
            "startup": {"startup_admission_wait_s": 0.4},
        },
        {
            "index": 1,
            "rows_planned": 56,
            "rows_in": 56,
            "rows_ok": 50,
            "rows_rejected": 6,
            "status": "ok",
            "rows_per_s": 2.9,
            "wall_s": 19.0,
        },
    ],
    "rejects_by_reason": {"decode": 8, "too_small": 4},
    "startup_median": {"startup_driver_s": 1.5, "startup_model_load_s": 2.0},
    "stage_balance": {"bottleneck": "stage1"},
    "stage_busy_s": {"read": 1.0, "preprocess": 4.0, "stage1": 9.0, "write": 0.5},
    "cost": {"total_usd": 0.0123},
    "catalog": {"table": "embeddings.demo__tt", "snapshot_id": 42},
    "history": [
        {
            "run_id": "night2",
            "finished_at": "2026-03-02T05:00:00Z",
            "rows_in": 100,
            "rows_per_s": 2.0,
            "wall_s": 50.0,
            "cost_usd": 0.011,
        },
    ],
}


class _Stats:
    def __init__(self):
        self.calls = []

    def incr(self, name, count=1):
        self.calls.append(("incr", name, count))

    def timing(self, name, value):
        self.calls.append(("timing", name, value.total_seconds()))

    def gauge(self, name, value):
        self.calls.append(("gauge", name, value))


def test_the_report_becomes_the_six_metrics():
    stats = _Stats()
    emitted = emit_run_metrics(REPORT, stats)
    assert set(emitted) == set(NAMES)
    assert stats.calls == [
        ("incr", "embeddings.rows_ok", 108),
        ("incr", "embeddings.rows_rejected", 12),
        ("incr", "embeddings.partitions_done", 2),
        ("timing", "embeddings.partition_seconds", 20.5),
        ("timing", "embeddings.partition_seconds", 19.0),
        ("timing", "embeddings.admission_wait_seconds", 0.4),
        ("gauge", "embeddings.run_cost_estimate", 0.0123),
    ]


def test_work_kept_from_earlier_nights_is_not_counted_again():
    stats = _Stats()
    emitted = emit_run_metrics(REPORT, stats, embedded=[1])
    assert (emitted["rows_ok"], emitted["rows_rejected"], emitted["partitions_done"]) == (50, 6, 1)
    assert emitted["partition_seconds"] == [19.0] and emitted["admission_wait_seconds"] == []
    assert emit_run_metrics(REPORT, _Stats(), embedded=[])["rows_ok"] == 0, "a night with no change embeds nothing"


def test_a_mapped_partition_is_named_by_its_index_and_rows():
    assert partition_label(17, 1_000_000) == "partition 17 · 1,000,000 rows"
    assert partition_label(3, None) == "partition 3"


# ------------------------------------------------------------------ run page
def test_the_run_page_shows_the_reports_figures_and_plots():
    view = RunView(
        "multimodal_embeddings",
        "manual__2026-03-03",
        "success",
        "/out/runs/r",
        REPORT,
        progress=(
            {"partition": 2, "state": "running", "rows_done": 10, "rows_total": 40, "rows_per_s": 1.0, "eta_s": 30},
        ),
    )
    assert view.figures()["bottleneck"] == "stage1" and view.figures()["cost_usd"] == 0.0123
    assert [p["state"] for p in view.partition_rows()] == ["ok", "ok", "running"]
    assert [n["run_id"] for n in view.trend()] == ["night2", "night3"]
    for name, plot in PLOTS.items():
        assert plot(view)[:8] == b"\x89PNG\r\n\x1a\n", name
    page = render_page(view)
    assert 'data-figure="rows_in" data-value="120">120<' in page
    assert 'data-figure="snapshot_id" data-value="42">42<' in page
    assert page.count("<img data-plot=") == len(PLOTS) and "<script" not in page and 'src="http' not in page
    assert run_page_path("multimodal_embeddings", "manual__2026-03-03T01:00:00+00:00") == (
        "/embeddings/runs/multimodal_embeddings/manual__2026-03-03T01%3A00%3A00%2B00%3A00"
    )


def test_a_running_run_shows_its_progress_and_no_report_plots():
    view = RunView("d", "r", "running", "/out/runs/r", None, ({"partition": 0, "rows_done": 5, "rows_total": 9},), 3)
    assert view.figures()["partitions"] == 3 and view.trend() == []
    page = render_page(view)
    assert "running: figures from the partitions' progress" in page and 'data-plot="partitions"' in page


def test_the_run_page_refuses_a_caller_without_a_token():
    """Without a token or the UI's cookie: 401 before anything is read (a token is checked by
    Airflow's auth manager: tests/topology/test_run_observability.py)."""
    from fastapi.testclient import TestClient

    from embedding_run.run_page import LazyApp

    client = TestClient(LazyApp())
    assert client.get("/runs/multimodal_embeddings/r").status_code == 401
    assert client.get("/runs/multimodal_embeddings/r/figures.json").status_code == 401
