"""Stage layouts: which layers of which tower run in which pipeline stage, on what resources.

Spec grammar (stages separated by ``|``; ranges inclusive; a bare tower name means all its layers)::

    SPEC  := STAGE ('|' STAGE)*
    STAGE := RANGE (',' RANGE)* ['@' RES (',' RES)*]
    RANGE := ('text' | 'image') [':' START '-' END]
    RES   := 'cpus=' FLOAT | 'gpus=' FLOAT | 'pool=' MIN ['-' MAX]

The reference deployment is ``text@gpus=1|image:0-5@gpus=1|image:6-11@gpus=1``: ALBERT on
one GPU, each half of the ViT on another. Each tower's layers must be covered exactly
once, in order; a tower's embedding runs with its first layer and its pooling and
projection with its last.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from ray_jobs.errors import StageSpecError

TOWERS = ("text", "image")


@dataclass(frozen=True)
class StageResources:
    """Ray resources and actor-pool size of one stage."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    min_pool: int = 1
    max_pool: int = 1

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise StageSpecError(f"stage resources must be >= 0, got cpus={self.num_cpus} gpus={self.num_gpus}")
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise StageSpecError("a stage needs some CPU or GPU: cpus and gpus are both 0")
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise StageSpecError(f"gpus above 1 must be whole, got {self.num_gpus}")
        if not 1 <= self.min_pool <= self.max_pool:
            raise StageSpecError(f"pool sizes need 1 <= min <= max, got {self.min_pool}-{self.max_pool}")

    def spec(self) -> str:
        return f"cpus={self.num_cpus:g},gpus={self.num_gpus:g},pool={self.min_pool}-{self.max_pool}"


def default_resources(settings) -> StageResources:
    """Each stage's resources unless a stage spec names its own, from a
    :class:`~ray_jobs.config.settings.StageSettings`."""
    s = settings
    return StageResources(s.stage_num_cpus, s.stage_num_gpus, s.stage_pool.min, s.stage_pool.max)


@dataclass(frozen=True)
class LayerRange:
    """Layers ``start`` .. ``stop - 1`` of one tower; ``stop`` None means to the end."""

    tower: str
    start: int
    stop: int | None

    def spec(self) -> str:
        return f"{self.tower}:{self.start}-{self.stop - 1}"


@dataclass(frozen=True)
class StageSpec:
    index: int
    ranges: tuple[LayerRange, ...]
    resources: StageResources = field(default_factory=StageResources)

    def range_for(self, tower: str) -> LayerRange | None:
        return next((r for r in self.ranges if r.tower == tower), None)

    @property
    def name(self) -> str:
        return f"stage{self.index + 1}"


@dataclass(frozen=True)
class StageLayout:
    """A validated layout over concrete layer counts."""

    stages: tuple[StageSpec, ...]
    num_layers: Mapping[str, int]

    def spec(self) -> str:
        return "|".join(",".join(r.spec() for r in s.ranges) + "@" + s.resources.spec() for s in self.stages)

    def owns_embed(self, stage: StageSpec, tower: str) -> bool:
        r = stage.range_for(tower)
        return r is not None and r.start == 0

    def owns_head(self, stage: StageSpec, tower: str) -> bool:
        r = stage.range_for(tower)
        return r is not None and r.stop == self.num_layers[tower]


_RANGE = re.compile(r"^(text|image)(?::(\d+)-(\d+))?$")


def _parse_resources(text: str, defaults: StageResources) -> StageResources:
    values = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, _, val = item.partition("=")
        try:
            if key == "cpus":
                values["num_cpus"] = float(val)
            elif key == "gpus":
                values["num_gpus"] = float(val)
            elif key == "pool":
                lo, _, hi = val.partition("-")
                values["min_pool"] = int(lo)
                values["max_pool"] = int(hi or lo)
            else:
                raise StageSpecError(f"unknown stage resource {key!r} in {item!r} (use cpus=, gpus=, pool=)")
        except ValueError as exc:
            raise StageSpecError(f"bad stage resource value in {item!r}") from exc
    return replace(defaults, **values)


