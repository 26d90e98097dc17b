"""The contract between the control plane and the data plane.

Manifest schema, output layout, commit-marker format and the deterministic ids. This module
depends on nothing heavier than pyarrow and the standard library, so the Airflow side can
import it at parse time; everything that touches storage lives elsewhere.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from ray_jobs.errors import ManifestError, OutputError, PlanError

# --------------------------------------------------------------------------- manifest

#: Required manifest columns and a description of the accepted Arrow types.
REQUIRED_COLUMNS: Mapping[str, str] = {"id": "string", "text": "string", "image_uri": "string"}
#: Optional columns the data plane understands.
OPTIONAL_COLUMNS: Mapping[str, str] = {"image_bytes": "int64"}


def _type_ok(expected: str, actual: pa.DataType) -> bool:
    if expected == "string":
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if expected == "int64":
        return pa.types.is_integer(actual)
    raise AssertionError(expected)


def check_manifest_schema(schema: pa.Schema, source: str) -> None:
    """Raise :class:`ManifestError` naming the file and column when *schema* breaks the contract."""
    for name, expected in {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}.items():
        idx = schema.get_field_index(name)
        if idx < 0:
            if name in REQUIRED_COLUMNS:
                raise ManifestError(
                    f"manifest file {source}: required column {name!r} ({expected}) is missing; "
                    f"found columns {schema.names}"
                )
            continue
        actual = schema.field(idx).type
        if not _type_ok(expected, actual):
            raise ManifestError(f"manifest file {source}: column {name!r} has type {actual}, expected {expected}")


# --------------------------------------------------------------------------- ids

_ID_SAFE = re.compile(r"[^a-z0-9_]+")


def short_hash(*parts: object, length: int = 12) -> str:
    """A stable short hex digest of JSON-serialisable *parts*."""
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def sanitize_name(name: str) -> str:
    """Lower-case ``[a-z0-9_]`` form of *name*, usable in paths and table names."""
    cleaned = _ID_SAFE.sub("_", name.lower()).strip("_")
    return cleaned or "model"


def make_model_id(name: str, content_digest: str) -> str:
    """``{sanitised name}-{first 10 hex of the checkpoint content hash}``."""
    return f"{sanitize_name(name)}-{content_digest[:10]}"


@dataclass(frozen=True)
class FileFingerprint:
    """One manifest file as planning sees it: its path, byte size, row count and version.

    ``version`` is what the listing says about the content: the object's ETag (or version
    id) on S3, the modification time in nanoseconds locally. A file rewritten with the same
    size and row count gets another version, so the manifest plans anew."""

    path: str
    size: int
    rows: int
    version: str = ""


def manifest_fingerprint(files: Iterable[FileFingerprint]) -> str:
    """A digest of the manifest's files (sorted), independent of listing order."""
    rows = sorted((f.path, f.size, f.rows, f.version) for f in files)
    return short_hash("manifest", rows, length=16)


def default_dataset_name(manifest_uri: str) -> str:
    """The dataset a manifest belongs to when none is named: its last path segment (without
    ``.parquet``), sanitised, plus a short hash of the whole URI, so two manifests that share
    a directory name never share a table (``s3://b/nightly/products/`` -> ``products_1a2b3c4d``)."""
    normalized = manifest_uri.rstrip("/")
    last = normalized.rsplit("/", 1)[-1].removesuffix(".parquet")
    return f"{sanitize_name(last)[:40]}_{short_hash('dataset', normalized, length=8)}"


def make_plan_id(fingerprint: str, settings: Mapping[str, object]) -> str:
    """Short hash of the manifest fingerprint and the partitioning settings."""
    return short_hash("plan", fingerprint, dict(settings), length=12)


# --------------------------------------------------------------------------- layout

SUCCESS_FILE = "_SUCCESS"
COMMIT_FORMAT = "multimodal-embeddings-commit/2"


