"""What an operator sees of one real-topology run, checked on that one run: the run page in
headless Chromium (its figures against report.json, a screenshot under
``test-artifacts/browser/``), the mapped tasks' names and progress lines, the OpenLineage
events (the deployment's file transport), the table's Asset event, the metrics a StatsD
listener receives, and the morning deadline alert.

The run is for the night before (its logical date is yesterday 01:00 UTC), so the
deployment's ``finish_by: "07:00"`` has passed when it is created: the alert fires at once,
its callback notifies through the deployment's notifier (a stand-in writing a file: no real
notification service is reachable here), and the run goes on to succeed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time

import pytest

from embedding_run.metrics import NAMES
from tests.topology.airflow_stack import DAG_ID, ROOT, assert_no_ray_left
from tests.topology.trigger_form import BrowserConfig, BrowserUnavailable, TriggerDialog, start_chromium

pytestmark = pytest.mark.integration


def _wait(predicate, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s")


def _lines(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(scope="module")
def night(stack, demo_assets, tmp_path_factory):
    """One run of 2 partitions for yesterday's night, finished; its id, output and report."""
    output = str(tmp_path_factory.mktemp("observed", numbered=True))
    yesterday = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).replace(hour=1, minute=0, second=0, microsecond=0)
    conf = {
        "manifest_uri": demo_assets.manifest,
        "output_uri": output,
        "model_uri": demo_assets.model,
        "batch_size": 16,
        "poll_interval_s": 1,
        "local_num_cpus": 8,
        "max_reject_rate": 0.2,
        "partition_rows": 64,
    }
    r = stack.api("POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": yesterday.isoformat(), "conf": conf})
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    state = stack.wait_run(run_id, timeout=900)
    from embedding_run.steps import plan_run_id

    run_dir = os.path.join(output, "runs", plan_run_id(run_id))
    with open(os.path.join(run_dir, "report.json")) as fh:
        report = json.load(fh)
    assert_no_ray_left(within_s=30)
    return {"run_id": run_id, "state": state, "output": output, "run_dir": run_dir, "report": report}


def test_the_run_succeeds_and_its_mapped_tasks_are_named_and_report_progress(stack, night):
    assert night["state"] == "success", stack.task_instances(night["run_id"])
    report = night["report"]
    embeds = sorted(
        (t for t in stack.task_instances(night["run_id"]) if t["task_id"] == "embed"), key=lambda t: t["map_index"]
    )
    planned = {p["index"]: p["rows_planned"] for p in report["partitions"]}
    assert [t["rendered_map_index"] for t in embeds] == [
        f"partition {k} · {planned[k]:,} rows" for k in sorted(planned)
    ]
    log = stack.task_log(night["run_id"], "embed", 0)
    progress = [line for line in log.splitlines() if "] progress: partition 0: " in line]
    assert progress, log[-3000:]
    assert f"{planned[0]:,} of {planned[0]:,} rows (100.0%)" in progress[-1] and "rows/s" in progress[-1], progress
    with open(os.path.join(night["run_dir"], "progress", "partition=00000.json")) as fh:
        final = json.load(fh)
    assert final["state"] == "done" and final["rows_done"] == planned[0] == final["rows_total"], final


def test_the_run_page_shows_the_reports_figures(stack, night):
    report, run_id = night["report"], night["run_id"]
    links = stack.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/embed/links", params={"map_index": 0})
    assert links.status_code == 200, links.text
    page_url = links.json()["extra_links"]["Run page"]
    assert page_url.startswith(f"{stack.url}/embeddings/runs/{DAG_ID}/"), page_url
    import httpx

    assert httpx.get(page_url, timeout=30).status_code in (401, 403), "the run page answered without a login"

    try:
        config = BrowserConfig.from_env(ROOT)
        driver = start_chromium(config)
    except BrowserUnavailable as exc:
        pytest.fail(f"{exc} (`make system-deps` installs them)")
    try:
        from selenium.webdriver.common.by import By

        ui = TriggerDialog(driver, stack.url, config)
        ui.open_dag(DAG_ID, "admin", stack.password)  # logs in through the UI: the session cookie
        driver.get(page_url)
        _wait(lambda: driver.find_elements(By.ID, "figures"), 60, "the run page")
        shown = {
            e.get_attribute("data-figure"): (json.loads(e.get_attribute("data-value")), e.text)
            for e in driver.find_elements(By.CSS_SELECTOR, "[data-figure]")
        }
        plots = {e.get_attribute("data-plot") for e in driver.find_elements(By.CSS_SELECTOR, "img[data-plot]")}
        partitions = driver.find_elements(By.CSS_SELECTOR, "#partitions tr[data-partition]")
        screenshot = ui.screenshot("run-page")
    finally:
        driver.quit()
    expected = {
        "valid": report["valid"],
        "partitions": len(report["partitions"]),
        "rows_in": report["rows_in"],
        "rows_ok": report["rows_ok"],
        "rows_rejected": report["rows_rejected"],
        "rows_per_s": report["rows_per_s"],
        "wall_s": report["wall_s"],
        "bottleneck": report["stage_balance"]["bottleneck"],
        "cost_usd": report["cost"]["total_usd"],
        "table": report["catalog"]["table"],
        "snapshot_id": report["catalog"]["snapshot_id"],
    }
    assert {k: v for k, (v, _) in shown.items()} == expected, shown
    assert shown["rows_in"][1] == f"{report['rows_in']:,}" and shown["snapshot_id"][1] == str(expected["snapshot_id"])
    assert all(text and text != "-" for _, text in shown.values()), shown
    assert {"partitions", "stages", "startup", "trend"} <= plots, plots
    assert ("rejects" in plots) == bool(report["rejects_by_reason"]), plots
    assert len(partitions) == len(report["partitions"])
    assert os.path.getsize(screenshot) > 10_000, screenshot
    print(f"\nrun page screenshot: {screenshot}")


