"""``validate``: is every partition of a plan committed, complete and intact?

For each partition: ``_SUCCESS`` present and parseable, its counts reconcile and equal the
plan's row count, the embedding dims are the model's, and every listed file exists with the
recorded size (:func:`ray_jobs.contract.marker.marker_problems`, the one judge of a commit; files of
other attempts under the partition are never looked at). The DAG's validation task calls
:func:`validate_plan` too.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ray_jobs import storage
from ray_jobs.contract.layout import join_uri, model_root, plan_root
from ray_jobs.contract.marker import StageStat
from ray_jobs.contract.plan import Plan
from ray_jobs.errors import PlanError
from ray_jobs.output.markers import check_planned


@dataclass(frozen=True)
class PartitionCheck:
    index: int
    rows_planned: int
    rows_in: int | None = None
    rows_ok: int | None = None
    rows_rejected: int | None = None
    problems: tuple[str, ...] = ()
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    attempt: str = ""  # the committed attempt
    timings: dict[str, float] = field(default_factory=dict)
    stages: str = ""  # the committed layout spec
    stage_stats: tuple[StageStat, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class ValidationReport:
    plan_id: str
    model_id: str
    output_uri: str
    checks: tuple[PartitionCheck, ...]
    max_reject_rate: float = 1.0
    output_key: str = ""
    #: ids found in more than one manifest row (see :mod:`ray_jobs.output.duplicates`)
    duplicates: tuple[str, ...] = ()

    @property
    def rows_in(self) -> int:
        return sum(c.rows_in or 0 for c in self.checks)

    @property
    def rows_ok(self) -> int:
        return sum(c.rows_ok or 0 for c in self.checks)

    @property
    def rows_rejected(self) -> int:
        return sum(c.rows_rejected or 0 for c in self.checks)

    @property
    def reject_rate(self) -> float:
        return self.rows_rejected / self.rows_in if self.rows_in else 0.0

    @property
    def failed(self) -> list[PartitionCheck]:
        return [c for c in self.checks if not c.ok]

    @property
    def ok(self) -> bool:
        return not self.failed and self.reject_rate <= self.max_reject_rate and not self.duplicates

    def problems(self) -> list[str]:
        out = [f"partition {c.index:05d}: {p}" for c in self.failed for p in c.problems]
        out += list(self.duplicates)
        if self.reject_rate > self.max_reject_rate:
            out.append(f"reject rate {self.reject_rate:.4f} exceeds max_reject_rate {self.max_reject_rate}")
        return out

    def table(self) -> str:
        rows = [f"{'partition':>9}  {'planned':>9}  {'rows_in':>9}  {'ok':>9}  {'rejected':>9}  status"]
        for c in self.checks:
            status = "ok" if c.ok else "FAIL: " + "; ".join(c.problems)

            def fmt(v):
                return "-" if v is None else str(v)

            rows.append(
                f"{c.index:>9}  {c.rows_planned:>9}  {fmt(c.rows_in):>9}  {fmt(c.rows_ok):>9}  "
                f"{fmt(c.rows_rejected):>9}  {status}"
            )
        verdict = "OK" if self.ok else "FAILED"
        rows.append(
            f"validate: {verdict}: partitions={len(self.checks)} failed={len(self.failed)} rows_in={self.rows_in} "
            f"rows_ok={self.rows_ok} rows_rejected={self.rows_rejected} reject_rate={self.reject_rate:.4f} "
            f"plan_id={self.plan_id} model_id={self.model_id}"
        )
        return "\n".join(rows)


def check_partition(
    plan: Plan, model_id: str, index: int, embed_dim: int | None, output_key: str = ""
) -> PartitionCheck:
    planned = plan.partitions[index]
    _, marker, problems = check_planned(plan, index, model_id, output_key, embed_dim)
    if marker is None:
        return PartitionCheck(index, planned.rows, problems=tuple(problems))
    return PartitionCheck(
        index,
        planned.rows,
        marker.rows_in,
        marker.rows_ok,
        marker.rows_rejected,
        tuple(problems),
        dict(marker.rejects_by_reason),
        marker.attempt,
        dict(marker.timings),
        marker.stages,
        marker.stage_stats,
    )


def resolve_model_id(plan: Plan, model_uri: str | None) -> tuple[str, int | None]:
    """The model id whose outputs to check: from --model, the plan's model, or the only one present."""
    uri = model_uri or plan.model_uri
    if uri:
        from ray_jobs.model.checkpoint import open_checkpoint

        ckpt = open_checkpoint(uri)
        return ckpt.model_id, ckpt.embed_dim
    root = join_uri(plan.output_uri, "embeddings")
    fs, path = storage.filesystem_for(root)
    candidates = []
    if fs.exists(path):
        for entry in fs.ls(path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            model_id = name.removeprefix("model=")
            present = (
                storage.exists(model_root(plan.output_uri, model_id))
                if plan.keyed
                else storage.exists(plan_root(plan.output_uri, model_id, plan.plan_id))
            )
            if name != model_id and present:
                candidates.append(model_id)
    if len(candidates) != 1:
        raise PlanError(
            f"cannot tell which model's outputs to validate for plan {plan.plan_id} "
            f"(found {sorted(candidates) or 'none'} under {root}); pass --model"
        )
    return candidates[0], None


def resolve_output_key(plan: Plan, model_id: str) -> str:
    """The output identity whose work to check when none is given: the only ``out=`` under
    the model that holds any of this plan's work ("" for a format 1 plan)."""
    if not plan.keyed or not plan.partitions:
        return ""
    root = model_root(plan.output_uri, model_id)
    fs, path = storage.filesystem_for(root)
    keys = {f"work={p.key}" for p in plan.partitions}
    found = []
    if fs.exists(path):
        for entry in fs.ls(path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            key = name.removeprefix("out=")
            if key == name:
                continue
            held = {e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(f"{path}/{name}", detail=False)}
            if held & keys:
                found.append(key)
    if len(found) != 1:
        raise PlanError(
            f"cannot tell which output identity of model {model_id} to check for plan {plan.plan_id} "
            f"(found {sorted(found) or 'none'} under {root}); pass --output-key"
        )
    return found[0]


def validate_plan(
    plan: Plan,
    model_id: str,
    embed_dim: int | None = None,
    max_reject_rate: float = 1.0,
    threads: int = 32,
    output_key: str | None = None,
    check_duplicates: bool = True,
) -> ValidationReport:
    """Check every partition of *plan* for *model_id* and *output_key* (default: the only
    one present), and that no id appears in two manifest rows."""
    if output_key is None:
        output_key = resolve_output_key(plan, model_id)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(plan.partitions)))) as pool:
        checks = tuple(
            pool.map(lambda i: check_partition(plan, model_id, i, embed_dim, output_key), range(len(plan.partitions)))
        )
    duplicates: tuple[str, ...] = ()
    if check_duplicates:
        from ray_jobs.output.duplicates import duplicate_ids

        duplicates = tuple(duplicate_ids(plan))
    return ValidationReport(plan.plan_id, model_id, plan.output_uri, checks, max_reject_rate, output_key, duplicates)