def join_uri(base: str, *parts: str) -> str:
    """Join path segments onto a local path or URI without touching storage."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def plan_uri(output: str, run_id: str) -> str:
    return join_uri(output, "runs", run_id, "plan.json")


def model_root(output: str, model_id: str) -> str:
    return join_uri(output, "embeddings", f"model={model_id}")


def plan_root(output: str, model_id: str, plan_id: str) -> str:
    return join_uri(model_root(output, model_id), f"plan={plan_id}")


def partition_dir(output: str, model_id: str, plan_id: str, index: int) -> str:
    if index < 0:
        raise ValueError(f"partition index must be >= 0, got {index}")
    return join_uri(plan_root(output, model_id, plan_id), f"partition={index:05d}")


ATTEMPT_PREFIX = "attempt="
#: Lease of a running attempt (JSON, refreshed while it runs): whoever finds it stale may clean the attempt up.
LEASE_FILE = "_ATTEMPT"
#: Markers replaced by ``--force`` are kept here (``_history/<attempt>.json``): their files stay forever.
HISTORY_DIR = "_history"


def new_attempt_id() -> str:
    """A fresh, time-ordered attempt id: ``20261129T082300Z-1a2b3c4d``."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def attempt_dir_name(attempt: str) -> str:
    if not attempt or "/" in attempt:
        raise ValueError(f"invalid attempt id {attempt!r}")
    return f"{ATTEMPT_PREFIX}{attempt}"


def part_file_name(task: int, n: int = 0) -> str:
    """Part file *n* of write task *task* (unique within an attempt; a retried task rewrites its own)."""
    return f"part-{task:05d}-{n:03d}.parquet"


def rejects_file_name(task: int) -> str:
    return f"rejects-{task:05d}.parquet"