def test_openlineage_and_the_asset_event_report_the_manifest_and_the_table(stack, night, demo_assets):
    report, run_id = night["report"], night["run_id"]
    path = os.path.join(stack.home, "openlineage.jsonl")

    def catalog_complete():
        return [
            e
            for e in _lines(path)
            if e.get("eventType") == "COMPLETE" and e.get("job", {}).get("name") == f"{DAG_ID}.catalog"
        ]

    events = _wait(catalog_complete, 60, "the catalog task's OpenLineage COMPLETE event")
    event = events[-1]
    assert [(i["namespace"], i["name"]) for i in event["inputs"]] == [("file", os.path.abspath(demo_assets.manifest))]
    (out,) = event["outputs"]
    assert out["name"] == report["catalog"]["table"]
    assert [f["name"] for f in out["facets"]["schema"]["fields"]] == ["id", "text_embedding", "image_embedding"]
    assert out["outputFacets"]["outputStatistics"]["rowCount"] == report["catalog"]["rows"]
    assert out["facets"]["icebergSnapshot"]["snapshotId"] == str(report["catalog"]["snapshot_id"])

    r = stack.api("GET", "/assets/events", params={"source_run_id": run_id, "source_task_id": "catalog"})
    assert r.status_code == 200, r.text
    (asset_event,) = r.json()["asset_events"]
    lineage = asset_event["extra"]["lineage"]
    assert lineage["outputs"][0]["snapshot_id"] == report["catalog"]["snapshot_id"]
    assert lineage["outputs"][0]["row_count"] == out["outputFacets"]["outputStatistics"]["rowCount"]
    assert lineage["inputs"][0]["name"] == event["inputs"][0]["name"]
    emitted = sorted({(e["job"]["name"], e["eventType"]) for e in _lines(path) if run_id in json.dumps(e)})
    print(f"\nOpenLineage events of the run: {emitted}")


def test_the_control_plane_metrics_reach_statsd(stack, night, statsd):
    report = night["report"]

    def seen():
        names = {n.split("embeddings.", 1)[1] for n, _, _ in statsd.metrics("embeddings.")}
        return names >= set(NAMES) and names

    _wait(seen, 60, "the run's embeddings.* metrics at the StatsD listener")
    counts = {n.split("embeddings.", 1)[1]: int(v) for n, v, kind in statsd.metrics("embeddings.") if kind == "c"}
    assert counts["rows_ok"] == report["rows_ok"] and counts["rows_rejected"] == report["rows_rejected"], counts
    assert counts["partitions_done"] == len(report["partitions"]), counts
    timers = [n for n, _, kind in statsd.metrics("embeddings.partition_seconds") if kind == "ms"]
    assert len(timers) >= len(report["partitions"]), timers  # one per committed partition of each run
    (gauge,) = [float(v) for n, v, kind in statsd.metrics("embeddings.run_cost_estimate") if kind == "g"][-1:]
    assert gauge == pytest.approx(report["cost"]["total_usd"]), gauge
    print(f"\nStatsD lines received: {statsd.lines}")


def test_a_missed_morning_deadline_notifies_and_leaves_the_run_alone(stack, night):
    path = os.path.join(stack.home, "deadline-notifications.jsonl")
    notes = _wait(lambda: [n for n in _lines(path) if n["run_id"] == night["run_id"]], 120, "the deadline notification")
    assert "was not finished by 07:00 UTC" in notes[0]["message"], notes
    assert "deadline missed" in stack.log_tail("triggerer", 200_000)
    assert night["state"] == "success"