def parse_spec(spec: str, defaults: StageResources | None = None) -> list[tuple[list[tuple], StageResources]]:
    """Parse *spec* into per-stage (unresolved ranges, resources); layer counts come later."""
    defaults = defaults or StageResources()
    if not spec or not spec.strip():
        raise StageSpecError("stage spec is empty")
    out = []
    for n, chunk in enumerate(spec.split("|"), start=1):
        ranges_txt, _, res_txt = chunk.strip().partition("@")
        ranges = []
        for item in filter(None, (p.strip() for p in ranges_txt.split(","))):
            m = _RANGE.match(item)
            if not m:
                raise StageSpecError(
                    f"stage {n}: cannot parse {item!r}; expected text[:START-END] or image[:START-END]"
                )
            tower, a, b = m.groups()
            ranges.append((tower, None if a is None else int(a), None if b is None else int(b)))
        if not ranges:
            raise StageSpecError(f"stage {n} has no layers")
        out.append((ranges, _parse_resources(res_txt, defaults)))
    return out


def resolve(parsed, num_layers: Mapping[str, int]) -> StageLayout:
    """Check the parsed spec against the model's layer counts and return the layout."""
    stages = []
    next_layer = dict.fromkeys(TOWERS, 0)
    for idx, (ranges, resources) in enumerate(parsed):
        seen = set()
        concrete = []
        for tower, a, b in ranges:
            if tower in seen:
                raise StageSpecError(f"stage {idx + 1} names the {tower} tower twice; use one range per tower")
            seen.add(tower)
            total = num_layers[tower]
            start, end = (0, total - 1) if a is None else (a, b)
            if start != next_layer[tower]:
                raise StageSpecError(
                    f"stage {idx + 1}: {tower} layers must continue at {next_layer[tower]}, got {start} "
                    f"(the {tower} tower has layers 0-{total - 1})"
                )
            if end < start or end >= total:
                raise StageSpecError(f"stage {idx + 1}: {tower}:{start}-{end} is outside 0-{total - 1} or empty")
            next_layer[tower] = end + 1
            concrete.append(LayerRange(tower, start, end + 1))
        stages.append(StageSpec(idx, tuple(concrete), resources))
    for tower in TOWERS:
        if next_layer[tower] != num_layers[tower]:
            raise StageSpecError(
                f"stage spec covers {tower} layers 0-{next_layer[tower] - 1} of 0-{num_layers[tower] - 1}; "
                "every layer must run in exactly one stage"
            )
    return StageLayout(tuple(stages), dict(num_layers))


def stage_ranges(layer_counts: Mapping[str, int], lo: int, hi: int) -> list[tuple[str, int, int]]:
    """``[(tower, first, last)]`` of items *lo* .. *hi* - 1, the text layers then the image layers
    numbered as one sequence (what :func:`balanced_spec` cuts)."""
    out, offset = [], 0
    for tower in TOWERS:
        n = layer_counts[tower]
        first, last = max(lo, offset), min(hi, offset + n) - 1
        if first <= last:
            out.append((tower, first - offset, last - offset))
        offset += n
    return out


def balanced_spec(
    num_stages: int,
    layer_costs: Mapping[str, list[float]],
    fits: Callable[[int, int], bool] | None = None,
) -> list[list[tuple]]:
    """Split the text layers then the image layers into *num_stages* contiguous stages
    minimising the most expensive stage (linear partition), returning parsed ranges.

    *fits(lo, hi)*: whether the stage of items *lo* .. *hi* - 1 fits a stage's memory (see
    :func:`stage_ranges`); the cheapest split among those whose every stage fits. Raises
    :class:`StageSpecError` when none does."""
    items = [(t, i, c) for t in TOWERS for i, c in enumerate(layer_costs[t])]
    n = len(items)
    if not 1 <= num_stages <= n:
        raise StageSpecError(f"--num-stages must be between 1 and the model's {n} layers, got {num_stages}")
    prefix = [0.0]
    for _, _, c in items:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][j]: minimal max-stage cost splitting the first j items into k stages
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf or (fits is not None and not fits(i, j)):
                    continue
                cost = max(best[k - 1][i], prefix[j] - prefix[i])
                if cost < best[k][j] - 1e-12:
                    best[k][j], cut[k][j] = cost, i
    if best[num_stages][n] == inf:
        raise StageSpecError(f"no split into {num_stages} stages fits a stage's memory")
    bounds = []
    j = n
    for k in range(num_stages, 0, -1):
        bounds.append((cut[k][j], j))
        j = cut[k][j]
    out = []
    for lo, hi in reversed(bounds):
        ranges = []
        for tower in TOWERS:
            idx = [items[p][1] for p in range(lo, hi) if items[p][0] == tower]
            if idx:
                ranges.append((tower, idx[0], idx[-1]))
        out.append(ranges)
    return out
