"""The data plane's settings groups: what to read and write, how to partition, how to split
the model into stages, and how one partition job runs.

Adding a setting means adding one field here (name, type, default, bounds, help, flag) and a
line in the docs' settings page, which ``scripts/params_doc.py`` regenerates."""

from __future__ import annotations

from dataclasses import dataclass

from ray_jobs.config.declare import ConfigError, Pool, Settings, setting

#: Inference precisions (:mod:`ray_jobs.model.precision`); embeddings are stored as float32.
DTYPES = ("float32", "bfloat16", "float16")
#: ``placement-group``: reserve the whole minimum footprint before the pipeline starts;
#: ``none``: Ray Data's own autoscaling pools, for a cluster that runs one job at a time.
ADMISSION_MODES = ("placement-group", "none")
#: What a stage spec may contain (``text@gpus=1|image:0-5@gpus=1``): no shell metacharacter.
STAGE_SPEC_PATTERN = r"^[A-Za-z0-9_:@=.,|-]+$"
#: ``num_stages`` value that lets the job choose the layout from memory and measurements.
AUTO = "auto"
#: A memory size: bytes, or a number with a unit (``8GiB``, ``512MiB``, ``4GB``, ``100k``).
SIZE_PATTERN = r"^[0-9]+(\.[0-9]+)?([KkMGT]i?B?|B)?$"
#: Logical CPUs of the read/write task bundle and of the job's driver (its footprint).
DEFAULT_TASK_CPUS = 0.75
DEFAULT_DRIVER_CPUS = 0.25
DEFAULT_PARTITION_ROWS = 1_000_000


@dataclass(frozen=True, kw_only=True)
class Sources(Settings):
    """What to embed with which model, and where the results go. On the command line these
    are each command's operands (``--manifest``, ``--output``, ``--model``)."""

    SECTION = "Input and output"

    manifest_uri: str = setting(
        help="Parquet manifest: file, directory or s3:// prefix (id, text, image_uri), or an Iceberg table "
        "iceberg://<namespace>.<table> (its current snapshot's data files)",
        min_length=1,
    )
    output_uri: str = setting(help="Output root: plans, embeddings, reports (local path or s3://)", min_length=1)
    model_uri: str = setting(
        help="Checkpoint directory or s3:// prefix: twin tower, or a Hugging Face dual encoder "
        "(CLIP, SigLIP, SigLIP 2, Chinese-CLIP, VisionTextDualEncoder) as save_pretrained wrote it",
        min_length=1,
    )
    dataset: str | None = setting(
        None,
        help="Dataset name in the catalog (empty: derived from the manifest)",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
    )
    manifest_catalog_uri: str | None = setting(
        None,
        help="Catalog of an iceberg:// manifest: SQLAlchemy URL or pyiceberg:<name> (the DAG resolves its "
        "manifest_conn_id connection instead, at task run time)",
        flag="--manifest-catalog-uri",
        form=False,
    )
    manifest_catalog_name: str | None = setting(
        None,
        help="Name of the SQL catalog holding an iceberg:// manifest (empty: default; the DAG takes "
        "extra.catalog_name of the manifest_conn_id connection)",
        flag="--manifest-catalog-name",
        pattern=r"^[A-Za-z0-9_-]{1,128}$",
        form=False,
    )


@dataclass(frozen=True, kw_only=True)
class Partitioning(Settings):
    SECTION = "Partitioning"

    partition_rows: int | None = setting(
        DEFAULT_PARTITION_ROWS, help="Target rows per partition", flag="--partition-rows", minimum=1
    )
    partition_bytes: int | None = setting(
        None,
        help="Target image bytes per partition (instead of rows)",
        flag="--partition-bytes",
        minimum=1,
        overrides="partition_rows",
    )
    max_partitions: int = setting(
        1024,
        help="Upper bound on partitions (the form: at most Airflow's max_map_length); partitions grow to fit",
        flag="--max-partitions",
        minimum=1,
    )
    avg_image_bytes: int = setting(
        256 * 1024,
        help="Image bytes assumed per row when the footer has no image_bytes hint",
        flag="--avg-image-bytes",
        minimum=1,
        form=False,
    )
    max_row_loss: float = setting(
        0.5,
        help="Largest share of the last plan's rows a night may drop (its table follows the manifest): "
        "a manifest that lost more, e.g. an empty export, fails the plan; 1 allows any",
        flag="--max-row-loss",
        minimum=0.0,
        maximum=1.0,
    )

    @property
    def unit(self) -> str:
        """What partitions are balanced on: ``bytes`` when a byte target is set, else ``rows``."""
        return "bytes" if self.partition_bytes is not None else "rows"

    @property
    def target(self) -> int:
        if self.partition_bytes is not None:
            return self.partition_bytes
        return self.partition_rows or DEFAULT_PARTITION_ROWS


