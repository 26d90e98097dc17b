"""The capacity model: measured per-stage rates + a dataset + a time window -> hardware, time, cost.

Pure computation. A *replica* is one partition job on one node: its pools sized for the node's
CPUs and GPUs by :func:`ray_jobs.perf.stage_balance.allocate_pools` (the slowest pool grows first),
so it embeds at ``R = min_i(actors_i * rate_i)`` rows/s. The run is ``partitions`` jobs over
``replicas`` nodes in waves; each job pays a start-up (driver, actors, model load) before its
first batch. The smallest replica count whose wall time fits the window is the answer.

Object-store requests (S3 pricing classes: GET and PUT/COPY/POST/LIST):

* GETs: one per image, plus per partition a fixed overhead (manifest footers and row groups,
  checkpoint configs, marker and lease reads), plus per actor start the checkpoint's tensor
  reads (weights are read tensor by tensor, in place);
* PUTs: embedding part files (multipart above the upload block size: initiate, parts, complete)
  plus per partition a fixed overhead (lease writes and refreshes, rejects, the marker).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ray_jobs.errors import UsageError
from ray_jobs.perf.stage_balance import StageRate, allocate_pools, pipeline_rate

MiB = 1024**2


def _positive(owner: str, **values: float) -> None:
    for key, value in values.items():
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(f"{owner}: {key} must be a positive number, got {value}")


def _non_negative(owner: str, **values: float) -> None:
    for key, value in values.items():
        if not (value >= 0 and math.isfinite(value)):
            raise UsageError(f"{owner}: {key} must be >= 0, got {value}")


@dataclass(frozen=True)
class DatasetSize:
    rows: int
    image_bytes: int

    def __post_init__(self) -> None:
        _positive("dataset", rows=self.rows, image_bytes=self.image_bytes)

    @property
    def avg_image_bytes(self) -> float:
        return self.image_bytes / self.rows


@dataclass(frozen=True)
class Hardware:
    """One node. ``reserved_cpus``: what the driver and Ray Data's read/write tasks take."""

    cpus_per_node: float = 96.0
    gpus_per_node: int = 8
    reserved_cpus: float = 2.0

    def __post_init__(self) -> None:
        _positive("hardware", cpus_per_node=self.cpus_per_node)
        _non_negative("hardware", gpus_per_node=self.gpus_per_node, reserved_cpus=self.reserved_cpus)
        if self.reserved_cpus >= self.cpus_per_node:
            raise UsageError(
                f"--reserved-cpus {self.reserved_cpus:g} leaves no CPU of a {self.cpus_per_node:g}-CPU node"
            )

    @property
    def usable_cpus(self) -> float:
        return self.cpus_per_node - self.reserved_cpus


@dataclass(frozen=True)
class Prices:
    """Defaults: an on-demand data-centre GPU hour, a vCPU hour, S3 Standard request list prices."""

    gpu_hour: float = 2.50
    cpu_hour: float = 0.04
    get_per_1k: float = 0.0004
    put_per_1k: float = 0.005

    def __post_init__(self) -> None:
        _non_negative(
            "prices", gpu_hour=self.gpu_hour, cpu_hour=self.cpu_hour, get=self.get_per_1k, put=self.put_per_1k
        )


@dataclass(frozen=True)
class RunShape:
    """How the run is cut and what each job pays besides embedding (defaults: the plan's and embed's)."""

    window_h: float = 8.0
    partition_rows: int = 1_000_000
    max_partitions: int = 1024
    startup_s: float = 60.0
    rows_per_file: int = 100_000
    embed_dim: int = 512
    upload_block_bytes: int = 50 * MiB  # s3fs' default multipart block
    gets_per_partition: int = 50
    gets_per_actor_start: int = 200
    puts_per_partition: int = 20

    def __post_init__(self) -> None:
        _positive(
            "run",
            window_h=self.window_h,
            partition_rows=self.partition_rows,
            max_partitions=self.max_partitions,
            rows_per_file=self.rows_per_file,
            embed_dim=self.embed_dim,
            upload_block_bytes=self.upload_block_bytes,
        )
        _non_negative(
            "run",
            startup_s=self.startup_s,
            gets_per_partition=self.gets_per_partition,
            gets_per_actor_start=self.gets_per_actor_start,
            puts_per_partition=self.puts_per_partition,
        )

    @property
    def output_row_bytes(self) -> int:
        """One embedded row in a part file: two float32 vectors and an id (before compression)."""
        return 2 * self.embed_dim * 4 + 32


