"""What the nightly DAG's Python tasks do, kept out of the DAG file so it stays wiring only.

``check_inputs`` validates the run's params into the typed :class:`~embedding_run.config.RunConfig`
once, against the deployment as it is then, and hands it on in its XCom; every later step
takes that result (``checked``) and returns JSON-serialisable results for XCom (URIs, ids,
counts: never row data). The data plane (``ray_jobs``) is imported inside the functions, at
task run time.
"""

from __future__ import annotations

import re
import time
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from embedding_run.config import RunConfig
from ray_jobs.config.declare import ConfigError

_RUN_ID_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def plan_run_id(airflow_run_id: str) -> str:
    return _RUN_ID_SAFE.sub("_", airflow_run_id).strip("_")


def run_config(params: dict[str, Any], deployment: dict[str, Any] | None = None) -> RunConfig:
    """The run's params as its typed config, checked against the deployment as it is now (a run
    created before the deployment narrowed its lists is refused, naming the param)."""
    if deployment is None:
        from embedding_run.deployment import load_defaults

        deployment = load_defaults()["deployment"]
    try:
        return RunConfig.from_params(params, deployment)
    except ConfigError as exc:
        raise AirflowFailException(str(exc)) from None


def config_of(checked: dict[str, Any]) -> RunConfig:
    """The config ``check_inputs`` validated, from its XCom."""
    return RunConfig.from_dict(checked["config"])


def catalog_target(config: RunConfig):
    """The run's Iceberg catalog (:class:`~embedding_run.catalog_connection.CatalogTarget`)."""
    from embedding_run.catalog_connection import CatalogConnectionError, resolve_catalog

    try:
        return resolve_catalog(config.catalog.catalog_conn_id, config.sources.output_uri)
    except CatalogConnectionError as exc:
        raise AirflowFailException(str(exc)) from None


def _fail(exc: Exception) -> AirflowFailException:
    return AirflowFailException(str(exc))


def check_inputs(params: dict[str, Any]) -> dict[str, Any]:
    """Params valid, manifest readable and schema-valid, model present, stage layout fits,
    output writable. Any problem fails the task at once (no retry, no cluster)."""
    from ray_jobs.errors import JobInputError
    from ray_jobs.job.footprint import footprint_of
    from ray_jobs.planning.manifest import read_manifest

    config = run_config(params)
    catalog = catalog_target(config)  # the connection exists and is usable, before any cluster starts
    try:
        if config.partitioning.partition_rows and config.partitioning.partition_bytes:
            raise JobInputError("params: give partition_rows or partition_bytes, not both")
        files = read_manifest(config.sources.manifest_uri)
        ckpt, layout = _model_layout(config)
        _check_writable(config.sources.output_uri)
    except (JobInputError, ValueError) as exc:
        raise _fail(exc) from None
    return {
        "config": config.to_dict(),
        "files": len(files),
        "rows": sum(f.rows for f in files),
        "model_id": ckpt.model_id,  # metadata only, once per run; every job gets it as --model-id
        "model_format": ckpt.format,
        "embed_dim": ckpt.embed_dim,
        "stages": layout.spec(),
        "footprint": footprint_of(layout, config.job).to_dict(),
        "catalog_uri": catalog.redacted_uri,
    }


def _model_layout(config: RunConfig):
    """The checkpoint (twin tower or a Hugging Face dual encoder, as saved) and its stage layout."""
    from ray_jobs.model.checkpoint import open_checkpoint
    from ray_jobs.model.stage_spec import default_resources
    from ray_jobs.model.staged import build_layout

    s = config.stage
    ckpt = open_checkpoint(config.sources.model_uri)
    return ckpt, build_layout(ckpt, num_stages=s.num_stages, spec=s.stages, defaults=default_resources(s))


def _check_writable(output_uri: str) -> None:
    from ray_jobs import storage
    from ray_jobs.errors import JobInputError

    probe = f"{output_uri.rstrip('/')}/_write_probe"
    try:
        storage.write_text(probe, "ok")
        storage.remove_tree(probe)
    except OSError as exc:
        raise JobInputError(f"params.output_uri {output_uri} is not writable: {exc}") from exc


