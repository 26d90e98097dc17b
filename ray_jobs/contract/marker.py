"""The commit marker: the JSON content of a partition's ``_SUCCESS``, the only thing readers
trust, and :func:`marker_problems`, the one judge of whether a commit can be trusted."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from ray_jobs.contract.layout import join_uri
from ray_jobs.errors import OutputError

COMMIT_FORMAT = "multimodal-embeddings-commit/2"

#: Start-up figures a marker's ``timings`` carry (:mod:`ray_jobs.job.startup`), in report order,
#: with their labels: the report, the summary command and the run page show them.
STARTUP_LABELS = {
    "startup_driver_s": "driver start",
    "startup_admission_wait_s": "admission wait",
    "startup_actor_start_s": "actor start",
    "startup_model_load_s": "model load",
    "time_to_first_batch_s": "first batch",
}
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
    #: content key of the work (its fragments and their versions) and the output identity;
    #: "" in markers written for format 1 plans, which are named by plan id and partition
    work_key: str = ""
    output_key: str = ""
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
    work_key: str | None = None,
    output_key: str | None = None,
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
    if (work_key is not None and marker.work_key != work_key) or (
        output_key is not None and marker.output_key != output_key
    ):
        problems.append(
            f"marker names work {marker.work_key or '-'} output {marker.output_key or '-'}, "
            f"expected work {work_key} output {output_key}"
        )
    if embed_dim is not None and (marker.text_dim, marker.image_dim) != (embed_dim, embed_dim):
        problems.append(f"embedding dims {marker.text_dim}/{marker.image_dim} != model's {embed_dim}")
    for f in marker.listed:
        if f.path not in sizes:
            problems.append(f"listed file {f.path} is missing")
        elif sizes[f.path] != f.bytes:
            problems.append(f"listed file {f.path} has {sizes[f.path]} bytes, marker says {f.bytes}")
    return problems
