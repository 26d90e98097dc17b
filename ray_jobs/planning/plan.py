"""``plan``: turn a manifest into balanced partitions of row groups, reading footers only.

Row groups are taken in a fixed order (files by path, then row-group index) and packed
greedily: a partition closes when the next row group would take it past the target, so
every partition but the last is within one row group of the target (a single row group
larger than the target forms its own partition). If that gives more partitions than
``max_partitions`` (Airflow's ``max_map_length``), the target grows until it fits and the
plan says so.

Plans are sticky. A plan continues the last plan made for the same dataset in the same
output root (``runs/_lineage/<dataset>.json``): every partition of that plan whose files are
all still there at the same version keeps its fragments and its content key, so its
committed work is reused; the row groups left over (new files, rewritten files, and the
unchanged neighbours of a retired partition) are packed into new partitions; partitions
that lost a file or read a rewritten one are listed as retired. Memory is bounded by row
groups (one small tuple each), never by rows: no id is read.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

from ray_jobs import storage
from ray_jobs.config.settings import Partitioning
from ray_jobs.contract.ids import default_dataset_name, make_plan_id, work_key
from ray_jobs.contract.layout import lineage_uri, plan_uri
from ray_jobs.contract.plan import Fragment, Plan, PlannedFile, PlannedPartition, RetiredWork
from ray_jobs.errors import PlanError
from ray_jobs.planning.iceberg_manifest import ManifestCatalog, TableSnapshot, is_table_uri, read_table_manifest
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
    """One fragment per run of consecutive row groups of the same file (linear: each
    fragment is built once, not grown a row group at a time)."""
    out: list[Fragment] = []
    file, groups, rows = -1, [], 0
    for u in units:
        if u.file != file:
            if groups:
                out.append(Fragment(file, tuple(groups), rows))
            file, groups, rows = u.file, [], 0
        groups.append(u.row_group)
        rows += u.rows
    if groups:
        out.append(Fragment(file, tuple(groups), rows))
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
        return "\n".join([line, delta_line(p), *(f"plan: note: {n}" for n in p.notes)])


def delta_line(plan: Plan) -> str:
    """What this plan changes against the plan it continues."""
    new = [x for x in plan.partitions if not x.kept]
    if not plan.previous_run_id:
        return f"plan: first plan of this dataset: {len(new)} new partitions ({plan.rows} rows)"
    return (
        f"plan: continues run {plan.previous_run_id}: kept {len(plan.partitions) - len(new)} partitions "
        f"({plan.kept_rows} rows), {len(new)} new ({sum(x.rows for x in new)} rows), "
        f"retired {len(plan.retired)} ({plan.retired_rows} rows)"
    )


def make_plan(
    manifest_uri: str,
    output_uri: str,
    settings: Partitioning,
    *,
    run_id: str | None = None,
    model_uri: str | None = None,
    threads: int = 64,
    tail_bytes: int = DEFAULT_TAIL_BYTES,
    previous: Plan | None = None,
    manifest_catalog: ManifestCatalog | None = None,
) -> tuple[Plan, int]:
    """Build the plan (nothing written), continuing *previous* if given; returns it and the
    number of non-empty row groups. *manifest_catalog*: the catalog of an ``iceberg://`` manifest."""
    # min/max statistics of image_bytes are read only when balancing by bytes (they cost
    # ~8 us per row group); rows plans estimate bytes from footer hints or avg_image_bytes.
    byte_statistics = settings.unit == "bytes"
    snapshot = None
    if is_table_uri(manifest_uri):
        snapshot = read_table_manifest(
            manifest_uri, manifest_catalog, threads=threads, tail_bytes=tail_bytes, byte_statistics=byte_statistics
        )
        files = snapshot.files
    else:
        files = read_manifest(manifest_uri, threads=threads, tail_bytes=tail_bytes, byte_statistics=byte_statistics)
    return plan_from_files(
        files,
        manifest_uri,
        output_uri,
        settings,
        run_id=run_id,
        model_uri=model_uri,
        previous=previous,
        snapshot=snapshot,
    )


