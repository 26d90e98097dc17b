"""The partition job: read rows -> preprocess (CPU actors) -> K model stages -> sink -> commit.

Everything that can be checked without Ray (manifest schema, model, stage layout, output
slot) is checked first, so a bad input fails in seconds with one clear line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from ray_jobs import storage
from ray_jobs.contract import make_plan_id, partition_dir
from ray_jobs.errors import ManifestError, PlanError, UsageError
from ray_jobs.job.datasource import FragmentRef, make_datasource
from ray_jobs.job.footprint import DEFAULT_DRIVER_CPUS, DEFAULT_TASK_CPUS, Footprint, job_footprint
from ray_jobs.job.preprocess import ImageLimits
from ray_jobs.model.stage_spec import StageLayout, StageResources
from ray_jobs.planning.manifest import fingerprint, read_manifest

log = logging.getLogger(__name__)

#: ``placement-group``: reserve the whole minimum footprint before the pipeline starts
#: (README, "Concurrency"); ``none``: Ray Data's own autoscaling pools, for a dedicated cluster.
ADMISSION_MODES = ("placement-group", "none")
_MODEL_ID = re.compile(r"^[a-z0-9_]{1,200}-[0-9a-f]{10}$")  # contract.make_model_id

#: Environment every Ray worker of the job gets (no hub access, quiet transformers).
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
_FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "RAY_JOBS_CACHE_DIR",
)


@dataclass(frozen=True)
class EmbedConfig:
    """Everything one partition job needs; validated on construction."""

    output_uri: str | None
    model_uri: str
    manifest_uri: str | None = None
    plan_uri: str | None = None
    partition: int | None = None
    num_stages: int | None = None
    stages: str | None = None
    stage_defaults: StageResources = field(default_factory=StageResources)
    batch_size: int = 64
    preprocess_cpus: float = 1.0
    preprocess_pool: tuple[int, int] = (1, 2)
    fetch_threads: int = 16
    fetch_timeout_s: float = 60.0
    task_retries: int = 4
    rows_per_file: int = 100_000
    limits: ImageLimits = field(default_factory=ImageLimits)
    ray_address: str | None = None
    force: bool = False
    admission: str = "placement-group"
    admission_timeout_s: float = 1800.0
    task_cpus: float = DEFAULT_TASK_CPUS
    driver_cpus: float = DEFAULT_DRIVER_CPUS
    dtype: str = "float32"  # stage weights and hidden states: float32 | bfloat16 | float16 (CUDA only)
    model_id: str | None = None  # precomputed once per run (check_inputs); None: computed here (metadata only)

    def __post_init__(self) -> None:
        from ray_jobs.model.precision import check_dtype

        check_dtype(self.dtype)
        if self.model_id is not None and not _MODEL_ID.match(self.model_id):
            raise UsageError(
                f"--model-id must look like name-0123456789 (as check_inputs prints it), got {self.model_id!r}"
            )
        if (self.manifest_uri is None) == (self.plan_uri is None):
            raise UsageError("give exactly one of --manifest or --plan")
        if self.plan_uri is not None and (self.partition is None or self.partition < 0):
            raise UsageError("--plan needs --partition K (K >= 0)")
        if self.manifest_uri is not None and self.partition not in (None, 0):
            raise UsageError("--partition goes with --plan; the --manifest form embeds the whole manifest")
        if self.manifest_uri is not None and not self.output_uri:
            raise UsageError("--manifest needs --output")
        if self.num_stages is not None and self.stages:
            raise UsageError("give --num-stages or --stages, not both")
        if self.num_stages is not None and self.num_stages < 1:
            raise UsageError(f"--num-stages must be >= 1, got {self.num_stages}")
        for name in ("batch_size", "fetch_threads", "rows_per_file"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        lo, hi = self.preprocess_pool
        if not 1 <= lo <= hi:
            raise UsageError(f"--preprocess-pool needs 1 <= min <= max, got {lo}-{hi}")
        if self.fetch_timeout_s <= 0:
            raise UsageError(f"--fetch-timeout must be > 0, got {self.fetch_timeout_s}")
        if self.task_retries < 0:
            raise UsageError(f"--task-retries must be >= 0, got {self.task_retries}")
        if self.preprocess_cpus <= 0:
            raise UsageError(f"--preprocess-cpus must be > 0, got {self.preprocess_cpus}")
        if self.limits.max_pixels <= 0 or self.limits.max_object_bytes <= 0:
            raise UsageError("--max-image-pixels and --max-object-bytes must be > 0")
        if self.admission not in ADMISSION_MODES:
            raise UsageError(f"--admission must be one of {', '.join(ADMISSION_MODES)}, got {self.admission!r}")
        if self.admission_timeout_s <= 0:
            raise UsageError(f"--admission-timeout-s must be > 0, got {self.admission_timeout_s}")
        if self.task_cpus <= 0 or self.driver_cpus <= 0:
            raise UsageError("--task-cpus and --driver-cpus must be > 0")


@dataclass(frozen=True)
class PreparedJob:
    """The result of the pre-flight: what will run and where it lands."""

    config: EmbedConfig
    fragments: tuple[FragmentRef, ...]
    model_uri: str
    model_id: str
    embed_dim: int
    layout: StageLayout
    plan_id: str
    partition: int
    partition_uri: str

    @property
    def rows_in(self) -> int:
        return sum(f.rows for f in self.fragments)

    @property
    def footprint(self) -> Footprint:
        return footprint_of(self.layout, self.config)


def footprint_of(layout: StageLayout, cfg: EmbedConfig) -> Footprint:
    """The job's minimum footprint: every pool at its minimum, the read/write task bundle, the driver."""
    return job_footprint(
        ((s.resources.num_cpus, s.resources.num_gpus, s.resources.min_pool) for s in layout.stages),
        preprocess_cpus=cfg.preprocess_cpus,
        preprocess_min=cfg.preprocess_pool[0],
        task_cpus=cfg.task_cpus,
        driver_cpus=cfg.driver_cpus,
    )