def embeddings_schema(text_dim: int, image_dim: int) -> pa.Schema:
    """Schema of ``part-*.parquet``: id plus two L2-normalised fixed-size float32 vectors."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("text_embedding", pa.list_(pa.float32(), text_dim), nullable=False),
            pa.field("image_embedding", pa.list_(pa.float32(), image_dim), nullable=False),
        ]
    )


REJECTS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)


# --------------------------------------------------------------------------- commit marker

COMMIT_FORMAT_V1 = "multimodal-embeddings-commit/1"  # files at the partition root, one rejects file


@dataclass(frozen=True)
class CommittedFile:
    """A file listed by a commit marker, relative to the partition directory
    (``attempt=<id>/part-00000-000.parquet``)."""

    path: str
    rows: int
    bytes: int


@dataclass(frozen=True)
class StageStat:
    """Execution statistics of one operator of the partition's pipeline, from Ray Data's stats.

    ``name`` is ``read``, ``preprocess``, ``stage1`` .. ``stageK`` (model stages, ``layers`` says
    which) or ``write``. ``busy_s`` sums the wall time of every task the operator ran (for an
    actor pool: the time its actors spent on batches), ``cpu_s`` their CPU time, ``span_s`` is
    first task start to last task end. ``actors`` is the pool size (0 for task operators);
    ``num_cpus``/``num_gpus`` are per actor or task."""

    name: str
    operator: str
    rows: int
    tasks: int
    busy_s: float
    cpu_s: float
    span_s: float
    actors: int = 0
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    layers: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a stage stat needs a name")
        for key in ("rows", "tasks", "busy_s", "cpu_s", "span_s", "actors", "num_cpus", "num_gpus"):
            if getattr(self, key) < 0:
                raise ValueError(f"stage stat {self.name}: {key} must be >= 0, got {getattr(self, key)}")

    @property
    def rows_per_busy_s(self) -> float:
        """Rows per second of one worker while busy (rows / summed task wall time)."""
        return self.rows / self.busy_s if self.busy_s > 0 else 0.0

    @property
    def rows_per_s(self) -> float:
        """Rows per second of the whole operator over its span."""
        return self.rows / self.span_s if self.span_s > 0 else 0.0


@dataclass(frozen=True)
class CommitMarker:
    """The JSON content of ``_SUCCESS``: the only thing readers trust.

    It names the attempt that wrote the partition and lists every file of it; files of other
    attempts under the partition directory do not exist as far as any reader is concerned."""

    model_id: str
    plan_id: str
    partition: int
    rows_in: int
    rows_ok: int
    rows_rejected: int
    text_dim: int
    image_dim: int
    files: tuple[CommittedFile, ...]
    rejects: tuple[CommittedFile, ...]
    attempt: str = ""
    rejects_by_reason: Mapping[str, int] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    stages: str = ""
    committed_at: str = ""
    #: the attempt whose marker this one replaced (``--force``), kept in ``_history/``
    supersedes: str = ""
    #: per-operator execution statistics (read, preprocess, stage1.., write); absent in older markers
    stage_stats: tuple[StageStat, ...] = ()
    format: str = COMMIT_FORMAT

    def reconciles(self) -> bool:
        """True when every input row is accounted for and the listed files agree."""
        return (
            self.rows_ok + self.rows_rejected == self.rows_in
            and sum(f.rows for f in self.files) == self.rows_ok
            and sum(f.rows for f in self.rejects) == self.rows_rejected
        )

    @property
    def listed(self) -> tuple[CommittedFile, ...]:
        """Every file the marker commits: embeddings, then rejects."""
        return (*self.files, *self.rejects)

    def data_uris(self, partition_uri: str) -> list[str]:
        """The embedding files to read: the only ones a reader may trust."""
        return [join_uri(partition_uri, f.path) for f in self.files]

    def rejects_uris(self, partition_uri: str) -> list[str]:
        return [join_uri(partition_uri, f.path) for f in self.rejects]

    def to_json(self) -> str:
        data = asdict(self)
        data["files"] = [asdict(f) for f in self.files]
        data["rejects"] = [asdict(f) for f in self.rejects]
        data["stage_stats"] = [asdict(st) for st in self.stage_stats]
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "_SUCCESS") -> CommitMarker:
        try:
            data = json.loads(text)
            if data.get("format") == COMMIT_FORMAT_V1:  # one rejects file, no attempt
                data["rejects"], data["format"] = [data["rejects"]], COMMIT_FORMAT
            if data.get("format") != COMMIT_FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            data["files"] = tuple(CommittedFile(**f) for f in data["files"])
            data["rejects"] = tuple(CommittedFile(**f) for f in data["rejects"])
            data["stage_stats"] = tuple(StageStat(**st) for st in data.get("stage_stats", ()))
            return cls(**data)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise OutputError(f"commit marker {source} is not a valid {COMMIT_FORMAT}: {exc}") from exc


def marker_problems(
    marker: CommitMarker,
    sizes: Mapping[str, int],
    *,
    model_id: str | None = None,
    plan_id: str | None = None,
    partition: int | None = None,
    rows_planned: int | None = None,
    embed_dim: int | None = None,
) -> list[str]:
    """Why a partition committed by *marker* cannot be trusted (empty: it can).

    *sizes* maps paths relative to the partition directory to the byte sizes found in
    storage; only the files the marker lists are looked up. This one function decides for
    ``embed`` (skip a committed partition), ``validate``, the catalog and the report."""
    problems = []
    if rows_planned is not None and marker.rows_in != rows_planned:
        problems.append(f"rows_in {marker.rows_in} != planned {rows_planned}")
    if not marker.reconciles():
        problems.append(
            f"counts do not reconcile: rows_ok {marker.rows_ok} + rows_rejected {marker.rows_rejected} "
            f"vs rows_in {marker.rows_in} and files {sum(f.rows for f in marker.files)}"
        )
    expected = (model_id, plan_id, partition)
    found = (marker.model_id, marker.plan_id, marker.partition)
    if any(e is not None and e != f for e, f in zip(expected, found, strict=True)):
        problems.append(f"marker names model {marker.model_id} plan {marker.plan_id} partition {marker.partition}")
    if embed_dim is not None and (marker.text_dim, marker.image_dim) != (embed_dim, embed_dim):
        problems.append(f"embedding dims {marker.text_dim}/{marker.image_dim} != model's {embed_dim}")
    for f in marker.listed:
        if f.path not in sizes:
            problems.append(f"listed file {f.path} is missing")
        elif sizes[f.path] != f.bytes:
            problems.append(f"listed file {f.path} has {sizes[f.path]} bytes, marker says {f.bytes}")
    return problems


# --------------------------------------------------------------------------- plan

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
