"""The nightly DAG's defaults (``include/multimodal_embeddings.defaults.yaml`` + ``EMB_*`` env) and params.

Read at DAG parse time: a small local file and the environment, nothing else.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import yaml

DEFAULTS_FILE = os.environ.get(
    "EMB_DEFAULTS_FILE",
    os.path.join(os.path.dirname(__file__), "..", "..", "include", "multimodal_embeddings.defaults.yaml"),
)
REQUIRED = ("manifest_uri", "output_uri", "model_uri")
APPROVED_TAGS = frozenset({"embeddings", "ray", "kuberay", "iceberg", "nightly", "ml-platform"})


def _coerce(raw: str, like: Any) -> Any:
    if isinstance(like, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(like, int) and not isinstance(like, bool):
        return int(raw)
    if isinstance(like, float):
        return float(raw)
    if isinstance(like, dict) or (like is None and raw.strip().startswith(("{", "["))):
        return json.loads(raw)
    if like is None and raw.strip().lstrip("-").isdigit():
        return int(raw)
    return raw


def load_defaults(environ: dict[str, str] | None = None) -> dict[str, Any]:
    env = os.environ if environ is None else environ
    with open(DEFAULTS_FILE) as fh:
        cfg = yaml.safe_load(fh)
    out = copy.deepcopy(cfg)
    for key in ("schedule", "owner", "retries", "retry_delay_s"):
        if f"EMB_{key.upper()}" in env:
            out[key] = _coerce(env[f"EMB_{key.upper()}"], cfg[key])
    for key, value in cfg["params"].items():
        name = f"EMB_{key.upper()}"
        if name in env:
            out["params"][key] = _coerce(env[name], value)
    if str(out["schedule"]).lower() in ("none", "null", ""):
        out["schedule"] = None
    # A scheduled run needs valid defaults (Airflow refuses the DAG otherwise): until the
    # manifest, output and model are configured, the DAG runs only when triggered with params.
    if not all(out["params"].get(k) for k in REQUIRED):
        out["unscheduled_reason"] = f"set {', '.join('EMB_' + k.upper() for k in REQUIRED)} to schedule it"
        out["schedule"] = None
    return out


def build_params(defaults: dict[str, Any]):
    """Params with JSON schemas: the trigger form, and validation before a run is created."""
    from airflow.sdk import Param

    p = defaults["params"]
    nullable_int = {"type": ["null", "integer"], "minimum": 1}
    return {
        "manifest_uri": Param(
            p["manifest_uri"],
            type="string",
            minLength=1,
            description="Parquet manifest: file, directory or s3:// prefix (id, text, image_uri)",
        ),
        "output_uri": Param(
            p["output_uri"],
            type="string",
            minLength=1,
            description="Output root: plans, embeddings, reports (local path or s3://)",
        ),
        "model_uri": Param(
            p["model_uri"], type="string", minLength=1, description="Twin-tower checkpoint directory or s3:// prefix"
        ),
        "backend": Param(
            p["backend"],
            type="string",
            enum=["local", "kuberay", "existing"],
            description="Where the Ray cluster comes from",
        ),
        "catalog_uri": Param(
            p["catalog_uri"], type="string", description="Iceberg SQL catalog URL (empty: SQLite next to the output)"
        ),
        "partition_rows": Param(p["partition_rows"], **nullable_int, description="Target rows per partition"),
        "partition_bytes": Param(
            p["partition_bytes"], **nullable_int, description="Target image bytes per partition (instead of rows)"
        ),
        "max_partitions": Param(p["max_partitions"], type="integer", minimum=1, maximum=1024),
        "num_stages": Param(p["num_stages"], type="integer", minimum=1, description="Balanced pipeline stages"),
        "stages": Param(
            p["stages"],
            type="string",
            description="Explicit stage spec, e.g. text@gpus=1|image:0-5@gpus=1|image:6-11@gpus=1",
        ),
        "stage_num_cpus": Param(p["stage_num_cpus"], type="number", exclusiveMinimum=0),
        "stage_num_gpus": Param(p["stage_num_gpus"], type="number", minimum=0),
        "stage_pool": Param(
            p["stage_pool"],
            type="string",
            pattern=r"^[1-9][0-9]*(-[1-9][0-9]*)?$",
            description="Actor pool size per stage, MIN-MAX",
        ),
        "batch_size": Param(p["batch_size"], type="integer", minimum=1),
        "max_reject_rate": Param(p["max_reject_rate"], type="number", minimum=0, maximum=1),
        "embed_extra_args": Param(
            p["embed_extra_args"], type="string", description="Extra flags for `python -m ray_jobs embed`"
        ),
        "poll_interval_s": Param(p["poll_interval_s"], type="number", exclusiveMinimum=0),
        "max_partitions_in_flight": Param(
            p["max_partitions_in_flight"],
            **nullable_int,
            description="Partitions running at once; empty: what the cluster holds (its nodes ÷ one job's "
            "footprint, computed when the cluster is up)",
        ),
        "embed_timeout_s": Param(
            p["embed_timeout_s"],
            type="integer",
            minimum=60,
            description="Deadline of one partition try (waiting for a slot + the Ray job); past it the job is "
            "stopped and the task fails",
        ),
        "admission_timeout_s": Param(
            p["admission_timeout_s"],
            type="integer",
            minimum=10,
            description="How long a started job may wait for its whole minimum footprint before failing",
        ),
        "local_num_cpus": Param(p["local_num_cpus"], type="integer", minimum=1),
        "existing_conn_id": Param(p["existing_conn_id"], type="string", minLength=1),
        "kuberay": Param(p["kuberay"], type="object", description="RayCluster settings (image, namespace, workers)"),
    }