def with_fixed_pools(job: PreparedJob) -> PreparedJob:
    """*job* with every pool pinned to its minimum size (what a reservation holds)."""
    stages = tuple(replace(s, resources=replace(s.resources, max_pool=s.resources.min_pool)) for s in job.layout.stages)
    lo = job.config.preprocess_pool[0]
    return replace(job, config=replace(job.config, preprocess_pool=(lo, lo)), layout=replace(job.layout, stages=stages))


@dataclass(frozen=True)
class EmbedResult:
    partition_uri: str
    skipped: bool
    rows_in: int
    rows_ok: int
    rows_rejected: int
    wall_s: float
    rows_per_s: float
    time_to_first_batch_s: float | None
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    attempt: str = ""
    #: start-up figures of the committing attempt (:mod:`ray_jobs.job.startup`), from its marker
    startup: dict[str, float] = field(default_factory=dict)
    #: another attempt committed the partition while this one ran; this one discarded its files
    lost_race: bool = False

    @classmethod
    def from_marker(
        cls,
        uri: str,
        marker,
        *,
        skipped: bool,
        wall_s: float = 0.0,
        first_batch_s: float | None = None,
        lost_race: bool = False,
    ):
        return cls(
            partition_uri=uri,
            skipped=skipped,
            attempt=marker.attempt,
            lost_race=lost_race,
            rows_in=marker.rows_in,
            rows_ok=marker.rows_ok,
            rows_rejected=marker.rows_rejected,
            wall_s=wall_s,
            rows_per_s=marker.rows_in / wall_s if wall_s > 0 else 0.0,
            time_to_first_batch_s=first_batch_s,
            rejects_by_reason=dict(marker.rejects_by_reason),
            startup={k: v for k, v in marker.timings.items() if k.startswith("startup_")},
        )

    def summary(self) -> str:
        if self.lost_race:
            head = "committed by another attempt while this one ran; this attempt discarded its files"
        else:
            head = "already committed, skipped" if self.skipped else "committed"
        line = (
            f"embed: {head}: rows_in={self.rows_in} rows_ok={self.rows_ok} rows_rejected={self.rows_rejected} "
            f"rows/s={self.rows_per_s:.1f} wall={self.wall_s:.1f}s attempt={self.attempt} output={self.partition_uri}"
        )
        if self.startup and not self.skipped:
            figures = " ".join(f"{k.removeprefix('startup_')}={v:.1f}" for k, v in self.startup.items())
            line += f"\nembed: start-up: {figures}"
            if self.time_to_first_batch_s is not None:
                line += f" first_batch_s={self.time_to_first_batch_s:.1f}"
        if self.rejects_by_reason:
            line += "\nembed: rejects by reason: " + ", ".join(f"{k}={v}" for k, v in self.rejects_by_reason.items())
        return line