#: what the task log suggests when not even one job fits the cluster
CAPACITY_ADVICE = (
    "shrink the stage layout or pool minimums, give the cluster more resources, or (an autoscaling "
    "cluster that will grow) set max_partitions_in_flight"
)


def _backend_deployment(deployment: dict[str, Any], backend: str) -> dict[str, Any]:
    """The deployment's section for *backend*: ``kuberay:``, or its ``<backend>_*`` keys."""
    if isinstance(deployment.get(backend), dict):
        return deployment[backend]
    prefix = f"{backend}_"
    return {k.removeprefix(prefix): v for k, v in deployment.items() if k.startswith(prefix)}


def backend_config(config: RunConfig, deployment: dict[str, Any] | None = None) -> dict[str, Any]:
    """The chosen backend's settings: infrastructure from the deployment, narrowed by the
    form's ``<backend>_*`` choices (the provider's backend decides what they mean)."""
    from airflow_ray.backends import backend_settings
    from ray_jobs.config.declare import to_flat

    if deployment is None:
        from embedding_run.deployment import load_defaults

        deployment = load_defaults()["deployment"]
    backend = config.cluster.backend
    prefix = f"{backend}_"
    choices = {k.removeprefix(prefix): v for k, v in to_flat(config.cluster).items() if k.startswith(prefix)}
    try:
        return backend_settings(backend, choices, _backend_deployment(deployment, backend))
    except ValueError as exc:
        raise AirflowFailException(str(exc)) from None


def partition_capacity(checked: dict[str, Any], cluster: dict[str, Any], backend_cfg: dict[str, Any]):
    """How many partitions run at once: ``max_partitions_in_flight``, or what the cluster holds
    (its nodes, as the backend knows them from *backend_cfg*, ÷ one job's footprint)."""
    from airflow_ray.backends import cluster_nodes
    from airflow_ray.capacity import max_in_flight
    from airflow_ray.errors import ClusterError

    requested = config_of(checked).orchestration.max_partitions_in_flight
    try:
        nodes = cluster_nodes(cluster, backend_cfg)
        result = max_in_flight(checked["footprint"], nodes, requested, advice=CAPACITY_ADVICE)
    except ClusterError as exc:
        raise _fail(exc) from None
    print(
        f"capacity: one job holds {result['job_footprint']}; the cluster ({result['nodes']} nodes, "
        f"{result['cluster_total']}) fits {result['cluster_fits']} at once; "
        f"max partitions in flight = {result['max_in_flight']}"
        + (" (requested)" if result["requested"] else " (computed)")
    )
    return result


def plan_partitions(checked: dict[str, Any], airflow_run_id: str) -> dict[str, Any]:
    """Write the plan; return one job per partition that is not committed yet (resume). Every
    job gets the model id and the stage spec ``check_inputs`` resolved."""
    from embedding_run.jobs import partition_jobs
    from ray_jobs.contract.layout import partition_dir
    from ray_jobs.errors import JobInputError
    from ray_jobs.output.markers import committed_marker
    from ray_jobs.planning.plan import run_plan

    config, model_id = config_of(checked), checked["model_id"]
    try:
        result = run_plan(
            config.sources.manifest_uri,
            config.sources.output_uri,
            config.partitioning,
            run_id=plan_run_id(airflow_run_id),
            model_uri=config.sources.model_uri,
        )
    except JobInputError as exc:
        raise _fail(exc) from None
    plan = result.plan
    todo = [
        p.index
        for p in plan.partitions
        if committed_marker(partition_dir(plan.output_uri, model_id, plan.plan_id, p.index), model_id) is None
    ]
    return {
        "plan_uri": result.uri,
        "plan_id": plan.plan_id,
        "partitions": len(plan.partitions),
        "todo": todo,
        "jobs": partition_jobs(config, result.uri, todo, model_id, checked.get("stages")),
        "summary": result.summary().splitlines()[0],
        "started_at": time.time(),
    }


