"""The output layout: where a run's plan, partitions, attempts and files live, and the
schemas of the part and rejects files written there. Paths are built without touching storage.

::

    {output}/runs/{run_id}/plan.json
    {output}/runs/_lineage/{dataset}.json   the last plan of a manifest: where the next night's plan starts
    {output}/runs/_identity/{dataset}.json  the output identity the dataset's table was last registered with
    {output}/embeddings/model={model_id}/out={output_key}/work={work_key}/
        _SUCCESS                           the commit marker (:mod:`ray_jobs.contract.marker`)
        _history/{attempt}.json            markers replaced by ``--force``
        attempt={attempt}/_ATTEMPT         the lease of a running attempt
        attempt={attempt}/part-{task:05d}-{n:03d}.parquet
        attempt={attempt}/rejects-{task:05d}.parquet

A unit of work lives under its content key (:func:`ray_jobs.contract.ids.work_key`: the
manifest fragments it reads, with their file versions) inside its output identity
(:func:`ray_jobs.contract.ids.output_key`: the model and the settings that change the
embeddings), so any plan that contains the same fragments finds it committed. Plans written
before work was keyed by content (format ``multimodal-embeddings-plan/1``) keep their
partitions at ``model={model_id}/plan={plan_id}/partition={index:05d}/``
(:func:`partition_dir`); readers find both through :meth:`ray_jobs.contract.plan.Plan.work_uri`.
"""

from __future__ import annotations

import datetime as dt
import secrets

import pyarrow as pa

SUCCESS_FILE = "_SUCCESS"


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


def output_root(output: str, model_id: str, output_key: str) -> str:
    return join_uri(model_root(output, model_id), f"out={output_key}")


def work_dir(output: str, model_id: str, output_key: str, work_key: str) -> str:
    if not work_key or "/" in work_key or not output_key or "/" in output_key:
        raise ValueError(f"invalid work key {work_key!r} or output key {output_key!r}")
    return join_uri(output_root(output, model_id, output_key), f"work={work_key}")


#: Directories under ``runs/`` that are not runs (their names start with ``_``; run ids never do).
LINEAGE_DIR = "_lineage"
IDENTITY_DIR = "_identity"


def lineage_uri(output: str, dataset: str) -> str:
    """The pointer to the last plan made for *dataset* in this output root."""
    return join_uri(output, "runs", LINEAGE_DIR, f"{dataset}.json")


def identity_uri(output: str, dataset: str) -> str:
    """The record of the output identity *dataset*'s table was last registered with."""
    return join_uri(output, "runs", IDENTITY_DIR, f"{dataset}.json")


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
