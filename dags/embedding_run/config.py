"""The nightly DAG's configuration: the form's defaults and the deployment's infrastructure.

Two kinds of settings, from ``include/multimodal_embeddings.defaults.yaml`` and ``EMB_*`` env:

* ``params`` — what the trigger form starts from (``EMB_<PARAM>`` overrides a default).
  Form values are data: each is typed and bounded by the JSON schema in :func:`param_schemas`.
* ``deployment`` — infrastructure and the lists the form may choose from: the backends, the
  Airflow connections (Ray dashboards, the Iceberg catalog), the KubeRay image(s), namespace,
  service account, Kubernetes connection, kubeconfig and worker-group limits
  (``EMB_DEPLOYMENT_<KEY>``, JSON or a comma list, overrides a key; dicts are merged).
  Only whoever deploys sets these: no form value can name an image, a connection or a path
  that is not listed here.

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
BACKENDS = ("local", "kuberay", "existing")
_NULL_WORDS = ("", "null", "none")


class ConfigError(ValueError):
    """The defaults file or an ``EMB_*`` variable is invalid (raised at parse time, naming the key)."""


# ---------------------------------------------------------------------------------------------- loading
def _coerce(raw: str, like: Any, key: str) -> Any:
    text = raw.strip()
    if not isinstance(like, str) and text.lower() in _NULL_WORDS:  # null; the param's schema says if it may be
        return type(like)() if isinstance(like, (dict, list)) else None
    if like is None or isinstance(like, (dict, list)):
        if text.startswith(("{", "[")):
            return json.loads(text)
        if isinstance(like, list):
            return [item.strip() for item in text.split(",") if item.strip()]
        if isinstance(like, dict):
            raise ConfigError(f"{key} must be a JSON object, got {raw!r}")
        try:
            return json.loads(text)  # a number or a boolean for a nullable key
        except ValueError:
            return raw
    if isinstance(like, bool):
        return text.lower() in ("1", "true", "yes", "on")
    try:
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"{key} must be a number, got {raw!r}") from None
    return raw


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in over.items()}}
    return over


def load_defaults(environ: dict[str, str] | None = None) -> dict[str, Any]:
    env = os.environ if environ is None else environ
    with open(DEFAULTS_FILE) as fh:
        cfg = yaml.safe_load(fh)
    out = copy.deepcopy(cfg)
    for key in ("schedule", "owner", "retries", "retry_delay_s"):
        name = f"EMB_{key.upper()}"
        if name in env:
            out[key] = _coerce(env[name], cfg[key], name)
    for key, value in cfg["params"].items():
        name = f"EMB_{key.upper()}"
        if name in env:
            out["params"][key] = _coerce(env[name], value, name)
    for key, value in cfg["deployment"].items():
        name = f"EMB_DEPLOYMENT_{key.upper()}"
        if name in env:
            out["deployment"][key] = _merge(value, _coerce(env[name], value, name))
    out["deployment"] = check_deployment(out["deployment"], out["params"])
    template = out["deployment"].get("task_pod_template_file")
    out["executor_config"] = {"pod_template_file": template} if template else {}
    if str(out["schedule"]).lower() in ("none", "null", ""):
        out["schedule"] = None
    # A scheduled run needs valid defaults (Airflow refuses the DAG otherwise): until the
    # manifest, output and model are configured, the DAG runs only when triggered with params.
    if not all(out["params"].get(k) for k in REQUIRED):
        out["unscheduled_reason"] = f"set {', '.join('EMB_' + k.upper() for k in REQUIRED)} to schedule it"
        out["schedule"] = None
    return out


def _names(deployment: dict[str, Any], key: str, default: Any) -> list[str]:
    """A deployment list of names; without one, the single param default (if any) is allowed."""
    values = deployment.get(key)
    if values is None or values == []:
        values = [default] if default else []
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f"deployment.{key} must be a list of non-empty names, got {values!r}")
    if default and default not in values:
        raise ConfigError(f"the default {default!r} is not in deployment.{key} {values}")
    return values


def check_deployment(deployment: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Normalise and check the deployment section: every list non-empty, every limit a count."""
    dep = copy.deepcopy(deployment)
    dep["backends"] = _names(dep, "backends", params.get("backend"))
    unknown = sorted(set(dep["backends"]) - set(BACKENDS))
    if unknown or not dep["backends"]:
        raise ConfigError(f"deployment.backends {dep['backends']}: choose among {list(BACKENDS)}")
    dep["existing_conn_ids"] = _names(dep, "existing_conn_ids", params.get("existing_conn_id"))
    dep["catalog_conn_ids"] = _names(dep, "catalog_conn_ids", params.get("catalog_conn_id"))
    template = dep.get("task_pod_template_file")
    if template is not None and not (isinstance(template, str) and os.path.isabs(template)):
        raise ConfigError(f"deployment.task_pod_template_file must be an absolute path, got {template!r}")
    limit = dep.get("local_max_num_cpus")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ConfigError(f"deployment.local_max_num_cpus must be a positive integer, got {limit!r}")
    kuberay = dict(dep.get("kuberay") or {})
    kuberay["images"] = _names(kuberay, "images", params.get("kuberay_image"))
    if not kuberay["images"]:
        raise ConfigError("deployment.kuberay.images must list at least one Ray image")
    for group in ("cpu_workers", "gpu_workers"):
        g = kuberay.get(group) or {}
        lo, hi = g.get("min_replicas", 0), g.get("max_replicas")
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
            raise ConfigError(f"deployment.kuberay.{group} needs 0 <= min_replicas <= max_replicas, got {g!r}")
    dep["kuberay"] = kuberay
    return dep


