"""Rebalancing between partitions: a starting partition job re-splits an automatic layout by
what the run's committed partitions measured.

Every commit marker records the spec its partition ran and per-stage statistics (rows per
busy second of one actor, :mod:`ray_jobs.perf.stage_stats`). A job whose layout is
``num_stages: auto`` with two or more stages reads the markers of the nearest earlier
partitions of its plan (at most :data:`LOOKBACK`), turns each layout's measured stage rates
into per-layer costs (a stage's time spread over its layers in proportion to their estimated
FLOPs), pools them over the partitions weighted by rows, and splits the layers again into as
many stages, each keeping its resources. If that split's model stages are predicted to run at
least ``rebalance_min_gain`` faster than the job's own (both priced with the same measured
costs), the job runs it. The layout decides the model stages only: when preprocessing bounds
the pipeline as measured, the choice still balances the model stages (they then hold fewer
idle resources, and the preprocessing pool may grow past its minimum), and the line says so.
The layout is an execution setting: the output identity, and so every committed partition, is
unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ray_jobs.contract.marker import StageStat
from ray_jobs.errors import OutputError, StageSpecError, UsageError
from ray_jobs.model.stage_spec import TOWERS, StageLayout, balanced_spec, resolve
from ray_jobs.perf.stage_balance import layer_costs_from_rates, merge_stage_stats, rates_from_stats

log = logging.getLogger(__name__)

#: committed partitions a starting job reads: the nearest earlier ones of its plan
LOOKBACK = 16


@dataclass(frozen=True)
class MeasuredPartition:
    """What one committed partition ran and measured."""

    index: int
    spec: str
    stats: tuple[StageStat, ...]


@dataclass(frozen=True)
class RebalanceChoice:
    """The layout a job runs and why: its own, or the split the measurements predict is faster."""

    layout: StageLayout
    current_spec: str
    changed: bool
    reason: str
    measured_on: tuple[int, ...] = ()
    current_rows_per_s: float | None = None  # model stages, predicted for the job's own layout, same costs
    predicted_rows_per_s: float | None = None  # model stages, predicted for the re-split layout
    min_gain: float | None = None
    preprocess_rows_per_s: float | None = None  # the preprocessing pool as measured (its minimum actors)

    @property
    def gain(self) -> float | None:
        if not self.current_rows_per_s or self.predicted_rows_per_s is None:
            return None
        return self.predicted_rows_per_s / self.current_rows_per_s - 1

    def line(self) -> str:
        if not self.changed:
            return f"rebalance: keeping {self.current_spec}: {self.reason}"
        return (
            f"rebalance: running {self.layout.spec()} instead of {self.current_spec}: {self.reason} "
            f"(measured on partition(s) {', '.join(map(str, self.measured_on))})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "changed": self.changed,
            "spec": self.layout.spec(),
            "current_spec": self.current_spec,
            "reason": self.reason,
            "measured_on": list(self.measured_on),
            "current_rows_per_s": _round(self.current_rows_per_s),
            "predicted_rows_per_s": _round(self.predicted_rows_per_s),
            "gain": _round(self.gain),
            "preprocess_rows_per_s": _round(self.preprocess_rows_per_s),
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def pooled_layer_costs(
    measured: Sequence[MeasuredPartition], prior: Mapping[str, Sequence[float]] | None = None
) -> dict[str, list[float]] | None:
    """Seconds per row of each layer, from each measured layout's merged stage rates, averaged
    over the layouts weighted by the rows they ran; None when nothing usable was measured."""
    groups: dict[str, list[Sequence[StageStat]]] = {}
    for m in measured:
        if m.stats:
            groups.setdefault(m.spec, []).append(m.stats)
    total: dict[str, list[float]] = {}
    weight = 0.0
    for stats in groups.values():
        merged = merge_stage_stats(stats)
        try:
            costs = layer_costs_from_rates(rates_from_stats(merged), prior)
        except UsageError as exc:
            log.info("stage statistics not usable for rebalancing: %s", exc)
            continue
        rows = float(max((st.rows for st in merged if st.name.startswith("stage")), default=0)) or 1.0
        if total and any(len(total[t]) != len(costs[t]) for t in TOWERS):
            continue  # another model's layers
        for t in TOWERS:
            acc = total.setdefault(t, [0.0] * len(costs[t]))
            for i, c in enumerate(costs[t]):
                acc[i] += c * rows
        weight += rows
    if not weight:
        return None
    return {t: [c / weight for c in total[t]] for t in TOWERS}


def preprocess_rate(measured: Sequence[MeasuredPartition]) -> float | None:
    """Rows per busy second of one preprocessing actor, over every measured partition."""
    stats = [st for m in measured for st in m.stats if st.name == "preprocess"]
    rows, busy = sum(st.rows for st in stats), sum(st.busy_s for st in stats)
    return rows / busy if rows > 0 and busy > 0 else None


def predicted_rate(layout: StageLayout, costs: Mapping[str, Sequence[float]], preprocess: float | None = None) -> float:
    """Rows/s of *layout* with each stage's pool at its minimum (what a reservation holds),
    priced with *costs*; *preprocess*: the preprocessing pool's rows/s, when it is known."""
    rate = math.inf if preprocess is None else preprocess
    for stage in layout.stages:
        seconds = sum(sum(costs[r.tower][r.start : r.stop]) for r in stage.ranges)
        if seconds > 0:
            rate = min(rate, stage.resources.min_pool / seconds)
    return rate


