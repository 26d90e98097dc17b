"""The pipeline side: the project's model stages (``add_model_stages``) fed preprocessed rows.

The source tiles a pool of rows into batches for as long as the consumer wants them; the
driver iterates the output, and once the steady window (after the warm-up batches) has
lasted ``steady_s`` it stops. Ray is started fresh for each repetition (loopback only, its own
local instance, never a cluster another process started) and shut down after it.

The source is read tasks of 64 batches each, two at a time, as a Parquet read is row groups:
Ray Data's backpressure holds back tasks it has not started, not the output of one it has, so
a few endless tasks run far ahead of a slow model and spill tens of GB to disk. Tasks of 4
batches are bounded too, but their overhead halves the tiny model's rows/s. Ray's session
files (spilled objects included) live in a temporary directory removed after each repetition.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from bench.fair import BenchError, check_window, steady_rate

#: Logical CPUs of a source task: tiling a few in-memory batches is light, and a whole CPU
#: would keep a stage actor from starting on a small machine.
SOURCE_TASK_CPUS = 0.1
#: Batches one read task tiles.
SOURCE_BATCHES_PER_TASK = 64
#: Read tasks running at once.
SOURCE_TASKS_AT_ONCE = 2


@dataclass(frozen=True)
class PipelineSettings:
    model: str
    layout: object  # ray_jobs.model.stage_spec.StageLayout
    dtype: str
    batch: int
    pool_rows: int
    warmup: int
    steady_s: float
    cores: int
    gpus: int
    max_rows: int = 2_000_000

    def __post_init__(self) -> None:
        check_window(self.steady_s, pool_rows=self.pool_rows, batch=self.batch)


@dataclass(frozen=True)
class PipelineResult:
    rows_per_s: float
    first_batch_s: float  # includes starting the stage actors
    batches: int


def _pool_table(rows):
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    cols = {k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else pa.array(list(v)) for k, v in rows.items()}
    return pa.table(cols)


def _tiles(pool_ref, batch: int, first: int, count: int) -> Iterator:
    """Batches *first* .. *first + count - 1* of the pool, each its own table holding only its rows
    (an Arrow slice would carry, and put in the object store, the whole pool's buffers)."""
    import numpy as np
    import ray

    rows = ray.get(pool_ref)
    starts = list(range(0, len(rows["id"]) - batch + 1, batch))
    for k in range(first, first + count):
        lo = starts[k % len(starts)]
        yield _pool_table({key: np.array(v[lo : lo + batch], copy=True) for key, v in rows.items()})


def source_tasks(batches: int, per_task: int = SOURCE_BATCHES_PER_TASK) -> list[tuple[int, int]]:
    """``(first batch, batches)`` of each read task: *batches* in all, at most *per_task* each."""
    return [(first, min(per_task, batches - first)) for first in range(0, batches, per_task)]


def _source(pool_ref, batch: int, batches: int):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    tasks = source_tasks(batches)

    class TiledRows(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_name(self) -> str:
            return "TiledRows"

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [
                ReadTask(
                    functools.partial(_tiles, pool_ref, batch, first, count),
                    BlockMetadata(num_rows=count * batch, size_bytes=None, input_files=None, exec_stats=None),
                )
                for first, count in tasks
            ]

    return TiledRows()


def run_pipeline(settings: PipelineSettings) -> PipelineResult:
    import ray

    from bench.rows import make_rows
    from ray_jobs.job.pipeline import add_model_stages
    from ray_jobs.job.ray_start import WORKER_ENV
    from ray_jobs.model.checkpoint import open_checkpoint

    ckpt = open_checkpoint(settings.model)
    pool = make_rows(ckpt, settings.pool_rows)
    session_dir = tempfile.mkdtemp(prefix="bench-ray-")
    ray.init(
        _temp_dir=session_dir,
        address="local",
        num_cpus=settings.cores + 1,  # + the source tasks' fraction
        num_gpus=settings.gpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": dict(WORKER_ENV)},
    )
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = False
        ctx.enable_progress_bars = False
        src = _source(ray.put(pool), settings.batch, settings.max_rows // settings.batch)
        ds = ray.data.read_datasource(src, num_cpus=SOURCE_TASK_CPUS, concurrency=SOURCE_TASKS_AT_ONCE)
        ds = add_model_stages(ds, settings.layout, ckpt.uri, settings.batch, dtype=settings.dtype)
        times: list[float] = []
        sizes: list[int] = []
        start = time.perf_counter()
        window_opens = max(0, settings.warmup - 1)  # as bench.fair.steady_rate counts it
        # Leaving the loop early is fine: ray.shutdown() below ends the stage actors and source tasks.
        for b in ds.iter_batches(batch_size=settings.batch, batch_format="numpy", prefetch_batches=2):
            times.append(time.perf_counter())
            sizes.append(len(b["id"]))
            if len(times) > window_opens + 1 and times[-1] - times[window_opens] >= settings.steady_s:
                break
        if len(times) < settings.warmup + 2:
            raise BenchError(f"the source ran dry after {len(times)} batches; raise --max-rows")
        return PipelineResult(steady_rate(times, sizes, settings.warmup), times[0] - start, len(times))
    finally:
        ray.shutdown()
        shutil.rmtree(session_dir, ignore_errors=True)
