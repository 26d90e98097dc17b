"""Ray Data's per-operator summaries -> the marker's stage statistics.

Ray's own OperatorStatsSummary/StatsSummary records are used; only the chain node that holds
them (DatasetStatsSummary, which needs a whole execution to build) is a stand-in here. The real
chain is checked end to end by tests/ray_jobs/job/test_embed.py (integration)."""

from dataclasses import dataclass, field

import pytest
from ray.data._internal.stats import OperatorStatsSummary, StatsSummary

from ray_jobs.model.stage_spec import StageResources, parse_spec, resolve
from ray_jobs.perf.stage_stats import collect_stage_stats, job_shapes


@dataclass
class ChainNodeStandIn:
    operators_stats: list
    parents: list = field(default_factory=list)


def _op(name, rows, wall, tasks=2):
    total = lambda v: StatsSummary(v, v, v, v, 1)  # noqa: E731
    return OperatorStatsSummary(
        operator_name=name,
        is_sub_operator=False,
        time_total_s=wall * 2,
        earliest_start_time=0.0,
        latest_end_time=wall * 2,
        block_execution_summary_str="",
        wall_time=total(wall),
        cpu_time=total(wall / 2),
        output_num_rows=total(rows),
        task_rows=StatsSummary(rows / tasks, rows / tasks, rows / tasks, rows, tasks),
    )


def _chain(*ops):
    node = ChainNodeStandIn([ops[0]])
    for op in ops[1:]:
        node = ChainNodeStandIn([op], [node])
    return node


LAYOUT = resolve(parse_spec("text|image:0-2@pool=2-3|image:3-5", StageResources()), {"text": 4, "image": 6})
SHAPES = job_shapes(LAYOUT, preprocess_cpus=1.0, preprocess_actors=2, read_cpus=1.0, write_cpus=0.1)


def test_operators_are_named_in_execution_order_with_their_layers_and_pools():
    summary = _chain(
        _op("ReadReadRowGroups->SplitBlocks(100)", 120, 0.1),
        _op("MapBatches(Preprocessor)", 120, 2.0),
        _op("MapBatches(ModelStage)", 120, 1.0),
        _op("MapBatches(ModelStage)", 120, 3.0),
        _op("MapBatches(ModelStage)", 120, 0.5),
        _op("Write", 114, 0.05),
    )
    stats = collect_stage_stats(summary, SHAPES)
    assert [s.name for s in stats] == ["read", "preprocess", "stage1", "stage2", "stage3", "write"]
    s2 = stats[3]
    assert (s2.layers, s2.actors, s2.busy_s, s2.cpu_s, s2.span_s, s2.rows, s2.tasks) == (
        "image:0-2",
        3,
        3.0,
        1.5,
        6.0,
        120,
        2,
    )
    assert s2.rows_per_busy_s == 40.0 and stats[1].actors == 2 and stats[-1].actors == 0


def test_a_pipeline_that_is_not_the_jobs_is_refused():
    summary = _chain(_op("Read", 1, 0.1), _op("MapBatches(Preprocessor)", 1, 0.1), _op("Write", 1, 0.1))
    with pytest.raises(ValueError, match="no operator for stage1"):
        collect_stage_stats(summary, SHAPES)