def choose_layout(
    layout: StageLayout,
    measured: Sequence[MeasuredPartition],
    min_gain: float,
    prior: Mapping[str, Sequence[float]] | None = None,
    preprocess_actors: int = 1,
) -> RebalanceChoice:
    """*layout*, or the re-split one when *measured* predict it at least *min_gain* faster."""
    current = layout.spec()
    keep = dict(layout=layout, current_spec=current, changed=False, min_gain=min_gain)
    if len(layout.stages) < 2:
        return RebalanceChoice(reason="one stage: no layer to move", **keep)
    used = tuple(m.index for m in measured if m.stats)
    costs = pooled_layer_costs(measured, prior)
    if costs is None or any(len(costs[t]) != layout.num_layers[t] for t in TOWERS):
        return RebalanceChoice(reason="no committed partition with usable stage statistics yet", **keep)
    pre = preprocess_rate(measured)
    pre = None if pre is None else pre * max(1, preprocess_actors)
    try:
        parsed = balanced_spec(len(layout.stages), costs)
    except StageSpecError as exc:
        return RebalanceChoice(reason=f"cannot re-split: {exc}", **keep)
    candidate = resolve(
        [(ranges, stage.resources) for ranges, stage in zip(parsed, layout.stages, strict=True)],
        layout.num_layers,
    )
    ours, theirs = predicted_rate(layout, costs), predicted_rate(candidate, costs)
    figures = dict(measured_on=used, current_rows_per_s=ours, predicted_rows_per_s=theirs, preprocess_rows_per_s=pre)
    if candidate.spec() == current:
        return RebalanceChoice(reason="already the balanced split of what was measured", **keep, **figures)
    gain = theirs / ours - 1 if ours > 0 and math.isfinite(ours) else 0.0
    bound = ""
    if pre is not None and pre < theirs:
        bound = f"; the pipeline is bound by preprocessing at {pre:.1f} rows/s as measured"
    if gain < min_gain:
        return RebalanceChoice(
            reason=f"the balanced split's model stages are predicted {gain:+.0%} ({theirs:.1f} vs {ours:.1f} "
            f"rows/s), below the {min_gain:.0%} threshold{bound}",
            **keep,
            **figures,
        )
    return RebalanceChoice(
        layout=candidate,
        current_spec=current,
        changed=True,
        reason=f"model stages predicted {gain:+.0%} ({theirs:.1f} vs {ours:.1f} rows/s){bound}",
        min_gain=min_gain,
        **figures,
    )


