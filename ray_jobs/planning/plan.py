"""``plan``: turn a manifest into balanced partitions of row groups, reading footers only.

Row groups are taken in a fixed order (files by path, then row-group index) and packed
greedily: a partition closes when the next row group would take it past the target, so
every partition but the last is within one row group of the target (a single row group
larger than the target forms its own partition). If that gives more partitions than
``max_partitions`` (Airflow's ``max_map_length``), the target grows until it fits and the
plan says so.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

from ray_jobs import storage
from ray_jobs.config.settings import Partitioning
from ray_jobs.contract.ids import make_plan_id
from ray_jobs.contract.layout import plan_uri
from ray_jobs.contract.plan import Fragment, Plan, PlannedFile, PlannedPartition
from ray_jobs.errors import PlanError
from ray_jobs.planning.manifest import DEFAULT_TAIL_BYTES, ManifestFile, fingerprint, read_manifest


class _Unit(NamedTuple):  # a tuple: a billion-row manifest has ~10^5-10^6 of these
    file: int
    row_group: int
    rows: int
    bytes: int


def _units(files: list[ManifestFile], avg_image_bytes: int) -> list[_Unit]:
    out = []
    for fi, f in enumerate(files):
        hints = f.row_group_bytes or (None,) * len(f.row_group_rows)
        for gi, (rows, hint) in enumerate(zip(f.row_group_rows, hints, strict=True)):
            if rows:
                out.append(_Unit(fi, gi, rows, hint if hint is not None else rows * avg_image_bytes))
    return out


def pack(units: list[_Unit], target: int, unit: str) -> list[list[_Unit]]:
    """Greedy, order-preserving packing of row groups into partitions of about *target*."""
    parts: list[list[_Unit]] = []
    current: list[_Unit] = []
    size = 0
    by_rows = unit == "rows"
    for u in units:
        weight = u.rows if by_rows else u.bytes
        if current and size + weight > target:
            parts.append(current)
            current, size = [], 0
        current.append(u)
        size += weight
    if current:
        parts.append(current)
    return parts


def _fragments(units: list[_Unit]) -> tuple[Fragment, ...]:
    out: list[Fragment] = []
    for u in units:
        if out and out[-1].file == u.file:
            last = out[-1]
            out[-1] = Fragment(u.file, (*last.row_groups, u.row_group), last.rows + u.rows)
        else:
            out.append(Fragment(u.file, (u.row_group,), u.rows))
    return tuple(out)


@dataclass(frozen=True)
class PlanResult:
    plan: Plan
    uri: str
    seconds: float
    row_groups: int
    reused: bool

    def summary(self) -> str:
        p = self.plan
        line = (
            f"plan: files={len(p.files)} row_groups={self.row_groups} rows={p.rows} partitions={len(p.partitions)} "
            f"bytes={sum(x.bytes for x in p.partitions)} seconds={self.seconds:.2f} plan_id={p.plan_id} -> {self.uri}"
        )
        if self.reused:
            line += " (already written for this run; unchanged)"
        return "\n".join([line, *(f"plan: note: {n}" for n in p.notes)])


def make_plan(
    manifest_uri: str,
    output_uri: str,
    settings: Partitioning,
    *,
    run_id: str | None = None,
    model_uri: str | None = None,
    threads: int = 64,
    tail_bytes: int = DEFAULT_TAIL_BYTES,
) -> tuple[Plan, int]:
    """Build the plan (nothing written); returns it and the number of non-empty row groups."""
    if not storage.is_remote(output_uri):
        output_uri = storage.filesystem_for(output_uri)[1]  # plans name absolute local paths
    # min/max statistics of image_bytes are read only when balancing by bytes (they cost
    # ~8 us per row group); rows plans estimate bytes from footer hints or avg_image_bytes.
    files = read_manifest(
        manifest_uri, threads=threads, tail_bytes=tail_bytes, byte_statistics=settings.unit == "bytes"
    )
    units = _units(files, settings.avg_image_bytes)
    requested = _requested_settings(settings)
    manifest_fp = fingerprint(files)
    plan_id = make_plan_id(manifest_fp, requested)
    notes = _input_notes(files, units)
    parts, target, grown = _pack_within_max_partitions(units, settings)
    if grown:
        notes.append(grown)
    plan = Plan(
        run_id=run_id or f"plan-{plan_id}",
        plan_id=plan_id,
        manifest_uri=manifest_uri,
        manifest_fingerprint=manifest_fp,
        output_uri=output_uri,
        settings={**requested, "effective_target": target},
        files=tuple(PlannedFile(f.uri, f.size, f.rows, len(f.row_group_rows), f.version) for f in files),
        partitions=_planned_partitions(parts),
        model_uri=model_uri,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        notes=tuple(notes),
    )
    return plan, len(units)


def _requested_settings(settings: Partitioning) -> dict[str, object]:
    """The partitioning settings as requested: what the plan id hashes."""
    return {
        "unit": settings.unit,
        "target": settings.target,
        "max_partitions": settings.max_partitions,
        "avg_image_bytes": settings.avg_image_bytes,
    }


def _input_notes(files: list[ManifestFile], units: list[_Unit]) -> list[str]:
    """What the plan says about its input: files skipped for having no rows, a manifest with none."""
    notes = []
    empty = [f.uri for f in files if f.rows == 0]
    if empty:
        notes.append(f"skipped {len(empty)} file(s) with zero rows, e.g. {empty[0]}")
    if not units:
        notes.append("the manifest has no rows: the plan has no partitions")
    return notes


def _pack_within_max_partitions(
    units: list[_Unit], settings: Partitioning
) -> tuple[list[list[_Unit]], int, str | None]:
    """Pack *units* at the settings' target, growing the target until the partitions fit in
    ``max_partitions``. Returns the partitions, the target used and a note if it grew."""
    target = settings.target
    parts = pack(units, target, settings.unit)
    if len(parts) <= settings.max_partitions:
        return parts, target, None
    total = sum(u.rows if settings.unit == "rows" else u.bytes for u in units)
    target = max(target, math.ceil(total / settings.max_partitions))
    parts = pack(units, target, settings.unit)
    while len(parts) > settings.max_partitions:
        target = math.ceil(target * 1.02) + 1
        parts = pack(units, target, settings.unit)
    note = (
        f"{settings.unit} per partition grew from {settings.target} to {target} "
        f"to stay within --max-partitions {settings.max_partitions}"
    )
    return parts, target, note


def _planned_partitions(parts: list[list[_Unit]]) -> tuple[PlannedPartition, ...]:
    return tuple(
        PlannedPartition(i, _fragments(p), sum(u.rows for u in p), sum(u.bytes for u in p)) for i, p in enumerate(parts)
    )


def write_plan(plan: Plan, *, force: bool = False) -> tuple[str, bool]:
    """Write ``{output}/runs/{run_id}/plan.json`` once; a re-run with the same plan keeps it.

    Returns the URI and whether an identical plan was already there.
    """
    uri = plan_uri(plan.output_uri, plan.run_id)
    if storage.exists(uri) and not force:
        existing = load_plan(uri)
        if existing.plan_id == plan.plan_id:
            return uri, True
        raise PlanError(
            f"{uri} already holds plan {existing.plan_id} for run {plan.run_id}, but this manifest and these settings "
            f"give plan {plan.plan_id}; use another --run-id (or --force to replace it)"
        )
    storage.write_text(uri, plan.to_json())
    return uri, False


def load_plan(uri: str) -> Plan:
    try:
        text = storage.read_text(uri)
    except FileNotFoundError as exc:
        raise PlanError(f"plan {uri} does not exist") from exc
    return Plan.from_json(text, uri)


def run_plan(
    manifest_uri: str,
    output_uri: str,
    settings: Partitioning,
    *,
    run_id: str | None = None,
    model_uri: str | None = None,
    force: bool = False,
) -> PlanResult:
    start = time.perf_counter()
    plan, row_groups = make_plan(manifest_uri, output_uri, settings, run_id=run_id, model_uri=model_uri)
    uri, reused = write_plan(plan, force=force)
    if reused:
        plan = load_plan(uri)
    return PlanResult(plan, uri, time.perf_counter() - start, row_groups, reused)
