"""The plan format: ``plan.json``, what a run embeds, partition by partition.

Format 2 keys every partition by its content (:func:`ray_jobs.contract.ids.work_key`) and
says which partitions it kept from the plan it continues and which of that plan's it
retired. Format 1 plans (no keys) are still read: their partitions live under
``plan={plan_id}/partition={index}``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from ray_jobs.errors import PlanError

PLAN_FORMAT = "multimodal-embeddings-plan/2"
PLAN_FORMAT_V1 = "multimodal-embeddings-plan/1"  # partitions not keyed by content


@dataclass(frozen=True)
class Fragment:
    """Row groups of one manifest file (``file`` indexes :attr:`Plan.files`)."""

    file: int
    row_groups: tuple[int, ...]
    rows: int


@dataclass(frozen=True)
class PlannedPartition:
    index: int
    fragments: tuple[Fragment, ...]
    rows: int
    bytes: int
    #: content key of the fragments (with their file versions); "" in format 1 plans
    key: str = ""
    #: True when the previous plan already had this partition (its work may be committed)
    kept: bool = False


@dataclass(frozen=True)
class RetiredWork:
    """A partition of the previous plan that this plan no longer has: one of its files
    vanished or was rewritten. Its rows leave the table when this plan is registered."""

    key: str
    rows: int
    files: tuple[str, ...]


@dataclass(frozen=True)
class PlannedFile:
    uri: str
    size: int
    rows: int
    row_groups: int
    version: str = ""  # ETag / version / mtime at planning: embed refuses a file rewritten since


@dataclass(frozen=True)
class Plan:
    """``plan.json``: what a run embeds, partition by partition. Only ``plan_id`` is hashed."""

    run_id: str
    plan_id: str
    manifest_uri: str
    manifest_fingerprint: str
    output_uri: str
    settings: Mapping[str, object]
    files: tuple[PlannedFile, ...]
    partitions: tuple[PlannedPartition, ...]
    model_uri: str | None = None
    created_at: str = ""
    notes: tuple[str, ...] = ()
    #: the run whose plan this one continues ("" for a first plan)
    previous_run_id: str = ""
    previous_plan_id: str = ""
    retired: tuple[RetiredWork, ...] = ()
    #: the snapshot read when the manifest is an Iceberg table (``iceberg://``), else None
    manifest_snapshot_id: int | None = None
    format: str = PLAN_FORMAT

    @property
    def keyed(self) -> bool:
        """False for a format 1 plan, whose partitions are located by plan id and index."""
        return self.format == PLAN_FORMAT

    @property
    def kept_rows(self) -> int:
        return sum(p.rows for p in self.partitions if p.kept)

    @property
    def retired_rows(self) -> int:
        return sum(r.rows for r in self.retired)

    def work_uri(self, index: int, model_id: str, output_key: str) -> str:
        """Where partition *index*'s work is committed for this model and output identity."""
        from ray_jobs.contract.layout import partition_dir, work_dir

        if not self.keyed:
            return partition_dir(self.output_uri, model_id, self.plan_id, index)
        return work_dir(self.output_uri, model_id, output_key, self.partition(index).key)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.partitions)

    def partition(self, index: int) -> PlannedPartition:
        if not 0 <= index < len(self.partitions):
            raise IndexError(f"plan {self.plan_id} has partitions 0..{len(self.partitions) - 1}, not {index}")
        return self.partitions[index]

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "plan.json") -> Plan:
        try:
            data = json.loads(text)
            if data.get("format") not in (PLAN_FORMAT, PLAN_FORMAT_V1):
                raise ValueError(f"unknown format {data.get('format')!r}")
            data["files"] = tuple(PlannedFile(**f) for f in data["files"])
            data["partitions"] = tuple(
                PlannedPartition(
                    index=p["index"],
                    rows=p["rows"],
                    bytes=p["bytes"],
                    fragments=tuple(Fragment(f["file"], tuple(f["row_groups"]), f["rows"]) for f in p["fragments"]),
                    key=p.get("key", ""),
                    kept=p.get("kept", False),
                )
                for p in data["partitions"]
            )
            data["notes"] = tuple(data.get("notes", ()))
            data["retired"] = tuple(
                RetiredWork(r["key"], r["rows"], tuple(r["files"])) for r in data.get("retired", ())
            )
            return cls(**data)
        except (ValueError, KeyError, TypeError) as exc:
            raise PlanError(f"{source} is not a valid {PLAN_FORMAT}: {exc}") from exc
