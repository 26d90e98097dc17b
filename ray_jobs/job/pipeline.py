"""The partition's Ray Data pipeline: read -> preprocess (CPU actors) -> K model stages ->
write tasks, admitted under a reservation of its whole minimum footprint; each actor pool
grows past its reserved minimum on free capacity (:mod:`ray_jobs.job.admission`)."""

from __future__ import annotations

import contextlib
import time

from ray_jobs.job.config import PreparedJob
from ray_jobs.job.datasource import make_datasource
from ray_jobs.model.stage_spec import StageLayout

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
    from ray_jobs.job.preprocess import Preprocessor, image_limits

    cfg = job.config.job
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
            "limits": image_limits(cfg),
            "fetch_threads": cfg.fetch_threads,
            "fetch_timeout_s": cfg.fetch_timeout_s,
            "startup_scope": startup_scope,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=cfg.preprocess_pool.min, max_size=cfg.preprocess_pool.max),
        num_cpus=cfg.preprocess_cpus,
        **remote_args("preprocess"),
    )
    return add_model_stages(
        ds,
        job.layout,
        job.model_uri,
        cfg.batch_size,
        remote_args,
        dtype=job.config.stage.dtype,
        startup_scope=startup_scope,
    )


def reservation_name(job: PreparedJob) -> str:
    """The placement group's name: the partition slot it works for (shows in `ray list placement-groups`)."""
    from ray_jobs.contract.ids import short_hash

    return f"emb-{job.model_id[:24]}-{job.plan_id}-{job.partition:05d}-{short_hash(job.partition_uri, length=6)}"


@contextlib.contextmanager
def admitted(job: PreparedJob):
    """Yield ``(job, remote_args)`` once the job may start: under ``placement-group`` admission
    its whole minimum footprint is reserved and every operator runs inside it."""
    import ray

    cfg = job.config.job
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

    # Each pool keeps its minimum actors in the reservation and grows to its maximum outside it
    # (admission.PoolPlacement), so the job's own pool sizes stand.
    with reserve(job.footprint, name=reservation_name(job), timeout_s=cfg.admission_timeout_s) as reservation:
        yield job, reservation.remote_args


def execute(job: PreparedJob, sink, remote_args=no_remote_args) -> None:
    """Build *job*'s pipeline and run it into *sink*: the one place a partition's dataset runs.

    Part files are written by Ray Data write tasks; ``sink.on_write_complete`` commits on the
    driver with the tasks' small results only."""
    from ray_jobs.job.progress import ProgressReporter, actor_totals, progress_uri, start_counter
    from ray_jobs.job.stall import watch
    from ray_jobs.perf.stage_stats import job_shapes

    ds = build_dataset(job, remote_args, startup_scope=sink.attempt_id)
    cfg = job.config.job
    sink.stats_dataset = ds  # per-operator statistics for the marker, read once the write has run
    sink.stats_shapes = job_shapes(
        job.layout, cfg.preprocess_cpus, cfg.preprocess_pool.max, READ_TASK_CPUS, WRITE_TASK_CPUS
    )
    sink.pipeline_started_at = time.time()
    sink.progress_counter = start_counter()
    uri = progress_uri(job.config.plan_uri, job.partition) if job.config.plan_uri else None
    totals = actor_totals(sink.progress_counter)
    # no row at the sink for stall_timeout_s interrupts the write: PipelineStalled (ray_jobs.job.stall)
    with ProgressReporter(totals, partition=job.partition, rows_total=job.rows_in, uri=uri), watch(job, totals) as w:
        w.run(lambda: ds.write_datasink(sink, ray_remote_args={"num_cpus": WRITE_TASK_CPUS, **remote_args("write")}))