def plan_from_files(
    files: list[ManifestFile],
    manifest_uri: str,
    output_uri: str,
    settings: Partitioning,
    *,
    run_id: str | None = None,
    model_uri: str | None = None,
    previous: Plan | None = None,
    snapshot: TableSnapshot | None = None,
) -> tuple[Plan, int]:
    """The plan of manifest *files* (their footers already read), continuing *previous*.
    *snapshot*: the manifest table's snapshot the files are from (an ``iceberg://`` manifest)."""
    if not storage.is_remote(output_uri):
        output_uri = storage.filesystem_for(output_uri)[1]  # plans name absolute local paths
    units = _units(files, settings.avg_image_bytes)
    requested = _requested_settings(settings)
    manifest_fp = fingerprint(files)
    notes = _input_notes(files, units)
    if snapshot is not None:
        notes.append(snapshot.note(previous.manifest_snapshot_id if previous is not None else None))
    if previous is not None and not previous.keyed:
        notes.append(
            f"the previous plan ({previous.run_id}) predates content-keyed work: its partitions are planned "
            "anew and embedded once more"
        )
        previous = None
    if previous is not None:
        _refuse_a_large_loss(previous, sum(u.rows for u in units), settings.max_row_loss, manifest_uri)
    kept, retired, fresh = _sticky(files, units, previous) if previous is not None else ([], [], units)
    room = settings.max_partitions - len(kept)
    if kept and fresh and room < 1:
        notes.append(
            f"the {len(kept)} partitions kept from run {previous.run_id} leave no room within max_partitions "
            f"{settings.max_partitions}: every row group is packed anew"
        )
        retired += [_retired(previous, p) for p, _ in kept]
        kept, fresh, room = [], units, settings.max_partitions
    parts, target, grown = _pack_within_max_partitions(fresh, settings, room)
    if grown:
        notes.append(grown)
    previous_id = previous.plan_id if previous is not None else ""
    plan_id = make_plan_id(manifest_fp, requested, previous_id)
    plan = Plan(
        run_id=run_id or f"plan-{plan_id}",
        plan_id=plan_id,
        manifest_uri=manifest_uri,
        manifest_fingerprint=manifest_fp,
        output_uri=output_uri,
        settings={**requested, "effective_target": target},
        files=tuple(PlannedFile(f.uri, f.size, f.rows, len(f.row_group_rows), f.version) for f in files),
        partitions=_planned_partitions(files, kept, parts),
        model_uri=model_uri,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        notes=tuple(notes),
        previous_run_id=previous.run_id if previous is not None else "",
        previous_plan_id=previous_id,
        retired=tuple(retired),
        manifest_snapshot_id=snapshot.snapshot_id if snapshot is not None else None,
    )
    return plan, len(units)


def _refuse_a_large_loss(previous: Plan, rows: int, max_row_loss: float, manifest_uri: str) -> None:
    """The table follows the manifest: a manifest that lost more than *max_row_loss* of the last
    plan's rows (an export that failed upstream and left few files, or none) would remove them
    from the table. Such a night fails here, before anything is embedded or removed."""
    before = previous.rows
    if before <= 0 or rows >= before * (1.0 - max_row_loss):
        return
    raise PlanError(
        f"the manifest {manifest_uri} has {rows:,} rows, {1 - rows / before:.0%} fewer than the {before:,} of the "
        f"last plan (run {previous.run_id}); its table would lose them. If the manifest is right, allow it with "
        f"max_row_loss (now {max_row_loss:g}; 1 allows any loss), or plan afresh with --fresh"
    )


def _retired(previous: Plan, p: PlannedPartition) -> RetiredWork:
    return RetiredWork(p.key, p.rows, tuple(sorted({previous.files[f.file].uri for f in p.fragments})))


def _sticky(
    files: list[ManifestFile], units: list[_Unit], previous: Plan
) -> tuple[list[tuple[PlannedPartition, tuple[Fragment, ...]]], list[RetiredWork], list[_Unit]]:
    """Split *previous*'s partitions into kept (every file present at its planned version
    and size; fragments re-indexed into *files*) and retired, and return the row groups no
    kept partition covers, in plan order."""
    where = {f.uri: i for i, f in enumerate(files)}
    covered: dict[int, set[int]] = {}
    kept, retired = [], []
    for p in previous.partitions:
        fragments = []
        for fr in p.fragments:
            was = previous.files[fr.file]
            i = where.get(was.uri)
            now = files[i] if i is not None else None
            same = now is not None and (now.version, now.size, len(now.row_group_rows)) == (
                was.version,
                was.size,
                was.row_groups,
            )
            if not same:
                break
            fragments.append(Fragment(i, fr.row_groups, fr.rows))
        else:
            kept.append((p, tuple(fragments)))
            for fr in fragments:
                covered.setdefault(fr.file, set()).update(fr.row_groups)
            continue
        retired.append(_retired(previous, p))
    fresh = [u for u in units if u.row_group not in covered.get(u.file, ())]
    return kept, retired, fresh


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
    units: list[_Unit], settings: Partitioning, room: int | None = None
) -> tuple[list[list[_Unit]], int, str | None]:
    """Pack *units* at the settings' target, growing the target until the partitions fit in
    *room* (default ``max_partitions``). Returns the partitions, the target used and a note
    if it grew."""
    room = settings.max_partitions if room is None else room
    target = settings.target
    if not units:  # nothing new to pack (a night with no change)
        return [], target, None
    parts = pack(units, target, settings.unit)
    if len(parts) <= room:
        return parts, target, None
    total = sum(u.rows if settings.unit == "rows" else u.bytes for u in units)
    target = max(target, math.ceil(total / room))
    parts = pack(units, target, settings.unit)
    while len(parts) > room:
        target = math.ceil(target * 1.02) + 1
        parts = pack(units, target, settings.unit)
    note = (
        f"{settings.unit} per new partition grew from {settings.target} to {target} "
        f"to stay within --max-partitions {settings.max_partitions}"
    )
    return parts, target, note


