"""The nightly run's one typed configuration, and the trigger form derived from it.

:class:`RunConfig` is a tree of frozen settings groups: the data plane's
(:mod:`ray_jobs.config.settings`: sources, partitioning, stages, the job, acceptance) and the
control plane's below (the catalog connection, orchestration, the cluster). Each setting is
declared once; the form's JSON schema and sections, the job's argv, the command line and the
job's own config are derived from those declarations. ``check_inputs`` validates a run's
params into a :class:`RunConfig` once, against the deployment as it is then; the other
tasks get it from XCom (:meth:`RunConfig.to_dict` / :meth:`RunConfig.from_dict`).

Standard library and the data plane's config only: read at DAG parse time.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from typing import Any

from ray_jobs.config.declare import (
    ConfigError,
    Field,
    Settings,
    check_value,
    field_schema,
    fields_of,
    from_flat,
    setting,
    to_flat,
)
from ray_jobs.config.settings import Acceptance, JobSettings, Partitioning, Sources, StageSettings

REQUIRED = ("manifest_uri", "output_uri", "model_uri")
APPROVED_TAGS = frozenset({"embeddings", "ray", "kuberay", "iceberg", "nightly", "ml-platform"})
BACKENDS = ("local", "kuberay", "existing")
#: Airflow's ``[core] max_map_length`` default: the most mapped embed tasks one run may have
MAX_MAP_LENGTH = 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class CatalogChoice(Settings):
    SECTION = "Input and output"

    catalog_conn_id: str | None = setting(
        None, help="Airflow connection of the Iceberg catalog (empty: SQLite next to the output)"
    )
    manifest_conn_id: str | None = setting(
        None, help="Airflow connection of the catalog holding an iceberg://<namespace>.<table> manifest_uri"
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Orchestration(Settings):
    """How Airflow runs the partitions: how many at once, how often it polls, how long one may take."""

    SECTION = "Embed job"

    poll_interval_s: float = setting(
        5.0, help="Seconds between polls of a partition's Ray job", minimum=0.1, maximum=600
    )
    max_partitions_in_flight: int | None = setting(
        None,
        help="Partitions running at once (empty: what the cluster holds, its nodes ÷ one job's "
        "footprint, computed when the cluster is up)",
        minimum=1,
        maximum=1024,
    )
    embed_timeout_s: int = setting(
        21600,
        help="Deadline of one partition's Ray job, from its admission (waiting for a slot is bounded "
        "apart, by the queue ahead); past it the job is stopped and the task fails",
        minimum=60,
        maximum=7 * 86400,
    )
    redo_partitions: str | None = setting(
        None,
        help="Embed these committed partitions again (indices of this run's plan, e.g. 3,7,10-12); "
        "nothing else is redone",
        pattern=r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$",
        max_length=2000,
    )
    redo_rejects: str | None = setting(
        None,
        help="Embed again every committed partition with rejects of these reasons, as the report lists "
        "them (comma-separated, e.g. access denied,unreadable object after a storage outage)",
        pattern=r"^[a-z][a-z0-9 _-]*(\s*,\s*[a-z][a-z0-9 _-]*)*$",
        max_length=500,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterChoice(Settings):
    """Where the Ray cluster comes from: only what the deployment lists (see :func:`deployment_bounds`)."""

    SECTION = "Cluster"

    backend: str = setting("local", help="Where the Ray cluster comes from", choices=BACKENDS)
    local_num_cpus: int = setting(4, help="local backend: logical CPUs of the Ray head", minimum=1)
    existing_conn_id: str = setting("ray_default", help="existing backend: the Airflow connection of the Ray dashboard")
    kuberay_image: str | None = setting(None, help="kuberay backend: Ray image (empty: the deployment's first)")
    kuberay_cpu_workers_max: int | None = setting(
        None, help="kuberay backend: most CPU workers (empty: the deployment's maximum)", minimum=1
    )
    kuberay_gpu_workers_max: int | None = setting(
        None, help="kuberay backend: most GPU workers (empty: the deployment's maximum)", minimum=0
    )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One run's validated settings, grouped as the form's sections are."""

    sources: Sources
    catalog: CatalogChoice = dataclasses.field(default_factory=CatalogChoice)
    partitioning: Partitioning = dataclasses.field(default_factory=Partitioning)
    stage: StageSettings = dataclasses.field(default_factory=StageSettings)
    job: JobSettings = dataclasses.field(default_factory=JobSettings)
    acceptance: Acceptance = dataclasses.field(default_factory=Acceptance)
    orchestration: Orchestration = dataclasses.field(default_factory=Orchestration)
    cluster: ClusterChoice = dataclasses.field(default_factory=ClusterChoice)

    @classmethod
    def from_params(cls, params: dict[str, Any], deployment: dict[str, Any]) -> RunConfig:
        """The run's params, each checked against its declaration and then against the
        deployment's lists and limits as they are now. Raises :class:`ConfigError` naming the param
        (an unknown one with the closest valid name)."""
        from embedding_run.uri_policy import check_uri_params, normalize_prefixes

        fields = {f.name: f for f in form_fields()}
        check_known(params, fields)
        try:
            config = cls.from_dict(params)
        except ConfigError as exc:
            raise ConfigError(f"param {exc}") from None
        values = config.to_dict()
        for name, bounds in deployment_bounds(deployment).items():
            problem = check_value(fields[name], values[name], bounds)
            if problem:
                raise ConfigError(f"param {name}: {problem}")
        check_uri_params(values, normalize_prefixes(deployment.get("allowed_uri_prefixes")))
        return config

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """From a flat dict of settings (params, or :meth:`to_dict`); absent settings default."""
        groups = {}
        for name, kind in _GROUPS.items():
            missing = [f.name for f in fields_of(kind) if f.required and values.get(f.name) is None]
            if missing:
                raise ConfigError(f"{missing[0]}: must be set")
            groups[name] = from_flat(kind, values)
        return cls(**groups)

    def to_dict(self) -> dict[str, Any]:
        """Setting name -> JSON value: what XCom carries between the run's tasks."""
        return {k: v for group in self.groups() for k, v in to_flat(group).items()}

    def groups(self) -> tuple[Settings, ...]:
        return tuple(getattr(self, name) for name in _GROUPS)