def committed_stats(plan, index: int, model_id: str, output_key: str, lookback: int = LOOKBACK):
    """The spec and stage statistics of the nearest earlier committed partitions of *plan*
    (at most *lookback*); an unreadable marker is skipped: statistics never fail a job."""
    from ray_jobs.output.markers import read_marker

    earlier = [p.index for p in plan.partitions if p.index < index][-lookback:]

    def one(j: int) -> MeasuredPartition | None:
        try:
            marker = read_marker(plan.work_uri(j, model_id, output_key))
        except (OutputError, OSError, ValueError) as exc:
            log.info("partition %d: marker not readable for rebalancing: %s", j, exc)
            return None
        if marker is None or not marker.stage_stats:
            return None
        return MeasuredPartition(j, marker.stages, tuple(marker.stage_stats))

    if not earlier:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(earlier))) as pool:
        return [m for m in pool.map(one, earlier) if m is not None]


def layout_of_spec(spec: str) -> StageLayout:
    """The layout a marker's ``stages`` names (concrete ranges: the layer counts are read off it)."""
    from ray_jobs.model.stage_spec import parse_spec

    parsed = parse_spec(spec)
    counts = dict.fromkeys(TOWERS, 0)
    for ranges, _ in parsed:
        for tower, _, last in ranges:
            if last is None:
                raise StageSpecError(f"stage spec {spec!r} names a whole tower; the layer counts are unknown")
            counts[tower] = max(counts[tower], last + 1)
    return resolve(parsed, counts)


def _indices(indices: Sequence[int]) -> str:
    """``0-3, 7, 9-10``."""
    out, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def _measured_rate(stats: Sequence[StageStat]) -> float | None:
    """The slowest model stage pool's rows/s (actors x rows per busy second) of merged *stats*."""
    try:
        rates = rates_from_stats(merge_stage_stats([stats]))
    except UsageError:
        return None
    return min(r.pool_rate for r in rates if r.is_model_stage)


def layout_history(partitions: Sequence[MeasuredPartition]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per layout the committed partitions ran, in the order they first ran it: its spec, the
    partitions, the model stages' measured rate (the slowest stage pool, rows per busy second x
    actors), and against the first layout the gain predicted from the first layout's statistics
    and the gain measured."""
    groups: dict[str, list[MeasuredPartition]] = {}
    for p in sorted(partitions, key=lambda p: p.index):
        if p.spec:
            groups.setdefault(p.spec, []).append(p)
    if not groups:
        return [], []
    specs = list(groups)
    base = groups[specs[0]]
    costs = pooled_layer_costs(base)
    try:
        base_predicted = predicted_rate(layout_of_spec(specs[0]), costs) if costs else None
    except StageSpecError:
        base_predicted = None
    rows = []
    base_measured = None
    for n, spec in enumerate(specs):
        members = groups[spec]
        with_stats = [p.stats for p in members if p.stats]
        measured = _measured_rate(merge_stage_stats(with_stats)) if with_stats else None
        entry: dict[str, Any] = {
            "layout": n + 1,
            "spec": spec,
            "partitions": [p.index for p in members],
            "measured_rows_per_s": _round(measured),
        }
        if n == 0:
            base_measured = measured
        else:
            try:
                predicted = predicted_rate(layout_of_spec(spec), costs) if costs else None
            except StageSpecError:
                predicted = None
            if predicted and base_predicted:
                entry["predicted_gain"] = _round(predicted / base_predicted - 1)
            if measured and base_measured:
                entry["measured_gain"] = _round(measured / base_measured - 1)
        rows.append(entry)
    lines = [
        "| layout | partitions | stage spec | model stages rows/s | predicted gain | measured gain |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for e in rows:
        rate = f"{e['measured_rows_per_s']:.1f}" if e["measured_rows_per_s"] else "-"
        pg = f"{e['predicted_gain']:+.0%}" if "predicted_gain" in e else "-"
        mg = f"{e['measured_gain']:+.0%}" if "measured_gain" in e else "-"
        lines.append(f"| {e['layout']} | {_indices(e['partitions'])} | `{e['spec']}` | {rate} | {pg} | {mg} |")
    return rows, lines
