"""The plan format: ``plan.json``, what a run embeds, partition by partition."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from ray_jobs.errors import PlanError

PLAN_FORMAT = "multimodal-embeddings-plan/1"


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
    format: str = PLAN_FORMAT

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
            if data.get("format") != PLAN_FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            data["files"] = tuple(PlannedFile(**f) for f in data["files"])
            data["partitions"] = tuple(
                PlannedPartition(
                    index=p["index"],
                    rows=p["rows"],
                    bytes=p["bytes"],
                    fragments=tuple(Fragment(f["file"], tuple(f["row_groups"]), f["rows"]) for f in p["fragments"]),
                )
                for p in data["partitions"]
            )
            data["notes"] = tuple(data.get("notes", ()))
            return cls(**data)
        except (ValueError, KeyError, TypeError) as exc:
            raise PlanError(f"{source} is not a valid {PLAN_FORMAT}: {exc}") from exc