def check_known(params: dict[str, Any], fields: dict[str, Any]) -> None:
    """Refuse a param this DAG does not declare (a typo would otherwise leave the default in
    place, silently), naming it and the closest declared name."""
    unknown = sorted(set(params) - set(fields))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(str(name), list(fields), n=1, cutoff=0.6)
        hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    raise ConfigError(
        f"unknown param{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: not a param of this DAG "
        "(docs/params.md lists them)"
    )


#: group name -> its settings class, in form order (RunConfig's fields)
_GROUPS: dict[str, type[Settings]] = typing.get_type_hints(RunConfig)


def _form_fields() -> list[tuple[Field, type[Settings]]]:
    return [(f, kind) for kind in _GROUPS.values() for f in fields_of(kind) if f.spec.form]


def form_fields() -> list[Field]:
    """Every param of the trigger form, in form order."""
    return [f for f, _ in _form_fields()]


def deployment_bounds(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What the deployment allows, as JSON-schema keys that tighten the declarations: the
    backends, connections, images and storage prefixes it lists, and its limits."""
    from embedding_run.uri_policy import URI_PARAMS, form_pattern, normalize_prefixes

    k8s = deployment["kuberay"]
    cpu_w, gpu_w = k8s["cpu_workers"], k8s["gpu_workers"]
    allowed = normalize_prefixes(deployment.get("allowed_uri_prefixes"))
    helps = {f.name: f.spec.help for f in form_fields()}
    # workers on other machines (deployment.catalog_conn_required): no SQLite catalog in AIRFLOW_HOME
    no_catalog = [] if deployment.get("catalog_conn_required") else [None]
    return {
        **{
            name: {"pattern": form_pattern(allowed), "description": f"{helps[name]} (allowed: {', '.join(allowed)})"}
            for name in URI_PARAMS
        },
        "max_partitions": {"maximum": MAX_MAP_LENGTH},
        "backend": {"enum": list(deployment["backends"])},
        "existing_conn_id": {"enum": list(deployment["existing_conn_ids"])},
        "catalog_conn_id": {"enum": [*no_catalog, *deployment["catalog_conn_ids"]]},
        "manifest_conn_id": {"enum": [None, *deployment.get("manifest_conn_ids", [])]},
        "kuberay_image": {
            "enum": [None, *k8s["images"]],
            "description": f"kuberay backend: Ray image (empty: {k8s['images'][0]})",
        },
        "local_num_cpus": {"maximum": deployment["local_max_num_cpus"]},
        "kuberay_cpu_workers_max": {
            "minimum": max(1, cpu_w.get("min_replicas", 0)),
            "maximum": cpu_w["max_replicas"],
            "description": f"kuberay backend: most CPU workers (empty: {cpu_w['max_replicas']})",
        },
        "kuberay_gpu_workers_max": {
            "minimum": max(0, gpu_w.get("min_replicas", 0)),
            "maximum": gpu_w["max_replicas"],
            "description": f"kuberay backend: most GPU workers (empty: {gpu_w['max_replicas']})",
        },
    }


def param_schemas(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every form param's JSON schema, in form order, with the deployment's choices and limits."""
    bounds = deployment_bounds(deployment)
    return {f.name: {**field_schema(f, kind.SECTION), **bounds.get(f.name, {})} for f, kind in _form_fields()}


def build_params(defaults: dict[str, Any]):
    """Params with JSON schemas: the trigger form, and validation before a run is created.

    Every default except the three required URIs must satisfy its own schema (an invalid
    ``EMB_*`` value fails the parse, naming it)."""
    from airflow.sdk import Param
    from airflow.sdk.exceptions import ParamValidationError

    values = defaults["params"]
    params = {}
    for name, schema in param_schemas(defaults["deployment"]).items():
        params[name] = Param(values[name], **copy.deepcopy(schema))
        if name not in REQUIRED:
            try:
                params[name].resolve()
            except ParamValidationError as exc:
                raise ConfigError(f"default of param {name} (EMB_{name.upper()}): {exc}") from None
    return params
