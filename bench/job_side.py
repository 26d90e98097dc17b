"""The job side of bench/job_vs_torch.py: the partition job users run, in a fresh process.

``run_prepared`` (what ``python -m ray_jobs embed`` calls) embeds the manifest on a local Ray
started here the way the job starts one (loopback only, logical CPUs for its footprint), and
always a new local instance; or, with ``ray_address``, on a Ray the bench started before the
repetitions (:func:`running_cluster`), as each partition job of a night runs on the cluster
``cluster_up`` started. The dataset the job builds is observed (not changed) to read Ray
Data's execution stats after the commit: per-operator busy time, rows and bytes out
(object-store traffic), spill.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

from bench.fair import BenchError
from bench.spawned import run_spawned


@dataclass(frozen=True)
class JobSettings:
    model: str
    manifest: str
    output: str
    dtype: str
    batch: int
    stage_cpus: float
    stage_gpus: float
    preprocess_pool: tuple[int, int]
    gpus: int
    #: the job's layout and any other job settings, by name (``num_stages``, ``stages``, ...);
    #: a setting left out takes the job's default
    settings: tuple[tuple[str, object], ...] = ()
    #: a running Ray to connect to; None: the job starts its own local Ray
    ray_address: str | None = None


@dataclass(frozen=True)
class OperatorFigures:
    name: str
    busy_s: float  # remote wall time summed over its tasks / actor calls
    cpu_s: float
    rows_out: int
    bytes_out: int  # what the operator put in the object store
    span_s: float  # first task start to last task end


@dataclass(frozen=True)
class JobFigures:
    rows_in: int
    rows_ok: int
    end_to_end_s: float  # spawn of the process to the commit, imports and Ray start included
    pipeline_s: float  # run_prepared alone
    steady_rows_per_s: float
    operators: tuple[OperatorFigures, ...]
    spilled_bytes: int
    restored_bytes: int
    stats_text: str
    layout: str  # the stage spec the job ran (its pools' sizes are in the operators' names)
    #: the job's start-up seconds from its commit marker (driver, actor start, admission wait, ...)
    startup: tuple[tuple[str, float], ...] = ()


@contextlib.contextmanager
def _observed_datasets(found: list):
    """Record every dataset ``ray_jobs.job.pipeline.build_dataset`` returns (the job runs unchanged)."""
    from ray_jobs.job import pipeline

    original = pipeline.build_dataset

    def build(*args, **kwargs):
        ds = original(*args, **kwargs)
        found.append(ds)
        return ds

    pipeline.build_dataset = build
    try:
        yield
    finally:
        pipeline.build_dataset = original


def _all_operator_stats(summary) -> list:
    """Every operator's stats, upstream first (a write's summary holds its inputs as parents)."""
    ops = []
    for parent in summary.parents or ():
        ops.extend(_all_operator_stats(parent))
    return ops + list(summary.operators_stats)


def _operators(summary) -> tuple[OperatorFigures, ...]:
    out = []
    for op in _all_operator_stats(summary):
        span = 0.0
        if op.earliest_start_time is not None and op.latest_end_time is not None:
            span = op.latest_end_time - op.earliest_start_time
        out.append(
            OperatorFigures(
                op.operator_name,
                float(op.wall_time.sum) if op.wall_time else 0.0,
                float(op.cpu_time.sum) if op.cpu_time else 0.0,
                int(op.output_num_rows.sum) if op.output_num_rows else 0,
                int(op.output_size_bytes.sum) if op.output_size_bytes else 0,
                span,
            )
        )
    return tuple(out)


def steady_from_operators(rows: int, operators) -> float:
    """Rows/s of the last model stage from its first task's start to its last task's end: the
    pipeline is full by the time the last stage starts, so start-up (actor start, model load,
    the first batch through the earlier operators) is outside this window."""
    stages = [op for op in operators if "ModelStage" in op.name and op.span_s > 0]
    if not stages:
        names = ", ".join(f"{op.name} (span {op.span_s:.1f}s)" for op in operators)
        raise BenchError(f"Ray Data's stats name no model stage with timings: {names}")
    return rows / stages[-1].span_s


def _config(settings: JobSettings):
    from ray_jobs.job.config import EmbedConfig

    return EmbedConfig.of(
        output_uri=settings.output,
        model_uri=settings.model,
        manifest_uri=settings.manifest,
        stage_num_cpus=settings.stage_cpus,
        stage_num_gpus=settings.stage_gpus,
        batch_size=settings.batch,
        preprocess_pool=settings.preprocess_pool,
        dtype=settings.dtype,
        force=True,
        **dict(settings.settings),
    )


@contextlib.contextmanager
def running_cluster(settings: JobSettings):
    """A local Ray started in this process, sized as the job would size its own, for the job
    processes to connect to; yields its address and is shut down on exit."""
    import shutil
    import tempfile

    import ray

    from ray_jobs.job.embed import prepare
    from ray_jobs.job.ray_start import local_ray_options

    session_dir = tempfile.mkdtemp(prefix="bench-ray-")
    options = local_ray_options(prepare(_config(settings)))
    ray.init(address="local", num_gpus=settings.gpus, _temp_dir=session_dir, log_to_driver=False, **options)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(session_dir, ignore_errors=True)


def _job_process(settings: JobSettings, spawned_at: float, queue) -> None:
    try:
        import ray

        from ray_jobs.job.embed import prepare, run_prepared
        from ray_jobs.job.ray_start import WORKER_ENV, local_ray_options

        job = prepare(_config(settings))
        for k, v in WORKER_ENV.items():
            os.environ.setdefault(k, v)
        if settings.ray_address:  # a partition job of a night: the cluster is up
            ray.init(address=settings.ray_address, runtime_env={"env_vars": dict(WORKER_ENV)}, log_to_driver=False)
        else:
            ray.init(  # as ray_start.ensure_ray starts a local Ray, but always a new instance
                address="local",
                num_gpus=settings.gpus,
                runtime_env={"env_vars": dict(WORKER_ENV)},
                log_to_driver=False,
                **local_ray_options(job),
            )
        ray.data.DataContext.get_current().enable_progress_bars = False
        found: list = []
        try:
            t0 = time.perf_counter()
            with _observed_datasets(found):
                result = run_prepared(job)
            pipeline_s = time.perf_counter() - t0
            end_to_end = time.time() - spawned_at
            summary = found[-1].get_stats_summary()
            stats_text = found[-1].stats()
        finally:
            ray.shutdown()
        operators = _operators(summary)
        queue.put(
            JobFigures(
                result.rows_in,
                result.rows_ok,
                end_to_end,
                pipeline_s,
                steady_from_operators(result.rows_in, operators),
                operators,
                int(summary.global_bytes_spilled or 0),
                int(summary.global_bytes_restored or 0),
                stats_text,
                job.layout.spec(),
                tuple((k.removeprefix("startup_"), float(v)) for k, v in sorted(result.startup.items())),
            )
        )
    except BaseException as exc:
        queue.put(f"{type(exc).__name__}: {exc}")


def run_job(settings: JobSettings, timeout_s: float = 3600.0) -> JobFigures:
    return run_spawned(_job_process, (settings,), timeout_s=timeout_s, what="the partition job")
