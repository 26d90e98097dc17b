"""Per-operator execution statistics of a finished partition pipeline, from Ray Data's own stats.

The partition's dataset runs as one chain: read -> preprocess -> stage1 .. stageK -> write
(:func:`ray_jobs.job.pipeline.build_dataset`). After the write has executed, the dataset's
:meth:`ray.data.Dataset.get_stats_summary` is a :class:`~ray.data._internal.stats.DatasetStatsSummary`
whose ``operators_stats`` hold the last operator and whose ``parents`` hold the earlier ones.
:func:`collect_stage_stats` walks that chain in execution order and names each operator by
the :class:`PoolShape` the job gave it, turning Ray's summaries into
:class:`~ray_jobs.contract.marker.StageStat` records for the commit marker.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ray_jobs.contract.marker import StageStat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolShape:
    """What the job asked for one operator: its name, the Ray operator name it runs as, its
    per-worker resources, its actor-pool size (0: tasks) and, for model stages, its layers."""

    name: str
    operator_hint: str
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    actors: int = 0
    layers: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.operator_hint:
            raise ValueError("a pool shape needs a name and an operator hint")
        if self.actors < 0 or self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"pool shape {self.name}: actors and resources must be >= 0")


def job_shapes(
    layout, preprocess_cpus: float, preprocess_actors: int, read_cpus: float, write_cpus: float
) -> tuple[PoolShape, ...]:
    """The operators of a partition job in execution order (see :func:`ray_jobs.job.pipeline.build_dataset`)."""
    shapes = [
        PoolShape("read", "Read", num_cpus=read_cpus),
        PoolShape("preprocess", "Preprocessor", preprocess_cpus, 0.0, preprocess_actors),
    ]
    for stage in layout.stages:
        res = stage.resources
        shapes.append(
            PoolShape(
                stage.name,
                "ModelStage",
                res.num_cpus,
                res.num_gpus,
                res.max_pool,
                ",".join(r.spec() for r in stage.ranges),
            )
        )
    shapes.append(PoolShape("write", "Write", num_cpus=write_cpus))
    return tuple(shapes)


def operators_in_order(summary) -> list:
    """Every non-sub operator summary of *summary*'s chain, earliest first."""
    out: list = []

    def walk(node) -> None:
        for parent in getattr(node, "parents", None) or ():
            walk(parent)
        out.extend(op for op in node.operators_stats if not op.is_sub_operator)

    walk(summary)
    return out


def _total(stat) -> float:
    return float(stat.sum) if stat is not None else 0.0


def collect_stage_stats(summary, shapes: Sequence[PoolShape]) -> tuple[StageStat, ...]:
    """Match *summary*'s operators to *shapes* in order (an operator whose Ray name contains the
    shape's ``operator_hint``); operators that match no shape (Ray's own) are skipped. Raises
    :class:`ValueError` when a shape finds no operator: the pipeline is not the one described."""
    ops = operators_in_order(summary)
    out, pos = [], 0
    for shape in shapes:
        while pos < len(ops) and shape.operator_hint not in ops[pos].operator_name:
            pos += 1
        if pos == len(ops):
            names = [op.operator_name for op in ops]
            raise ValueError(f"no operator for {shape.name} ({shape.operator_hint}) in the pipeline's stats {names}")
        op = ops[pos]
        pos += 1
        out.append(
            StageStat(
                name=shape.name,
                operator=op.operator_name,
                rows=int(_total(op.output_num_rows)),
                tasks=int(op.task_rows.count) if op.task_rows is not None else 0,
                busy_s=round(_total(op.wall_time), 4),
                cpu_s=round(_total(op.cpu_time), 4),
                span_s=round(float(op.time_total_s or 0.0), 4),
                actors=shape.actors,
                num_cpus=shape.num_cpus,
                num_gpus=shape.num_gpus,
                layers=shape.layers,
            )
        )
    return tuple(out)


def stage_stats_of(dataset, shapes: Sequence[PoolShape]) -> tuple[StageStat, ...]:
    """:func:`collect_stage_stats` of an executed *dataset*; empty (with a warning) when Ray's
    stats do not describe the pipeline: statistics never fail a commit."""
    try:
        return collect_stage_stats(dataset.get_stats_summary(), shapes)
    except (ValueError, AttributeError, TypeError) as exc:
        log.warning("stage statistics unavailable: %s", exc)
        return ()
