"""The run report's stage balance: bottleneck and recommendation from the partitions' markers."""

from ray_jobs.contract import Plan, StageStat
from ray_jobs.report import build_report
from ray_jobs.validate import PartitionCheck, ValidationReport

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
