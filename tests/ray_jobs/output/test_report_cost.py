"""The report's cost (stages' resources × time, object-store requests, capacity's prices) and
the last nights beside it."""

import json

import pytest

from ray_jobs.contract.marker import StageStat
from ray_jobs.contract.plan import Plan
from ray_jobs.output.report import build_report, recent_runs, write_report
from ray_jobs.output.validate import PartitionCheck, ValidationReport
from ray_jobs.perf.capacity_model import Prices

SPEC = "text:0-3@cpus=1,gpus=0,pool=1-1|image:0-3@cpus=1,gpus=1,pool=1-1"


def _stats():
    return (
        StageStat("read", "Read", 50, 1, 36.0, 0.1, 0.1, 0, 1.0, 0.0),  # task op: 1 CPU × 36 s busy
        StageStat("preprocess", "MapBatches(Preprocessor)", 50, 4, 0.5, 0.5, 72.0, 2, 1.0, 0.0),  # 2 × 1 CPU × 72 s
        StageStat("stage1", "MapBatches(ModelStage)", 50, 4, 2.0, 1.0, 36.0, 1, 2.0, 1.0, "text:0-3"),
        StageStat("write", "Write", 50, 1, 3.6, 0.1, 0.1, 0, 0.1, 0.0),  # 0.1 CPU × 3.6 s
    )


def _report(output, run_id, prices=None, history=None):
    plan = Plan(run_id, "p1", "m", "fp", str(output), {}, (), ())
    checks = [
        PartitionCheck(i, 50, 50, 48, 2, stages=SPEC, stage_stats=_stats(), timings={"wall_s": 9.5}) for i in range(2)
    ]
    return build_report(
        plan, ValidationReport("p1", "model-0123456789", str(output), tuple(checks)), 20.0, None, prices, history
    )


def test_cost_is_resources_times_time_plus_requests_at_capacitys_prices(tmp_path):
    prices = Prices(gpu_hour=3.6, cpu_hour=0.36, get_per_1k=1.0, put_per_1k=10.0)
    report = _report(tmp_path, "r1", prices, history=())
    cost = report.cost
    # per partition: CPU-s = 36 + 2*72 + 2*36 + 0.36 = 252.36; GPU-s = 36
    assert cost["cpu_hours"] == pytest.approx(2 * 252.36 / 3600)
    assert cost["gpu_hours"] == pytest.approx(2 * 36 / 3600)
    assert cost["compute_usd"] == pytest.approx(2 * 252.36 / 3600 * 0.36 + 2 * 36 / 3600 * 3.6)
    # GETs: 100 rows + 2 partitions × (50 + 3 actors × 200); PUTs: 2 × (1 file + 20)
    assert (cost["gets"], cost["puts"]) == (100 + 2 * (50 + 3 * 200), 2 * 21)
    assert cost["requests_usd"] == pytest.approx(cost["gets"] / 1000 * 1.0 + cost["puts"] / 1000 * 10.0)
    assert cost["total_usd"] == pytest.approx(cost["compute_usd"] + cost["requests_usd"])
    assert cost["prices"] == {"gpu_hour": 3.6, "cpu_hour": 0.36, "get_per_1k": 1.0, "put_per_1k": 10.0}
    assert report.stage_busy_s == {"read": 72.0, "preprocess": 1.0, "stage1": 4.0, "write": 7.2}
    assert [p["wall_s"] for p in report.partitions] == [9.5, 9.5]
    assert "## Cost" in report.to_markdown() and "CPU-hours at $0.36" in report.to_markdown()


def test_the_report_shows_the_last_nights_costs_newest_first(tmp_path):
    for n in range(9):
        earlier = _report(tmp_path, f"night{n}", history=())
        data = json.loads(earlier.to_json())
        data["finished_at"] = f"2026-01-0{n + 1}T06:00:00Z"
        (tmp_path / "runs" / f"night{n}").mkdir(parents=True)
        (tmp_path / "runs" / f"night{n}" / "report.json").write_text(json.dumps(data))
    (tmp_path / "runs" / "_lineage").mkdir()  # not a run
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "report.json").write_text("{not json")
    report = _report(tmp_path, "tonight")
    assert [h["run_id"] for h in report.history] == [f"night{n}" for n in range(8, 1, -1)]  # the 7 newest
    assert all(h["cost_usd"] == pytest.approx(report.cost["total_usd"]) for h in report.history)
    md = report.to_markdown()
    assert "| **tonight** (this run) |" in md and "| night8 | 2026-01-09T06:00:00Z |" in md
    write_report(report)
    assert recent_runs(str(tmp_path), "night8")[0]["run_id"] == "tonight"
    assert json.loads((tmp_path / "runs" / "tonight" / "report.json").read_text())["history"][0]["run_id"] == "night8"


def test_no_committed_stage_statistics_means_no_cost(tmp_path):
    plan = Plan("r", "p1", "m", "fp", str(tmp_path), {}, (), ())
    report = build_report(plan, ValidationReport("p1", "model-0123456789", str(tmp_path), (PartitionCheck(0, 50),)))
    assert report.cost == {} and report.history == () and "Not estimated" in report.to_markdown()
