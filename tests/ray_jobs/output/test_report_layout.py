"""The run report's stage layout: the decision and its inputs, and the spec each partition ran."""

import json

import pytest

from ray_jobs.contract.marker import StageStat
from ray_jobs.contract.plan import Plan
from ray_jobs.output.report import build_report
from ray_jobs.output.validate import PartitionCheck, ValidationReport

FIRST = "text:0-3@cpus=1,gpus=0,pool=1-1|image:0-3@cpus=1,gpus=0,pool=1-1"
SECOND = "text:0-3,image:0-1@cpus=1,gpus=0,pool=1-1|image:2-3@cpus=1,gpus=0,pool=1-1"
DECISION = {
    "how": "pipeline",
    "reason": "the whole model (9.0 MiB) exceeds one stage (8.0 MiB)",
    "stages": 2,
    "replicas": "1-1, 1-1",
    "spec": FIRST,
    "batch_size": 64,
    "model_bytes": 4 * 1024**2,
    "activation_bytes": 5 * 1024**2,
    "stage_bytes": [5 * 1024**2, 4 * 1024**2],
    "limit_bytes": 8 * 1024**2,
    "limit_source": "max_stage_memory 8MiB",
    "data": {"source": "32 rows", "text_max_length": 64, "text_tokens": {"median": 9, "max": 20}},
}


def _stats(stage1, stage2, layers1, layers2):
    return (
        StageStat("preprocess", "MapBatches(Preprocessor)", 50, 4, 0.1, 0.1, 1.0, 1, 1.0, 0.0),
        StageStat("stage1", "MapBatches(ModelStage)", 50, 4, stage1, 1.0, 2.0, 1, 1.0, 0.0, layers1),
        StageStat("stage2", "MapBatches(ModelStage)", 50, 4, stage2, 0.5, 2.0, 1, 1.0, 0.0, layers2),
    )


def test_the_report_prints_the_decision_and_the_spec_each_partition_ran():
    checks = [
        PartitionCheck(0, 50, 50, 50, 0, stages=FIRST, stage_stats=_stats(0.4, 1.6, "text:0-3", "image:0-3")),
        PartitionCheck(
            1, 50, 50, 50, 0, stages=SECOND, stage_stats=_stats(1.0, 0.9, "text:0-3,image:0-1", "image:2-3")
        ),
    ]
    plan = Plan("run", "p1", "m", "fp", "/out", {}, (), ())
    report = build_report(plan, ValidationReport("p1", "m-1", "/out", tuple(checks)), history=(), layout=DECISION)
    md = report.to_markdown()
    assert "## Stage layout" in md and "layout: pipeline: 2 stage(s), replicas 1-1, 1-1" in md
    assert "model weights 4.0 MiB, activations ~5.0 MiB at batch 64; a stage may hold 8.0 MiB" in md
    assert "caption tokens median 9, max 20 of 64" in md
    assert f"| 1 | 0 | `{FIRST}` |" in md and f"| 2 | 1 | `{SECOND}` |" in md
    data = json.loads(report.to_json())
    assert data["layout"]["how"] == "pipeline" and [p["stages"] for p in data["partitions"]] == [FIRST, SECOND]
    # layout 1 measured 8 + 32 ms a row; layout 2 predicted 24 | 16 ms from that (+33 %), measured 20 | 18 ms (+60 %)
    assert data["layouts"][1]["predicted_gain"] == pytest.approx(1 / 3, abs=1e-3)
    assert data["layouts"][1]["measured_gain"] == pytest.approx(0.6, abs=1e-3)
    assert "| +33% | +60% |" in md
    assert "layout_lines" not in data