@dataclass(frozen=True)
class StagePlan:
    name: str
    layers: str
    rows_per_s: float  # one actor
    actors_per_replica: int
    actors: int
    cpus: float
    gpus: float


@dataclass(frozen=True)
class CapacityPlan:
    dataset: DatasetSize
    hardware: Hardware
    prices: Prices
    run: RunShape
    stages: tuple[StagePlan, ...]
    replica_rows_per_s: float
    replicas: int
    partitions: int
    rows_per_partition: int
    waves: int
    wall_s: float
    fits: bool
    gpu_nodes: bool
    gets: int
    puts: int

    @property
    def node_hours(self) -> float:
        return self.replicas * self.wall_s / 3600

    @property
    def compute_cost(self) -> float:
        if self.gpu_nodes:
            return self.node_hours * self.hardware.gpus_per_node * self.prices.gpu_hour
        return self.node_hours * self.hardware.cpus_per_node * self.prices.cpu_hour

    @property
    def request_cost(self) -> float:
        return self.gets / 1000 * self.prices.get_per_1k + self.puts / 1000 * self.prices.put_per_1k

    @property
    def image_mb_per_s_per_node(self) -> float:
        return self.replica_rows_per_s * self.dataset.avg_image_bytes / 1e6

    def to_dict(self) -> dict:
        return {
            "rows": self.dataset.rows,
            "image_bytes": self.dataset.image_bytes,
            "window_h": self.run.window_h,
            "fits_window": self.fits,
            "replicas": self.replicas,
            "nodes": self.replicas,
            "node": {"cpus": self.hardware.cpus_per_node, "gpus": self.hardware.gpus_per_node if self.gpu_nodes else 0},
            "replica_rows_per_s": round(self.replica_rows_per_s, 3),
            "partitions": self.partitions,
            "rows_per_partition": self.rows_per_partition,
            "waves": self.waves,
            "wall_h": round(self.wall_s / 3600, 3),
            "stages": [s.__dict__ for s in self.stages],
            "gpus": sum(s.gpus for s in self.stages),
            "cpus": sum(s.cpus for s in self.stages),
            "gets": self.gets,
            "puts": self.puts,
            "request_cost": round(self.request_cost, 2),
            "compute_cost": round(self.compute_cost, 2),
            "image_mb_per_s_per_node": round(self.image_mb_per_s_per_node, 1),
        }

    def lines(self) -> list[str]:
        kind = "GPU" if self.gpu_nodes else "CPU"
        node = (
            f"{self.hardware.gpus_per_node} GPUs + {self.hardware.cpus_per_node:g} CPUs"
            if self.gpu_nodes
            else f"{self.hardware.cpus_per_node:g} CPUs"
        )
        out = [
            f"dataset: {self.dataset.rows:,} rows, {self.dataset.image_bytes / 1e12:,.2f} TB of images "
            f"({self.dataset.avg_image_bytes / 1e3:,.1f} kB each); window {self.run.window_h:g} h",
            f"replica (one partition job per {kind} node of {node}): {self.replica_rows_per_s:,.1f} rows/s",
            "| stage | layers | rows/s per actor | actors per replica | actors | CPUs | GPUs |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for s in self.stages:
            out.append(
                f"| {s.name} | {s.layers or '-'} | {s.rows_per_s:,.1f} | {s.actors_per_replica} | {s.actors:,} "
                f"| {s.cpus:,.0f} | {s.gpus:,.0f} |"
            )
        out += [
            f"replicas (nodes): {self.replicas:,}; GPUs {sum(s.gpus for s in self.stages):,.0f}, "
            f"CPUs {sum(s.cpus for s in self.stages):,.0f}",
            f"partitions: {self.partitions:,} of {self.rows_per_partition:,} rows, in {self.waves} wave(s)",
            f"wall time: {self.wall_s / 3600:,.2f} h (start-up {self.run.startup_s:g} s per partition)"
            + (
                ""
                if self.fits
                else f" -- does NOT fit the {self.run.window_h:g} h window even with one node per partition"
            ),
            f"object store: {self.gets:,} GETs + {self.puts:,} PUTs = ${self.request_cost:,.2f} "
            f"(${self.prices.get_per_1k:g}/1k GET, ${self.prices.put_per_1k:g}/1k PUT)",
            f"compute: {self.node_hours:,.1f} node-hours = ${self.compute_cost:,.2f} "
            + (f"(${self.prices.gpu_hour:g}/GPU-hour)" if self.gpu_nodes else f"(${self.prices.cpu_hour:g}/CPU-hour)"),
            f"image fetch per node: {self.image_mb_per_s_per_node:,.1f} MB/s",
        ]
        return out


def _requests(rates_actors: int, partitions: int, rows_per_partition: int, rows: int, run: RunShape):
    gets = rows + partitions * (run.gets_per_partition + rates_actors * run.gets_per_actor_start)
    files_per_partition = math.ceil(rows_per_partition / run.rows_per_file)
    file_bytes = min(run.rows_per_file, rows_per_partition) * run.output_row_bytes
    puts_per_file = 1 if file_bytes <= run.upload_block_bytes else math.ceil(file_bytes / run.upload_block_bytes) + 2
    puts = partitions * (files_per_partition * puts_per_file + run.puts_per_partition)
    return gets, puts


def object_store_requests(
    actors: int, partitions: int, rows_per_partition: int, rows: int, run: RunShape
) -> tuple[int, int]:
    """``(GETs, PUTs)`` of *partitions* jobs of *rows_per_partition* rows (*rows* in all), each
    starting *actors* actors: the counts the module docstring describes."""
    return _requests(actors, partitions, rows_per_partition, rows, run)


def plan_capacity(
    rates: Sequence[StageRate],
    dataset: DatasetSize,
    hardware: Hardware | None = None,
    run: RunShape | None = None,
    prices: Prices | None = None,
) -> CapacityPlan:
    """The fewest one-job-per-node replicas that embed *dataset* within the window."""
    hardware, run, prices = hardware or Hardware(), run or RunShape(), prices or Prices()
    if not rates:
        raise UsageError("no stage rates given")
    gpu_nodes = any(r.num_gpus > 0 for r in rates)
    if gpu_nodes and hardware.gpus_per_node < 1:
        raise UsageError("the stages use GPUs but --gpus-per-node is 0")
    pools = allocate_pools(rates, hardware.usable_cpus, hardware.gpus_per_node if gpu_nodes else 0.0)
    rate = pipeline_rate(rates, pools)
    partitions = min(max(1, math.ceil(dataset.rows / run.partition_rows)), run.max_partitions)
    rows_per_partition = math.ceil(dataset.rows / partitions)
    per_partition_s = rows_per_partition / rate + run.startup_s
    window_s = run.window_h * 3600
    waves_allowed = math.floor(window_s / per_partition_s)
    fits = waves_allowed >= 1
    replicas = math.ceil(partitions / waves_allowed) if fits else partitions
    waves = math.ceil(partitions / replicas)
    stages = tuple(
        StagePlan(
            r.name,
            r.layers,
            r.rows_per_s,
            n,
            n * replicas,
            n * replicas * r.num_cpus,
            n * replicas * r.num_gpus,
        )
        for r, n in zip(rates, pools, strict=True)
    )
    gets, puts = _requests(sum(pools), partitions, rows_per_partition, dataset.rows, run)
    return CapacityPlan(
        dataset=dataset,
        hardware=hardware,
        prices=prices,
        run=run,
        stages=stages,
        replica_rows_per_s=rate,
        replicas=replicas,
        partitions=partitions,
        rows_per_partition=rows_per_partition,
        waves=waves,
        wall_s=waves * per_partition_s,
        fits=fits,
        gpu_nodes=gpu_nodes,
        gets=gets,
        puts=puts,
    )


def nightly_work_fraction(daily_change: float, partition_rows: int, file_rows: int) -> float:
    """The fraction of the rows a nightly run embeds when *daily_change* of the rows changed.

    Work is keyed by content (sticky plans): a night embeds the rows of new and rewritten
    manifest files, plus the unchanged rows that shared a partition with a rewritten or deleted
    file (that partition is retired and its other row groups are packed anew). A changed file
    of *file_rows* rows sits in partitions of *partition_rows* rows, straddling at most about
    one partition of unchanged neighbours, so the model is
    ``min(1, daily_change x (1 + partition_rows / file_rows))``: an upper bound (appended files
    have no neighbours; a partition of one file has none either)."""
    if not (0 <= daily_change <= 1 and math.isfinite(daily_change)):
        raise UsageError(f"--daily-change must be a fraction between 0 and 1, got {daily_change}")
    _positive("run", partition_rows=partition_rows, file_rows=file_rows)
    return min(1.0, daily_change * (1 + partition_rows / file_rows))


def plan_nightly(
    rates: Sequence[StageRate],
    dataset: DatasetSize,
    daily_change: float,
    file_rows: int,
    hardware: Hardware | None = None,
    run: RunShape | None = None,
    prices: Prices | None = None,
) -> tuple[float, CapacityPlan]:
    """The work fraction (:func:`nightly_work_fraction`) and the capacity plan of a night that
    embeds that fraction of *dataset*, within the same window, on the same nodes and prices."""
    run = run or RunShape()
    fraction = nightly_work_fraction(daily_change, run.partition_rows, file_rows)
    nightly = DatasetSize(max(1, math.ceil(dataset.rows * fraction)), max(1, round(dataset.image_bytes * fraction)))
    return fraction, plan_capacity(rates, nightly, hardware, run, prices)


def nightly_lines(full: CapacityPlan, nightly: CapacityPlan, daily_change: float, file_rows: int, fraction: float):
    """The nightly run beside the full run, as printed by ``capacity --daily-change``."""

    def total(p: CapacityPlan) -> float:
        return p.compute_cost + p.request_cost

    rows = [
        ("rows embedded", f"{full.dataset.rows:,}", f"{nightly.dataset.rows:,}"),
        ("partitions", f"{full.partitions:,}", f"{nightly.partitions:,}"),
        ("nodes", f"{full.replicas:,}", f"{nightly.replicas:,}"),
        ("wall time", f"{full.wall_s / 3600:,.2f} h", f"{nightly.wall_s / 3600:,.2f} h"),
        ("node-hours", f"{full.node_hours:,.1f}", f"{nightly.node_hours:,.1f}"),
        ("compute", f"${full.compute_cost:,.2f}", f"${nightly.compute_cost:,.2f}"),
        ("requests", f"${full.request_cost:,.2f}", f"${nightly.request_cost:,.2f}"),
        ("total", f"${total(full):,.2f}", f"${total(nightly):,.2f}"),
    ]
    ratio = total(nightly) / total(full) if total(full) else 0.0
    return [
        f"nightly at {daily_change:.2%} daily change: embeds min(1, {daily_change:g} x (1 + "
        f"{full.run.partition_rows:,} / {file_rows:,} rows per manifest file)) = {fraction:.2%} of the rows",
        "| | full run | nightly |",
        "|---|---:|---:|",
        *(f"| {name} | {a} | {b} |" for name, a, b in rows),
        f"nightly cost: {ratio:.1%} of a full run's",
    ]