def _key(files: list[ManifestFile], fragments: tuple[Fragment, ...]) -> str:
    return work_key((files[f.file].uri, files[f.file].version, f.row_groups) for f in fragments)


def _planned_partitions(
    files: list[ManifestFile], kept: list[tuple[PlannedPartition, tuple[Fragment, ...]]], parts: list[list[_Unit]]
) -> tuple[PlannedPartition, ...]:
    out = [
        PlannedPartition(i, fragments, p.rows, p.bytes, _key(files, fragments), kept=True)
        for i, (p, fragments) in enumerate(kept)
    ]
    for p in parts:
        fragments = _fragments(p)
        out.append(
            PlannedPartition(
                len(out), fragments, sum(u.rows for u in p), sum(u.bytes for u in p), _key(files, fragments)
            )
        )
    return tuple(out)


def write_plan(plan: Plan, *, force: bool = False, dataset: str | None = None) -> tuple[str, bool]:
    """Write ``{output}/runs/{run_id}/plan.json`` once; a re-run with the same plan keeps it.
    Then point the dataset's lineage at it, so the next plan continues this one.

    Returns the URI and whether an identical plan was already there.
    """
    uri = plan_uri(plan.output_uri, plan.run_id)
    lineage = lineage_uri(plan.output_uri, dataset or default_dataset_name(plan.manifest_uri))
    if storage.exists(uri) and not force:
        existing = load_plan(uri)
        if existing.plan_id == plan.plan_id:
            _point_at_if_behind(lineage, existing, uri)  # a try that died between the two writes
            return uri, True
        raise PlanError(
            f"{uri} already holds plan {existing.plan_id} for run {plan.run_id}, but this manifest and these settings "
            f"give plan {plan.plan_id}; use another --run-id (or --force to replace it)"
        )
    storage.write_text(uri, plan.to_json())
    storage.write_text(lineage, json.dumps(_pointer(plan, uri)))
    return uri, False


def _pointer(plan: Plan, uri: str) -> dict[str, str]:
    return {"run_id": plan.run_id, "plan_id": plan.plan_id, "plan_uri": uri, "manifest_uri": plan.manifest_uri}


def _point_at_if_behind(lineage: str, plan: Plan, uri: str) -> None:
    """Point the lineage at *plan* if it is missing or still names the plan *plan* continues;
    a pointer to a later run is left alone (the lineage never moves back)."""
    try:
        current = json.loads(storage.read_text(lineage)).get("run_id")
    except (FileNotFoundError, ValueError, AttributeError):
        current = None
    if current is None or current == plan.previous_run_id:
        storage.write_text(lineage, json.dumps(_pointer(plan, uri)))


def previous_plan(output_uri: str, dataset: str, run_id: str | None) -> Plan | None:
    """The plan a new plan for *dataset* continues: the one the lineage points at, unless it
    is this run's own (a retried plan step continues what its first try continued)."""
    if not storage.is_remote(output_uri):
        output_uri = storage.filesystem_for(output_uri)[1]
    own = plan_uri(output_uri, run_id) if run_id else None
    if own and storage.exists(own):
        mine = load_plan(own)
        if not mine.previous_run_id:
            return None
        try:
            return load_plan(plan_uri(output_uri, mine.previous_run_id))
        except PlanError as exc:
            raise PlanError(
                f"run {run_id}'s plan continues run {mine.previous_run_id}, whose plan is gone ({exc}); "
                "trigger a new run instead of clearing this one"
            ) from None
    try:
        pointer = json.loads(storage.read_text(lineage_uri(output_uri, dataset)))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        where = lineage_uri(output_uri, dataset)
        raise PlanError(f"{where} is not valid JSON ({exc}); remove it to plan afresh") from exc
    try:
        return load_plan(pointer["plan_uri"])
    except (KeyError, TypeError):
        raise PlanError(f"{lineage_uri(output_uri, dataset)} names no plan; remove it to plan afresh") from None
    except PlanError:
        return None  # the plan it named was collected: plan afresh


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
    dataset: str | None = None,
    fresh: bool = False,
    manifest_catalog: ManifestCatalog | None = None,
) -> PlanResult:
    """Plan *manifest_uri* into *output_uri*, continuing the dataset's last plan unless *fresh*.
    *manifest_catalog*: the catalog of an ``iceberg://`` manifest."""
    start = time.perf_counter()
    dataset = dataset or default_dataset_name(manifest_uri)
    previous = None if fresh else previous_plan(output_uri, dataset, run_id)
    plan, row_groups = make_plan(
        manifest_uri,
        output_uri,
        settings,
        run_id=run_id,
        model_uri=model_uri,
        previous=previous,
        manifest_catalog=manifest_catalog,
    )
    uri, reused = write_plan(plan, force=force, dataset=dataset)
    if reused:
        plan = load_plan(uri)
    return PlanResult(plan, uri, time.perf_counter() - start, row_groups, reused)
