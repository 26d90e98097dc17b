"""The run report: stage balance (bottleneck and recommendation) and start-up, from the partitions' markers."""

import json

from ray_jobs.contract.marker import StageStat
from ray_jobs.contract.plan import Plan
from ray_jobs.output.report import RunReport, build_report, startup_medians
from ray_jobs.output.validate import PartitionCheck, ValidationReport

SPEC = "text:0-3@cpus=1,gpus=0,pool=1-1|image:0-3@cpus=1,gpus=0,pool=1-1"


def _stats(stage1_busy):
    return (
        StageStat("read", "Read", 50, 1, 0.1, 0.1, 0.1, 0, 1.0, 0.0),
        StageStat("preprocess", "MapBatches(Preprocessor)", 50, 4, 0.5, 0.5, 1.0, 1, 1.0, 0.0),
        StageStat("stage1", "MapBatches(ModelStage)", 50, 4, stage1_busy, 1.0, 2.0, 1, 1.0, 0.0, "text:0-3"),
        StageStat("stage2", "MapBatches(ModelStage)", 50, 4, 0.5, 0.5, 2.0, 1, 1.0, 0.0, "image:0-3"),
        StageStat("write", "Write", 50, 1, 0.1, 0.1, 0.1, 0, 0.1, 0.0),
    )


def _report(checks):
    plan = Plan("run", "p1", "m", "fp", "/out", {}, (), ())
    return build_report(plan, ValidationReport("p1", "model-0123456789", "/out", tuple(checks)))


def test_the_report_names_the_bottleneck_and_recommends_a_spec():
    checks = [PartitionCheck(i, 50, 50, 50, 0, stages=SPEC, stage_stats=_stats(2.0)) for i in range(2)]
    report = _report(checks)
    balance = report.stage_balance
    assert balance["bottleneck"] == "stage1"
    assert [r["rows_per_s"] for r in balance["measured"]] == [100.0, 25.0, 100.0], "summed over both partitions"
    assert balance["recommended"]["spec"].startswith("text:0-1@")
    md = report.to_markdown()
    assert "## Stage balance" in md and "Bottleneck: **stage1**" in md and "--stages 'text:0-1@" in md
    assert '"bottleneck": "stage1"' in report.to_json()


def test_partitions_without_stage_stats_leave_the_section_empty():
    report = _report([PartitionCheck(0, 50, 50, 50, 0, stages=SPEC)])
    assert report.stage_balance == {} and "No stage statistics" in report.to_markdown()


def _startup_report(partitions):
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
    report = _startup_report(parts)
    assert json.loads(report.to_json())["startup_median"]["startup_driver_s"] == 3.0
    md = report.to_markdown()
    assert "## Start-up (seconds)" in md
    assert "| 2 | 3.0 | - | - | 1.5 | - |" in md and "| **median** | 3.0 | - | - | 1.5 | 8.0 |" in md


def test_no_start_up_section_without_figures():
    report = _startup_report([{"index": 0, "status": "ok"}])
    assert "Start-up" not in report.to_markdown() and json.loads(report.to_json())["startup_median"] == {}