# ---------------------------------------------------------------------------------------------- the form
def _nullable(kind: str, **schema: Any) -> dict[str, Any]:
    """Optional in the form: JSON null (the default) or a value of *kind*."""
    return {"type": ["null", kind], **schema}


def param_schemas(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every form param's JSON schema, in form order: the one place to add a param.

    A param added here needs a default under ``params:`` in the defaults file. Choices come
    from *deployment* (enums), numbers are bounded by its maxima.
    """
    k8s = deployment["kuberay"]
    cpu_w, gpu_w = k8s["cpu_workers"], k8s["gpu_workers"]
    io, part, stages, job, cluster = "Input and output", "Partitioning", "Model stages", "Embed job", "Cluster"
    pool = {"type": "string", "pattern": r"^[1-9][0-9]{0,3}(-[1-9][0-9]{0,3})?$"}
    return {
        # -- what to embed, where to: required
        "manifest_uri": {
            "type": "string",
            "minLength": 1,
            "section": io,
            "description": "Parquet manifest: file, directory or s3:// prefix (id, text, image_uri)",
        },
        "output_uri": {
            "type": "string",
            "minLength": 1,
            "section": io,
            "description": "Output root: plans, embeddings, reports (local path or s3://)",
        },
        "model_uri": {
            "type": "string",
            "minLength": 1,
            "section": io,
            "description": "Checkpoint directory or s3:// prefix: twin tower, or a Hugging Face dual encoder "
            "(CLIP, SigLIP, SigLIP 2, Chinese-CLIP, VisionTextDualEncoder) as save_pretrained wrote it",
        },
        "dataset": _nullable(
            "string",
            pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
            section=io,
            description="Dataset name in the catalog (empty: derived from the manifest)",
        ),
        "catalog_conn_id": {
            "type": ["null", "string"],
            "enum": [None, *deployment["catalog_conn_ids"]],
            "section": io,
            "description": "Airflow connection of the Iceberg catalog (empty: SQLite next to the output)",
        },
        # -- partitioning
        "partition_rows": _nullable("integer", minimum=1, section=part, description="Target rows per partition"),
        "partition_bytes": _nullable(
            "integer", minimum=1, section=part, description="Target image bytes per partition (instead of rows)"
        ),
        "max_partitions": {"type": "integer", "minimum": 1, "maximum": 1024, "section": part},
        # -- stage layout
        "num_stages": {
            "type": "integer",
            "minimum": 1,
            "maximum": 64,
            "section": stages,
            "description": "Balanced pipeline stages",
        },
        "stages": _nullable(
            "string",
            maxLength=512,
            pattern=r"^[A-Za-z0-9_:@=.,|-]+$",
            section=stages,
            description="Stage spec, overrides num_stages: text@gpus=1|image:0-5@gpus=1|image:6-11@gpus=1",
        ),
        "stage_num_cpus": {"type": "number", "exclusiveMinimum": 0, "maximum": 1024, "section": stages},
        "stage_num_gpus": {"type": "number", "minimum": 0, "maximum": 64, "section": stages},
        "stage_pool": {**pool, "section": stages, "description": "Actor pool size per stage, MIN-MAX"},
        # -- the embed job's own flags (each one argv element of `python -m ray_jobs embed`)
        "batch_size": {"type": "integer", "minimum": 1, "maximum": 65536, "section": job},
        "preprocess_cpus": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 1024,
            "section": job,
            "description": "CPUs per preprocessing actor",
        },
        "preprocess_pool": {**pool, "section": job, "description": "Preprocessing actor pool, MIN-MAX"},
        "fetch_threads": {
            "type": "integer",
            "minimum": 1,
            "maximum": 256,
            "section": job,
            "description": "Concurrent image fetches per preprocessing actor",
        },
        "rows_per_file": {
            "type": "integer",
            "minimum": 1,
            "maximum": 10_000_000,
            "section": job,
            "description": "Rows per output Parquet file",
        },
        "max_image_pixels": _nullable(
            "integer", minimum=1, section=job, description="Reject images above this many pixels (empty: decoder's)"
        ),
        "max_object_bytes": _nullable(
            "integer", minimum=1, section=job, description="Reject image objects above this size (empty: no limit)"
        ),
        "max_reject_rate": {"type": "number", "minimum": 0, "maximum": 1, "section": job},
        "poll_interval_s": {"type": "number", "minimum": 0.1, "maximum": 600, "section": job},
        "dtype": {
            "type": "string",
            "enum": ["float32", "bfloat16", "float16"],
            "section": stages,
            "description": "Stage weights and hidden states between stages (float16: GPU stages only); "
            "embeddings are stored as float32",
        },
        # -- concurrency and deadlines (README, "Concurrency")
        "max_partitions_in_flight": _nullable(
            "integer",
            minimum=1,
            maximum=1024,
            section=job,
            description="Partitions running at once (empty: what the cluster holds, its nodes ÷ one job's "
            "footprint, computed when the cluster is up)",
        ),
        "embed_timeout_s": {
            "type": "integer",
            "minimum": 60,
            "maximum": 7 * 86400,
            "section": job,
            "description": "Deadline of one partition try (waiting for a slot + the Ray job); past it the job is "
            "stopped and the task fails",
        },
        "admission_timeout_s": {
            "type": "integer",
            "minimum": 10,
            "maximum": 86400,
            "section": job,
            "description": "How long a started job may wait for its whole minimum footprint before failing",
        },
        # -- where the Ray cluster comes from: only what the deployment lists
        "backend": {
            "type": "string",
            "enum": list(deployment["backends"]),
            "section": cluster,
            "description": "Where the Ray cluster comes from",
        },
        "local_num_cpus": {
            "type": "integer",
            "minimum": 1,
            "maximum": deployment["local_max_num_cpus"],
            "section": cluster,
            "description": "local backend: logical CPUs of the Ray head",
        },
        "existing_conn_id": {
            "type": "string",
            "enum": list(deployment["existing_conn_ids"]),
            "section": cluster,
            "description": "existing backend: the Airflow connection of the Ray dashboard",
        },
        "kuberay_image": {
            "type": ["null", "string"],
            "enum": [None, *k8s["images"]],
            "section": cluster,
            "description": f"kuberay backend: Ray image (empty: {k8s['images'][0]})",
        },
        "kuberay_cpu_workers_max": _nullable(
            "integer",
            minimum=max(1, cpu_w.get("min_replicas", 0)),
            maximum=cpu_w["max_replicas"],
            section=cluster,
            description=f"kuberay backend: most CPU workers (empty: {cpu_w['max_replicas']})",
        ),
        "kuberay_gpu_workers_max": _nullable(
            "integer",
            minimum=max(0, gpu_w.get("min_replicas", 0)),
            maximum=gpu_w["max_replicas"],
            section=cluster,
            description=f"kuberay backend: most GPU workers (empty: {gpu_w['max_replicas']})",
        ),
    }


def build_params(defaults: dict[str, Any]):
    """Params with JSON schemas: the trigger form, and validation before a run is created.

    Every default except the three required URIs must satisfy its own schema (an invalid
    ``EMB_*`` value fails the parse, naming it)."""
    from airflow.sdk import Param
    from airflow.sdk.exceptions import ParamValidationError

    schemas = param_schemas(defaults["deployment"])
    values = defaults["params"]
    missing, extra = sorted(set(schemas) - set(values)), sorted(set(values) - set(schemas))
    if missing or extra:
        raise ConfigError(f"defaults file params and the param schemas differ: missing {missing}, unknown {extra}")
    params = {}
    for name, schema in schemas.items():
        params[name] = Param(values[name], **copy.deepcopy(schema))
        if name not in REQUIRED:
            try:
                params[name].resolve()
            except ParamValidationError as exc:
                raise ConfigError(f"default of param {name} (EMB_{name.upper()}): {exc}") from None
    return params


def validated_params(params: dict[str, Any], deployment: dict[str, Any] | None = None) -> dict[str, Any]:
    """*params* checked again at task run time against the deployment as it is now.

    Raises :class:`airflow.sdk.exceptions.ParamValidationError` naming the field."""
    from airflow.sdk.definitions.param import ParamsDict

    if deployment is None:
        deployment = load_defaults()["deployment"]
    from airflow.sdk import Param

    schemas = param_schemas(deployment)
    form = ParamsDict({name: Param(params.get(name), **copy.deepcopy(s)) for name, s in schemas.items()})
    resolved = form.validate()
    return {**dict(params), **resolved}