def _whole_manifest(cfg: EmbedConfig) -> tuple[tuple[FragmentRef, ...], str, str]:
    files = read_manifest(cfg.manifest_uri)
    refs = tuple(FragmentRef(f.uri, tuple(range(len(f.row_group_rows))), f.rows) for f in files if f.rows)
    return refs, make_plan_id(fingerprint(files), {"mode": "whole-manifest"}), cfg.output_uri


def _plan_partition(cfg: EmbedConfig) -> tuple[tuple[FragmentRef, ...], str, str]:
    from ray_jobs.planning.plan import load_plan

    plan = load_plan(cfg.plan_uri)
    if cfg.output_uri and cfg.output_uri.rstrip("/") != plan.output_uri.rstrip("/"):
        raise UsageError(f"--output {cfg.output_uri} differs from the plan's output {plan.output_uri}; drop --output")
    try:
        part = plan.partition(cfg.partition)
    except IndexError as exc:
        raise PlanError(f"--partition: {exc}") from exc
    refs = tuple(FragmentRef(plan.files[f.file].uri, f.row_groups, f.rows) for f in part.fragments)

    def check(ref_file) -> None:
        size, version = storage.stat_file(ref_file.uri) or (None, None)
        if size != ref_file.size or (ref_file.version and version != ref_file.version):
            raise ManifestError(
                f"manifest file {ref_file.uri} changed since planning (size {size}, planned {ref_file.size}; "
                f"version {version}, planned {ref_file.version}); plan the run again"
            )

    used = {f.file for f in part.fragments}
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(used)))) as pool:
        list(pool.map(check, [plan.files[i] for i in sorted(used)]))
    return refs, plan.plan_id, plan.output_uri


def prepare(cfg: EmbedConfig) -> PreparedJob:
    """Check every input without Ray; raises :class:`~ray_jobs.errors.JobInputError` subclasses."""
    from ray_jobs.model.checkpoint import open_checkpoint
    from ray_jobs.model.staged import build_layout

    refs, plan_id, output = _plan_partition(cfg) if cfg.plan_uri else _whole_manifest(cfg)
    if not storage.is_remote(output):
        output = storage.filesystem_for(output)[1]  # absolute local path in markers and summaries
    partition = cfg.partition or 0
    ckpt = open_checkpoint(cfg.model_uri)
    layout = build_layout(ckpt, num_stages=cfg.num_stages, spec=cfg.stages, defaults=cfg.stage_defaults)
    if cfg.dtype == "float16":
        cpu_only = [s.name for s in layout.stages if s.resources.num_gpus <= 0]
        if cpu_only:
            raise UsageError(
                f"--dtype float16 needs CUDA, but {', '.join(cpu_only)} has no GPU; "
                "use --dtype bfloat16 on CPU or give every stage gpus (--stage-num-gpus / gpus= in --stages)"
            )
    model_id = cfg.model_id or ckpt.model_id
    return PreparedJob(
        config=cfg,
        fragments=refs,
        model_uri=ckpt.uri,
        model_id=model_id,
        embed_dim=ckpt.embed_dim,
        layout=layout,
        plan_id=plan_id,
        partition=partition,
        partition_uri=partition_dir(output, model_id, plan_id, partition),
    )


def _ensure_ray(job: PreparedJob) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {**WORKER_ENV, **{k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}}
    if job.config.ray_address:
        ray.init(address=job.config.ray_address, runtime_env={"env_vars": env}, log_to_driver=True)
        return
    if os.environ.get("RAY_ADDRESS"):
        # inside a Ray job: the submitter's runtime_env (working_dir, env_vars) already applies
        ray.init(log_to_driver=True)
        return
    footprint = job.footprint
    needed = footprint.total()["CPU"] - footprint.driver_cpus  # this process is the driver
    # Logical CPUs: the whole minimum footprint (pools at their minimum, read/write tasks) plus
    # headroom for Ray Data's per-operator reservations, so a small machine oversubscribes
    # instead of queueing forever or pinning the preprocessing pool at its minimum.
    num_cpus = max(os.cpu_count() or 1, int(needed + 0.999) + 2)
    for k, v in env.items():
        os.environ.setdefault(k, v)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",  # loopback only
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )


