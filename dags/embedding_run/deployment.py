"""The deployment's side of the nightly DAG's configuration: the defaults file and ``EMB_*``.

Two kinds of settings, from ``include/multimodal_embeddings.defaults.yaml`` and the environment:

* ``params`` — what the trigger form starts from: each param's declared default
  (:mod:`embedding_run.config`), replaced by the file's ``params:`` entry, then by
  ``EMB_<PARAM>``. Form values are data: each is typed and bounded by its declaration.
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

from embedding_run.config import BACKENDS, REQUIRED, form_fields
from embedding_run.uri_policy import URI_PARAMS, normalize_prefixes, uri_problem
from ray_jobs.config.declare import ConfigError, form_default

DEFAULTS_FILE = os.environ.get(
    "EMB_DEFAULTS_FILE",
    os.path.join(os.path.dirname(__file__), "..", "..", "include", "multimodal_embeddings.defaults.yaml"),
)
_NULL_WORDS = ("", "null", "none")


def form_defaults(from_file: dict[str, Any], env) -> dict[str, Any]:
    """Every form param's default: declared, then the defaults file's, then ``EMB_<PARAM>``."""
    fields = {f.name: f for f in form_fields()}
    unknown = sorted(set(from_file) - set(fields))
    if unknown:
        raise ConfigError(f"defaults file: unknown params {unknown}; the form's params are {sorted(fields)}")
    out = {}
    for name, f in fields.items():
        value = from_file.get(name, form_default(f))
        key = f"EMB_{name.upper()}"
        out[name] = _coerce(env[key], value, key) if key in env else value
    return out


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


def load_defaults(environ: dict[str, str] | None = None, executor: str | None = None) -> dict[str, Any]:
    """The defaults file with ``EMB_*`` applied, checked. *executor*: Airflow's ``[core]
    executor`` setting (None: as Airflow is configured here), which decides whether the
    embedded SQLite catalog may be used (:func:`~embedding_run.catalog_connection.check_catalog_lasts`)."""
    from embedding_run.catalog_connection import check_catalog_lasts, configured_executor

    env = os.environ if environ is None else environ
    with open(DEFAULTS_FILE) as fh:
        cfg = yaml.safe_load(fh)
    out = copy.deepcopy(cfg)
    for key in ("schedule", "owner", "retries", "retry_delay_s"):
        name = f"EMB_{key.upper()}"
        if name in env:
            out[key] = _coerce(env[name], cfg[key], name)
    out["params"] = form_defaults(cfg.get("params") or {}, env)
    for key, value in cfg["deployment"].items():
        name = f"EMB_DEPLOYMENT_{key.upper()}"
        if name in env:
            out["deployment"][key] = _merge(value, _coerce(env[name], value, name))
    out["deployment"] = check_deployment(out["deployment"], out["params"])
    executor = configured_executor() if executor is None else executor
    out["deployment"]["catalog_conn_required"] = check_catalog_lasts(out["params"]["catalog_conn_id"], executor)
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
    dep["manifest_conn_ids"] = _names(dep, "manifest_conn_ids", params.get("manifest_conn_id"))
    dep["allowed_uri_prefixes"] = normalize_prefixes(dep.get("allowed_uri_prefixes"))
    for name in URI_PARAMS:  # a default the deployment does not allow would fail every scheduled run
        problem = params.get(name) and uri_problem(params[name], dep["allowed_uri_prefixes"])
        if problem:
            raise ConfigError(f"default of {name} (EMB_{name.upper()}): {problem} (deployment.allowed_uri_prefixes)")
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
    from embedding_run.deadline import DeadlineSettings

    DeadlineSettings.from_deployment(dep)  # finish_by and its notifier, checked at parse time
    return dep
