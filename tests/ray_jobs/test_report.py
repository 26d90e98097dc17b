"""The run report's start-up section: per-partition figures from the markers, and their medians."""

from __future__ import annotations

import json

from ray_jobs.report import RunReport, startup_medians


def _report(partitions):
    return RunReport(
        run_id="r",
        plan_id="p",
        model_id="m",
        output_uri="/tmp/o",
        partitions=tuple(partitions),
        rejects_by_reason={},
        rows_in=30,
        rows_ok=30,
        rows_rejected=0,
        wall_s=10.0,
        valid=True,
    )


def test_start_up_medians_skip_partitions_without_figures_and_show_in_json_and_markdown():
    parts = [
        {"index": 0, "status": "ok", "startup": {"startup_driver_s": 2.0, "time_to_first_batch_s": 9.0}},
        {"index": 1, "status": "ok", "startup": {"startup_driver_s": 4.0, "time_to_first_batch_s": 7.0}},
        {"index": 2, "status": "ok", "startup": {"startup_driver_s": 3.0, "startup_model_load_s": 1.5}},
        {"index": 3, "status": "missing"},
    ]
    assert startup_medians(parts) == {
        "startup_driver_s": 3.0,
        "startup_model_load_s": 1.5,
        "time_to_first_batch_s": 8.0,
    }
    report = _report(parts)
    assert json.loads(report.to_json())["startup_median"]["startup_driver_s"] == 3.0
    md = report.to_markdown()
    assert "## Start-up (seconds)" in md
    assert "| 2 | 3.0 | - | - | 1.5 | - |" in md and "| **median** | 3.0 | - | - | 1.5 | 8.0 |" in md


def test_no_start_up_section_without_figures():
    report = _report([{"index": 0, "status": "ok"}])
    assert "Start-up" not in report.to_markdown() and json.loads(report.to_json())["startup_median"] == {}