def validate_partitions(checked: dict[str, Any], planned: dict[str, Any]) -> dict[str, Any]:
    from ray_jobs.output.validate import validate_plan
    from ray_jobs.planning.plan import load_plan

    config = config_of(checked)
    plan = load_plan(planned["plan_uri"])
    report = validate_plan(plan, checked["model_id"], max_reject_rate=config.acceptance.max_reject_rate)
    print(report.table())
    if not report.ok:
        failed = ", ".join(f"{c.index:05d}" for c in report.failed)
        where = f" (partitions {failed})" if failed else ""
        raise AirflowFailException(
            f"validation failed for plan {plan.plan_id}{where}: " + "; ".join(report.problems()[:20])
        )
    return {
        "rows_in": report.rows_in,
        "rows_ok": report.rows_ok,
        "rows_rejected": report.rows_rejected,
        "reject_rate": report.reject_rate,
    }


def register_catalog(checked: dict[str, Any], planned: dict[str, Any], airflow_run_id: str):
    """Register the run's files; the result (XCom, Asset event, report) names the catalog
    only by its redacted URI and connection id, never its credentials."""
    from ray_jobs.output.catalog import register_plan
    from ray_jobs.planning.plan import load_plan

    config, model_id = config_of(checked), checked["model_id"]
    plan = load_plan(planned["plan_uri"])
    target = catalog_target(config)
    result = register_plan(plan, model_id, target.uri, run_id=airflow_run_id, dataset=config.sources.dataset)
    print(result.summary())
    return {
        "table": result.table,
        "snapshot_id": result.snapshot_id,
        "rows": result.rows,
        "files": result.files,
        "new_snapshot": result.new_snapshot,
        "plan_id": plan.plan_id,
        "model_id": model_id,
        **target.public(),
    }


def write_run_report(checked: dict[str, Any] | None, planned: dict[str, Any] | None, ti) -> dict[str, Any]:
    """Write report.json/report.md for the run, whatever happened; fail if any partition is not committed.

    Runs as a teardown (so also after failures and after the run is marked failed by hand) with
    ``on_failure_fail_dagrun``: a night that did not embed everything never ends green. A run
    that ended before its partitions were planned (inputs refused, or stopped by hand) has no
    plan to report on: it fails saying so."""
    from ray_jobs.output.report import build_report, write_report
    from ray_jobs.output.validate import validate_plan
    from ray_jobs.planning.plan import load_plan

    model_id = (checked or {}).get("model_id")
    if not planned or not model_id:
        stage = "its inputs were checked" if not model_id else "its partitions were planned"
        raise AirflowFailException(
            f"run incomplete: it ended before {stage} (check_inputs or plan failed, or the run was stopped); "
            "nothing was embedded. See check_inputs' and plan's logs; trigger again once fixed."
        )
    max_reject_rate = config_of(checked).acceptance.max_reject_rate
    catalog = ti.xcom_pull(task_ids="catalog", key="return_value", default=None)
    plan = load_plan(planned["plan_uri"])
    validation = validate_plan(plan, model_id, max_reject_rate=max_reject_rate)
    report = build_report(plan, validation, wall_s=time.time() - planned["started_at"], catalog=catalog)
    json_uri, md_uri = write_report(report)
    print(report.to_markdown())
    if not validation.ok:
        failed = ", ".join(f"{c.index:05d}" for c in validation.failed)
        raise AirflowFailException(
            f"run incomplete: {len(validation.failed)} of {len(plan.partitions)} partitions not committed or "
            f"not valid ({failed}); report: {md_uri}. Clear the failed tasks or trigger again to resume."
        )
    if catalog is None:
        raise AirflowFailException(f"the catalog was not updated for this run; report: {md_uri}")
    return {"summary": report.summary(), "report_json": json_uri, "report_md": md_uri}
