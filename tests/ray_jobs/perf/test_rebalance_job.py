"""Rebalancing on a real local Ray: a later partition of a plan runs the split measured on an
earlier one, under the same output identity, and the report shows both layouts."""

import pytest

from ray_jobs.config.settings import Partitioning
from ray_jobs.job.config import EmbedConfig
from ray_jobs.job.embed import prepare, run_prepared
from ray_jobs.output.markers import read_marker
from ray_jobs.output.report import build_report
from ray_jobs.output.validate import validate_plan
from ray_jobs.planning.plan import run_plan

pytestmark = pytest.mark.integration

#: one text layer in stage 1, every other layer in stage 2: far out of balance
BAD = "text:0-0@cpus=1,gpus=0,pool=1-1|text:1-3,image:0-5@cpus=1,gpus=0,pool=1-1"


def test_a_later_partition_runs_the_split_measured_on_an_earlier_one(ray_session, demo_assets, tmp_path, capsys):
    plan = run_plan(demo_assets.manifest, str(tmp_path), Partitioning(partition_rows=40), run_id="r").plan

    def cfg(k):  # what the DAG passes: num_stages auto, resolved by check_inputs to BAD
        return EmbedConfig.of(
            output_uri=None,
            model_uri=demo_assets.model,
            plan_uri=f"{tmp_path}/runs/r/plan.json",
            partition=k,
            auto_stages=BAD,
            batch_size=8,
            preprocess_pool=(1, 1),
        )

    first = prepare(cfg(0))
    assert first.layout.spec() == BAD, "nothing committed yet: the run's spec"
    run_prepared(first)
    assert read_marker(first.partition_uri).stages == BAD
    second = prepare(cfg(1))
    printed = capsys.readouterr().out
    assert "rebalance: running" in printed and "measured on partition(s) 0" in printed, printed
    assert second.layout.spec() != BAD and len(second.layout.stages) == 2
    assert second.output_key == first.output_key, "the layout is an execution setting, not identity"
    run_prepared(second)
    assert read_marker(second.partition_uri).stages == second.layout.spec()
    report = build_report(plan, validate_plan(plan, first.model_id, first.embed_dim), history=())
    assert [row["partitions"] for row in report.layouts] == [[0], [1]]
    assert report.layouts[1]["predicted_gain"] > 0.1
    assert report.layouts[1]["measured_gain"] is not None