#: Logical CPUs of a write task. Writing Parquet is light next to decoding and the model; a
#: whole CPU would hold back a preprocessing or stage actor (Ray Data reserves resources per
#: operator). Not 0: a zero-CPU task may land on a head node that takes no work.
WRITE_TASK_CPUS = 0.1
#: Logical CPUs of a read task: Ray Data's default.
READ_TASK_CPUS = 1.0


def no_remote_args(op: str) -> dict:
    """The default per-operator Ray options: none beyond each operator's own resources."""
    return {}


def add_model_stages(
    ds,
    layout: StageLayout,
    model_uri: str,
    batch_size: int,
    remote_args=no_remote_args,
    dtype: str = "float32",
    startup_scope: str = "",
):
    """Append one ``map_batches`` actor pool per stage of *layout* to *ds*, computing in *dtype*.

    *remote_args* maps an operator name (``stage0``, ``stage1``, ...) to extra Ray options for
    its actors (a placement-group scheduling strategy under admission control)."""
    from ray.data import ActorPoolStrategy

    from ray_jobs.model.staged import ModelStage

    spec = layout.spec()
    for stage in layout.stages:
        res = stage.resources
        ds = ds.map_batches(
            ModelStage,
            fn_constructor_kwargs={
                "model_uri": model_uri,
                "layout_spec": spec,
                "stage_index": stage.index,
                "num_threads": max(1, int(res.num_cpus)),
                "dtype": dtype,
                "startup_scope": startup_scope,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(min_size=res.min_pool, max_size=res.max_pool),
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus,
            **remote_args(f"stage{stage.index}"),
        )
    return ds


def build_dataset(job: PreparedJob, remote_args=no_remote_args, startup_scope: str = ""):
    """The lazy Ray Data pipeline for *job* (nothing runs until it is written).

    Every operator merges ``remote_args(name)`` into its Ray options; names: ``read``,
    ``preprocess``, ``stage0`` .. ``stage{K-1}`` (and ``write`` for the sink, in :func:`execute`).
    Actors record their start-up under *startup_scope* (:mod:`ray_jobs.job.startup`)."""
    import ray
    from ray.data import ActorPoolStrategy

    from ray_jobs.errors import TRANSIENT_MARKER
    from ray_jobs.job.preprocess import Preprocessor

    cfg = job.config
    ctx = ray.data.DataContext.get_current()
    # Part files are named by attempt and write task and listed in the marker: order is not needed.
    ctx.execution_options.preserve_order = False
    # A batch that failed for a transient reason (throttling, timeout, out-of-memory stage) is
    # retried in its task with exponential backoff and jitter; once these run out the job fails.
    ctx.retried_map_errors = [TRANSIENT_MARKER]
    ctx.max_map_retries = cfg.task_retries
    ds = ray.data.read_datasource(make_datasource(job.fragments), ray_remote_args=remote_args("read") or None)
    ds = ds.map_batches(
        Preprocessor,
        fn_constructor_kwargs={
            "model_uri": job.model_uri,
            "limits": cfg.limits,
            "fetch_threads": cfg.fetch_threads,
            "fetch_timeout_s": cfg.fetch_timeout_s,
            "startup_scope": startup_scope,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=cfg.preprocess_pool[0], max_size=cfg.preprocess_pool[1]),
        num_cpus=cfg.preprocess_cpus,
        **remote_args("preprocess"),
    )
    return add_model_stages(
        ds, job.layout, job.model_uri, cfg.batch_size, remote_args, dtype=cfg.dtype, startup_scope=startup_scope
    )


def reservation_name(job: PreparedJob) -> str:
    """The placement group's name: the partition slot it works for (shows in `ray list placement-groups`)."""
    from ray_jobs.contract import short_hash

    return f"emb-{job.model_id[:24]}-{job.plan_id}-{job.partition:05d}-{short_hash(job.partition_uri, length=6)}"


@contextlib.contextmanager
def admitted(job: PreparedJob):
    """Yield ``(job, remote_args)`` once the job may start: under ``placement-group`` admission
    its whole minimum footprint is reserved and every operator runs inside it."""
    import ray

    cfg = job.config
    ctx = ray.data.DataContext.get_current()
    if cfg.admission == "none":
        # Nothing reserved the actors' resources: never wait forever for them (Ray Data's
        # default, -1, would). The wait is per operator, in pipeline order, so the pools start
        # one after another; that is the price of starting without a reservation.
        ctx.wait_for_min_actors_s = int(cfg.admission_timeout_s)
        yield job, no_remote_args
        return
    # The reservation holds every actor's resources before any starts, so an actor cannot
    # queue for them: all pools start at once (-1: Ray Data does not block each operator's
    # start until its actors are up, which would start them one pool after another: ~5 s of
    # worker boot and imports per pool, in series, on every partition).
    ctx.wait_for_min_actors_s = -1
    from ray_jobs.job.admission import reserve

    with reserve(job.footprint, name=reservation_name(job), timeout_s=cfg.admission_timeout_s) as reservation:
        yield with_fixed_pools(job), reservation.remote_args


def execute(job: PreparedJob, sink, remote_args=no_remote_args) -> None:
    """Build *job*'s pipeline and run it into *sink*: the one place a partition's dataset runs.

    Part files are written by Ray Data write tasks; ``sink.on_write_complete`` commits on the
    driver with the tasks' small results only."""
    from ray_jobs.perf.stage_stats import job_shapes

    ds = build_dataset(job, remote_args, startup_scope=sink.attempt_id)
    cfg = job.config
    sink.stats_dataset = ds  # per-operator statistics for the marker, read once the write has run
    sink.stats_shapes = job_shapes(
        job.layout, cfg.preprocess_cpus, cfg.preprocess_pool[1], READ_TASK_CPUS, WRITE_TASK_CPUS
    )
    sink.pipeline_started_at = time.time()
    ds.write_datasink(sink, ray_remote_args={"num_cpus": WRITE_TASK_CPUS, **remote_args("write")})


def run_prepared(job: PreparedJob) -> EmbedResult:
    from ray_jobs.job.datasink import EmbeddingDatasink
    from ray_jobs.output.sink import Attempt, clean_dead_attempts, committed_marker, read_marker_or_refuse

    start = time.perf_counter()
    read_marker_or_refuse(job.partition_uri)  # fail now, not after the whole pipeline ran
    if not job.config.force:
        marker = committed_marker(job.partition_uri, job.model_id)
        if marker is not None:
            return EmbedResult.from_marker(job.partition_uri, marker, skipped=True)
    with Attempt(job.partition_uri) as attempt:
        clean_dead_attempts(job.partition_uri, keep=attempt.id)
        sink = EmbeddingDatasink(
            attempt,
            rows_in=job.rows_in,
            text_dim=job.embed_dim,
            image_dim=job.embed_dim,
            rows_per_file=job.config.rows_per_file,
            force=job.config.force,
            commit_meta={
                "model_id": job.model_id,
                "plan_id": job.plan_id,
                "partition": job.partition,
                "stages": job.layout.spec(),
            },
        )
        try:
            if job.rows_in:
                _ensure_ray(job)
                waiting = time.time()
                with admitted(job) as (admitted_job, remote_args):
                    sink.admission_wait_s = time.time() - waiting
                    execute(admitted_job, sink, remote_args)
            else:  # an empty manifest commits an empty partition without starting Ray
                sink.complete([])
        except BaseException:
            attempt.discard()
            raise
    wall = time.perf_counter() - start
    if sink.conflict is not None:
        winner = committed_marker(job.partition_uri, job.model_id)
        if winner is None:
            raise sink.conflict
        return EmbedResult.from_marker(job.partition_uri, winner, skipped=True, lost_race=True)
    clean_dead_attempts(job.partition_uri, keep=attempt.id)
    marker = sink.marker
    first = marker.timings.get("time_to_first_batch_s")
    return EmbedResult.from_marker(job.partition_uri, marker, skipped=False, wall_s=wall, first_batch_s=first)


def run_embed(cfg: EmbedConfig) -> EmbedResult:
    return run_prepared(prepare(cfg))