@dataclass(frozen=True, kw_only=True)
class StageSettings(Settings):
    """How the model's layers are split into pipeline stages, and each stage's resources."""

    SECTION = "Model stages"

    num_stages: int | str = setting(
        "auto",
        help="Pipeline stages. auto: one stage with stage_pool replicas (data parallel) when the whole model "
        "(weights + activations at batch_size, in dtype) fits one stage's memory, else the fewest stages that "
        "fit, split by the layers' costs at the data's text lengths; K: the layers split into K balanced stages",
        flag="--num-stages",
        minimum=1,
        maximum=64,
        words=(AUTO,),
    )
    stages: str | None = setting(
        None,
        help="Stage spec, overrides num_stages: text@gpus=1|image:0-5@gpus=1|image:6-11@gpus=1",
        flag="--stages",
        max_length=512,
        pattern=STAGE_SPEC_PATTERN,
        overrides="num_stages",
    )
    auto_stages: str | None = setting(
        None,
        help="The stage spec num_stages=auto resolved to for this run (check_inputs passes it to every job, "
        "which starts from it and may rebalance it between partitions)",
        flag="--auto-stages",
        max_length=512,
        pattern=STAGE_SPEC_PATTERN,
        form=False,
    )
    max_stage_memory: str | None = setting(
        None,
        help="Memory one stage actor may hold for its weights and activations, bytes or a size (8GiB, 512MiB), "
        "which num_stages=auto fits the model into (empty: 4GiB on CPU stages; on GPU stages the GPU's memory "
        "times stage_num_gpus where the layout is decided sees a GPU, else 16GiB)",
        flag="--max-stage-memory",
        max_length=32,
        pattern=SIZE_PATTERN,
    )
    rebalance_min_gain: float | None = setting(
        0.1,
        help="num_stages=auto with 2+ stages: a partition job re-splits the layers by the stage statistics of "
        "the run's committed partitions when that is predicted at least this much faster (0.1: a tenth; "
        "empty: never)",
        flag="--rebalance-min-gain",
        exclusive_minimum=0,
        maximum=10,
    )
    stage_num_cpus: float = setting(
        1.0, help="CPUs per stage actor", flag="--stage-num-cpus", exclusive_minimum=0, maximum=1024
    )
    stage_num_gpus: float = setting(
        0.0, help="GPUs per stage actor (fractions ok)", flag="--stage-num-gpus", minimum=0, maximum=64
    )
    stage_pool: Pool = setting(Pool(1, 1), help="Actor pool size per stage, MIN-MAX", flag="--stage-pool")
    dtype: str = setting(
        "float32",
        help="Stage weights and hidden states between stages (float16: GPU stages only); "
        "embeddings are stored as float32",
        flag="--dtype",
        choices=DTYPES,
        identity=True,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.auto_stages and (self.stages or self.num_stages != AUTO):
            raise ConfigError("auto_stages is the spec num_stages=auto resolved to: not with stages or a number")

    @property
    def auto(self) -> bool:
        """The layout is the job's to choose (and to rebalance): ``num_stages`` auto, no explicit spec."""
        return self.num_stages == AUTO and not self.stages

    @property
    def max_stage_memory_bytes(self) -> int | None:
        return None if self.max_stage_memory is None else parse_size(self.max_stage_memory)


def parse_size(text: str) -> int:
    """Bytes of a size: ``4096``, ``8GiB``, ``512MiB``, ``4GB``, ``1.5G`` (``Ki``/``Mi``/... binary)."""
    import re

    text = str(text).strip()
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(?:([KkMGT])(i?))?B?", text)
    if not re.fullmatch(SIZE_PATTERN, text) or not m:
        raise ConfigError(f"not a memory size: {text!r} (bytes, or a number with K/M/G/T, KiB/MiB/GiB/TiB)")
    number, unit, binary = m.groups()
    power = "KMGT".index(unit.upper()) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


@dataclass(frozen=True, kw_only=True)
class JobSettings(Settings):
    """How one partition job runs: batches, preprocessing, output files, admission."""

    SECTION = "Embed job"

    batch_size: int = setting(64, help="Rows per batch", flag="--batch-size", minimum=1, maximum=65536)
    preprocess_cpus: float = setting(
        1.0, help="CPUs per preprocessing actor", flag="--preprocess-cpus", exclusive_minimum=0, maximum=1024
    )
    preprocess_pool: Pool = setting(Pool(1, 2), help="Preprocessing actor pool, MIN-MAX", flag="--preprocess-pool")
    fetch_threads: int = setting(
        16, help="Concurrent image fetches per preprocessing actor", flag="--fetch-threads", minimum=1, maximum=256
    )
    rows_per_file: int = setting(
        100_000, help="Rows per output Parquet file", flag="--rows-per-file", minimum=1, maximum=10_000_000
    )
    row_group_rows: int = setting(
        8192,
        help="Rows per Parquet row group in the embedding files (the unit a reader fetches)",
        flag="--row-group-rows",
        minimum=1,
        maximum=10_000_000,
    )
    max_image_pixels: int | None = setting(
        None,
        help="Reject images above this many pixels (empty: 50,000,000)",
        flag="--max-image-pixels",
        minimum=1,
        identity=True,
    )
    max_object_bytes: int | None = setting(
        None,
        help="Reject image objects above this size (empty: 64 MiB)",
        flag="--max-object-bytes",
        minimum=1,
        identity=True,
    )
    admission_timeout_s: float = setting(
        1800.0,
        help="How long a started job may wait for its whole minimum footprint before failing "
        "(exit 3, naming the missing resources)",
        flag="--admission-timeout-s",
        exclusive_minimum=0,
        maximum=86400,
    )
    stall_timeout_s: float = setting(
        900.0,
        help="How long a running pipeline may go without moving a row (between its operators or into the sink) "
        "before the job fails (exit 4, naming the stuck operator and its pending or dead actors)",
        flag="--stall-timeout-s",
        exclusive_minimum=0,
        maximum=86400,
    )
    fetch_timeout_s: float = setting(
        60.0,
        help="Seconds one image fetch may take, counted from its submission, before its batch fails and is "
        "retried (never a reject)",
        flag="--fetch-timeout",
        exclusive_minimum=0,
        form=False,
    )
    task_retries: int = setting(
        4,
        help="Retries of a batch that failed transiently (throttling, timeouts, out of memory) before the job fails",
        flag="--task-retries",
        minimum=0,
        form=False,
    )
    admission: str = setting(
        "placement-group",
        help="placement-group: reserve the whole minimum footprint (every pool's minimum actors + read/write "
        "tasks) atomically before the pipeline starts, so concurrent jobs queue instead of deadlocking; "
        "none: Ray Data's autoscaling pools, for a cluster that runs one job at a time",
        flag="--admission",
        choices=ADMISSION_MODES,
        form=False,
    )
    task_cpus: float = setting(
        DEFAULT_TASK_CPUS,
        help="CPUs reserved for read/write tasks: two read slots and one write slot",
        flag="--task-cpus",
        exclusive_minimum=0,
        form=False,
    )
    driver_cpus: float = setting(
        DEFAULT_DRIVER_CPUS,
        help="CPUs of the job's driver, reserved with its footprint (the submitter asks only 0.0001 for it)",
        flag="--driver-cpus",
        exclusive_minimum=0,
        form=False,
    )


@dataclass(frozen=True, kw_only=True)
class Acceptance(Settings):
    """When a run's output is accepted."""

    SECTION = "Embed job"

    max_reject_rate: float = setting(
        0.05,
        help="Fail validation if rejected rows / rows in exceeds this",
        flag="--max-reject-rate",
        minimum=0,
        maximum=1,
    )
