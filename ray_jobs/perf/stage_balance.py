"""Stage balance: per-actor rates from measured stage statistics, the bottleneck, and a
recommended layer split and pool sizes. Pure computation (no Ray, no torch).

A pipeline of actor pools runs at the rate of its slowest pool: ``min_i(actors_i * rate_i)``
where ``rate_i`` is one actor's rows per busy second. Balancing has two levers: move layers
between model stages (:func:`balanced_split`, exact contiguous partition) and size each pool
(:func:`allocate_pools`, most actors to the slowest pool while the CPUs/GPUs last).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ray_jobs.contract.marker import StageStat
from ray_jobs.errors import UsageError
from ray_jobs.model.stage_spec import TOWERS, balanced_spec, parse_spec

#: Operators whose throughput the pools decide (read and write are Ray Data tasks it sizes itself).
POOL_PREFIXES = ("preprocess", "stage")


@dataclass(frozen=True)
class StageRate:
    """One pool of the pipeline: one actor's rows per busy second and what one actor holds."""

    name: str
    rows_per_s: float
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    actors: int = 1
    layers: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise UsageError("a stage rate needs a name")
        if not (self.rows_per_s > 0 and math.isfinite(self.rows_per_s)):
            raise UsageError(f"stage {self.name}: rows/s per actor must be a positive number, got {self.rows_per_s}")
        if self.num_cpus < 0 or self.num_gpus < 0 or (self.num_cpus == 0 and self.num_gpus == 0):
            raise UsageError(f"stage {self.name}: needs cpus or gpus >= 0, not both 0")
        if self.actors < 1:
            raise UsageError(f"stage {self.name}: actors must be >= 1, got {self.actors}")

    @property
    def pool_rate(self) -> float:
        return self.actors * self.rows_per_s

    @property
    def is_model_stage(self) -> bool:
        return self.name.startswith("stage")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "rows_per_s": round(self.rows_per_s, 4),
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "actors": self.actors,
            "layers": self.layers,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> StageRate:
        try:
            return cls(
                name=str(data["name"]),
                rows_per_s=float(data["rows_per_s"]),
                num_cpus=float(data.get("num_cpus", 1.0)),
                num_gpus=float(data.get("num_gpus", 0.0)),
                actors=int(data.get("actors", 1)),
                layers=str(data.get("layers", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"not a stage rate: {dict(data)!r} ({exc})") from exc


def merge_stage_stats(per_partition: Iterable[Sequence[StageStat]]) -> tuple[StageStat, ...]:
    """Sum rows, tasks and times of same-named operators over partitions (same layout assumed)."""
    merged: dict[str, StageStat] = {}
    for stats in per_partition:
        for st in stats:
            prev = merged.get(st.name)
            if prev is None:
                merged[st.name] = st
                continue
            merged[st.name] = StageStat(
                name=st.name,
                operator=st.operator,
                rows=prev.rows + st.rows,
                tasks=prev.tasks + st.tasks,
                busy_s=prev.busy_s + st.busy_s,
                cpu_s=prev.cpu_s + st.cpu_s,
                span_s=prev.span_s + st.span_s,
                actors=max(prev.actors, st.actors),
                num_cpus=st.num_cpus,
                num_gpus=st.num_gpus,
                layers=st.layers,
            )
    return tuple(merged.values())


def rates_from_stats(stats: Sequence[StageStat]) -> tuple[StageRate, ...]:
    """The actor pools' per-actor rates (preprocess, stage1..K) from measured statistics."""
    out = []
    for st in stats:
        if st.name.startswith(POOL_PREFIXES) and st.rows > 0 and st.busy_s > 0:
            out.append(StageRate(st.name, st.rows_per_busy_s, st.num_cpus, st.num_gpus, max(1, st.actors), st.layers))
    if not any(r.is_model_stage for r in out):
        raise UsageError("the statistics hold no model stage with rows and busy time")
    return tuple(out)


def bottleneck(rates: Sequence[StageRate]) -> StageRate:
    """The pool with the lowest rate (actors x rate per actor): it sets the pipeline's pace."""
    if not rates:
        raise UsageError("no stages to compare")
    return min(rates, key=lambda r: r.pool_rate)


def allocate_pools(rates: Sequence[StageRate], cpus: float, gpus: float = 0.0) -> tuple[int, ...]:
    """Actors per pool maximising the slowest pool's rate within *cpus* and *gpus*.

    Every pool gets one actor, then the slowest pools (all of those tied) get one more each while
    they fit; when they cannot, no other pool's actor can raise the pipeline's rate, so it stops."""
    if not rates:
        raise UsageError("no stages to size")
    need_cpu = sum(r.num_cpus for r in rates)
    need_gpu = sum(r.num_gpus for r in rates)
    if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
        raise UsageError(
            f"one actor per stage needs {need_cpu:g} CPUs and {need_gpu:g} GPUs; only {cpus:g} and {gpus:g} given"
        )
    counts = [1] * len(rates)
    used_cpu, used_gpu = need_cpu, need_gpu
    while True:
        slowest = min(n * r.rows_per_s for n, r in zip(counts, rates, strict=True))
        tied = [j for j in range(len(rates)) if counts[j] * rates[j].rows_per_s <= slowest * (1 + 1e-9)]
        add_cpu = sum(rates[j].num_cpus for j in tied)
        add_gpu = sum(rates[j].num_gpus for j in tied)
        if used_cpu + add_cpu > cpus + 1e-9 or used_gpu + add_gpu > gpus + 1e-9:
            return tuple(counts)  # the slowest pools cannot all grow: no actor elsewhere helps
        for j in tied:
            counts[j] += 1
        used_cpu += add_cpu
        used_gpu += add_gpu


def pipeline_rate(rates: Sequence[StageRate], counts: Sequence[int]) -> float:
    return min(n * r.rows_per_s for r, n in zip(rates, counts, strict=True))


def _layer_ranges(layers: str) -> list[tuple[str, int, int]]:
    """``[(tower, first, last)]`` of a recorded stage's layers (``text:0-10,image:0-11``), read
    with the stage-spec parser."""
    if not layers:
        return []
    parsed = parse_spec(layers)
    if len(parsed) != 1 or any(a is None for _, a, _ in parsed[0][0]):
        raise UsageError(f"cannot read layer ranges {layers!r} (expected tower:START-END,...)")
    return parsed[0][0]


def layer_costs_from_rates(
    rates: Sequence[StageRate], prior: Mapping[str, Sequence[float]] | None = None
) -> dict[str, list[float]]:
    """Seconds per row of each layer, estimated from model stages' measured rates: a stage's
    cost (1 / rate) is spread over its layers (embedding and head ride with them) evenly, or in
    proportion to *prior* (an estimate of each layer's relative cost, e.g. FLOPs at the data's
    shapes), which tells a text layer from an image layer in a stage holding both."""
    costs: dict[str, dict[int, float]] = {t: {} for t in TOWERS}
    for r in rates:
        if not r.is_model_stage:
            continue
        ranges = _layer_ranges(r.layers)
        if not ranges:
            raise UsageError(f"{r.name}: no layers recorded; cannot re-split")
        weight = {(t, i): 1.0 for t, lo, hi in ranges for i in range(lo, hi + 1)}
        if prior is not None and all(i < len(prior.get(t, ())) for t, i in weight):
            weight = {(t, i): float(prior[t][i]) for t, i in weight}
        total = sum(weight.values()) or 1.0
        for (tower, i), w in weight.items():
            costs[tower][i] = (1.0 / r.rows_per_s) * w / total
    out = {}
    for tower in TOWERS:
        idx = sorted(costs[tower])
        if idx != list(range(len(idx))):
            raise UsageError(f"the {tower} layers recorded are not contiguous from 0: {idx}")
        out[tower] = [costs[tower][i] for i in idx]
    return out


@dataclass(frozen=True)
class SplitStage:
    layers: str
    seconds_per_row: float

    @property
    def rows_per_s(self) -> float:
        return 1.0 / self.seconds_per_row if self.seconds_per_row > 0 else math.inf


def balanced_split(layer_costs: Mapping[str, Sequence[float]], num_stages: int) -> tuple[SplitStage, ...]:
    """The contiguous split of the text then image layers into *num_stages* that minimises the
    slowest stage (exact: :func:`ray_jobs.model.stage_spec.balanced_spec`), with each stage's cost."""
    parsed = balanced_spec(num_stages, {t: list(layer_costs[t]) for t in TOWERS})
    out = []
    for ranges in parsed:
        spec = ",".join(f"{t}:{a}-{b}" for t, a, b in ranges)
        cost = sum(sum(layer_costs[t][a : b + 1]) for t, a, b in ranges)
        out.append(SplitStage(spec, cost))
    return tuple(out)


def spec_string(stages: Sequence[StageRate], counts: Sequence[int]) -> str:
    """A ``--stages`` spec for the model stages of *stages* with pools fixed at *counts*."""
    parts = []
    for r, n in zip(stages, counts, strict=True):
        if r.is_model_stage:
            parts.append(f"{r.layers}@cpus={r.num_cpus:g},gpus={r.num_gpus:g},pool={n}-{n}")
    return "|".join(parts)


@dataclass(frozen=True)
class Recommendation:
    """What the measurements say: the bottleneck now, and a balanced layout within a budget."""

    measured: tuple[StageRate, ...]
    bottleneck: str
    measured_rows_per_s: float
    stages: tuple[StageRate, ...]
    pools: tuple[int, ...]
    rows_per_s: float
    cpus: float
    gpus: float
    spec: str
    preprocess_pool: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {
            "measured": [r.to_dict() for r in self.measured],
            "bottleneck": self.bottleneck,
            "measured_rows_per_s": round(self.measured_rows_per_s, 3),
            "recommended": {
                "spec": self.spec,
                "preprocess_pool": self.preprocess_pool,
                "pools": {r.name: n for r, n in zip(self.stages, self.pools, strict=True)},
                "stages": [r.to_dict() | {"actors": n} for r, n in zip(self.stages, self.pools, strict=True)],
                "rows_per_s": round(self.rows_per_s, 3),
                "budget": {"cpus": self.cpus, "gpus": self.gpus},
            },
            "notes": list(self.notes),
        }

    def lines(self) -> list[str]:
        """Human-readable lines for the report and the command line."""
        out = ["| stage | layers | actors | rows/s per actor | pool rows/s |", "|---|---|---:|---:|---:|"]
        for r in self.measured:
            mark = " **bottleneck**" if r.name == self.bottleneck else ""
            out.append(f"| {r.name}{mark} | {r.layers or '-'} | {r.actors} | {r.rows_per_s:.1f} | {r.pool_rate:.1f} |")
        pre = f" --preprocess-pool {self.preprocess_pool}-{self.preprocess_pool}" if self.preprocess_pool else ""
        out += [
            "",
            f"Bottleneck: **{self.bottleneck}** (pipeline at most {self.measured_rows_per_s:.1f} rows/s as run).",
            f"Recommended for {self.cpus:g} CPUs / {self.gpus:g} GPUs: `--stages '{self.spec}'{pre}` "
            f"(predicted {self.rows_per_s:.1f} rows/s).",
        ]
        out += [f"- {n}" for n in self.notes]
        return out


def recommend(
    rates: Sequence[StageRate],
    *,
    cpus: float | None = None,
    gpus: float | None = None,
    num_stages: int | None = None,
) -> Recommendation:
    """Re-split the model layers into *num_stages* (default: as many as measured) and size every
    pool for the budget (default: what the measured pools held)."""
    model = [r for r in rates if r.is_model_stage]
    others = [r for r in rates if not r.is_model_stage]
    if not model:
        raise UsageError("no model stage among the measured rates")
    cpus = sum(r.actors * r.num_cpus for r in rates) if cpus is None else cpus
    gpus = sum(r.actors * r.num_gpus for r in rates) if gpus is None else gpus
    k = num_stages or len(model)
    split = balanced_split(layer_costs_from_rates(model), k)
    res = max(model, key=lambda r: (r.num_gpus, r.num_cpus))  # every new stage holds what one did
    new_model = [
        StageRate(f"stage{i + 1}", s.rows_per_s, res.num_cpus, res.num_gpus, 1, s.layers) for i, s in enumerate(split)
    ]
    stages = (*others, *new_model)
    pools = allocate_pools(stages, cpus, gpus)
    pre = next((n for r, n in zip(stages, pools, strict=True) if r.name == "preprocess"), None)
    notes = []
    if any(len({t for t, _, _ in _layer_ranges(r.layers)}) > 1 for r in model):
        notes.append("a measured stage ran layers of both towers: its cost is spread evenly over them (an estimate)")
    neck = bottleneck(rates)
    return Recommendation(
        measured=tuple(rates),
        bottleneck=neck.name,
        measured_rows_per_s=neck.pool_rate,
        stages=stages,
        pools=pools,
        rows_per_s=pipeline_rate(stages, pools),
        cpus=cpus,
        gpus=gpus,
        spec=spec_string(stages, pools),
        preprocess_pool=pre,
        notes=tuple(notes),
    )


def most_common_layout(stages_by_partition: Iterable[tuple[str, Sequence[StageStat]]]) -> list[Sequence[StageStat]]:
    """The statistics of the partitions that ran the most common layout (a run may mix them)."""
    groups: dict[str, list] = collections.defaultdict(list)
    for spec, stats in stages_by_partition:
        if stats:
            groups[spec].append(stats)
    if not groups:
        return []
    return max(groups.values(), key=len)
