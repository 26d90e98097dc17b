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


def manifest_target(config: RunConfig):
    """The catalog of an ``iceberg://`` manifest, from ``manifest_conn_id``, read now (None for
    a Parquet manifest): :class:`~embedding_run.manifest_connection.ManifestTarget`."""
    from embedding_run.catalog_connection import CatalogConnectionError
    from embedding_run.manifest_connection import manifest_target as resolve

    try:
        return resolve(config.catalog.manifest_conn_id, config.sources.manifest_uri)
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
    _check_filesystems(config)
    catalog = catalog_target(config)  # the connection exists and is usable, before any cluster starts
    manifest = manifest_target(config)
    try:
        if config.partitioning.partition_rows and config.partitioning.partition_bytes:
            raise JobInputError("params: give partition_rows or partition_bytes, not both")
        files = read_manifest(config.sources.manifest_uri, catalog=manifest.catalog() if manifest else None)
        _check_image_protocols(files)
        ckpt, decision = _model_layout(config, files)
        layout = decision.layout
        _check_writable(config.sources.output_uri)
    except (JobInputError, ValueError) as exc:
        raise _fail(exc) from None
    identity = _output_identity(config, ckpt.model_id)
    return {
        "output_key": identity.key,
        "config": config.to_dict(),
        "files": len(files),
        "rows": sum(f.rows for f in files),
        "model_id": ckpt.model_id,  # metadata only, once per run; every job gets it as --model-id
        "model_format": ckpt.format,
        "embed_dim": ckpt.embed_dim,
        "stages": layout.spec(),
        "layout": decision.to_dict(),
        "footprint": footprint_of(layout, config.job).to_dict(),
        "catalog_uri": catalog.redacted_uri,
        **(manifest.public() if manifest else {}),
    }


def _check_filesystems(config: RunConfig) -> None:
    """Every URI param's protocol can be opened here: its fsspec package is installed."""
    from embedding_run.filesystems import MissingFilesystem, check_filesystems
    from embedding_run.uri_policy import URI_PARAMS

    try:
        check_filesystems({f"param {name}": getattr(config.sources, name) for name in URI_PARAMS})
    except MissingFilesystem as exc:
        raise _fail(exc) from None


def _check_image_protocols(files) -> None:
    """The image URIs' protocols, sampled from the manifest's first row group, can be opened:
    a missing filesystem package would otherwise reject every such row as unreadable."""
    from embedding_run.filesystems import check_filesystems, image_uri_sample

    first = next((f for f in files if f.rows), None)
    if first is not None:
        sample = image_uri_sample(first.uri)
        check_filesystems({f"image_uri {uri} (manifest file {first.uri})": uri for uri in sample.values()})


def output_key_of(checked: dict[str, Any]) -> str:
    """The output identity ``check_inputs`` computed (recomputed from its config for a run
    whose ``check_inputs`` predates output identities)."""
    if checked.get("output_key"):
        return checked["output_key"]
    from ray_jobs.output.identity import OutputIdentity

    config = config_of(checked)
    return OutputIdentity.of(checked["model_id"], config.stage, config.job).key


def dataset_of(config: RunConfig) -> str:
    from ray_jobs.contract.ids import default_dataset_name

    return config.sources.dataset or default_dataset_name(config.sources.manifest_uri)


def _output_identity(config: RunConfig, model_id: str):
    """The run's output identity, and what it means against the dataset's last night (logged)."""
    from ray_jobs.output.catalog import table_identifier
    from ray_jobs.output.identity import OutputIdentity, change_note, last_output

    identity = OutputIdentity.of(model_id, config.stage, config.job)
    dataset = dataset_of(config)
    print(change_note(identity, last_output(config.sources.output_uri, dataset)))
    print(f"table: {table_identifier(model_id, dataset, identity.key)}")
    return identity


def _model_layout(config: RunConfig, files):
    """The checkpoint (twin tower or a Hugging Face dual encoder, as saved) and its stage layout
    decision, printed with its inputs (``num_stages: auto``: on a seeded sample of the manifest)."""
    from ray_jobs.model.auto_layout import decide_layout
    from ray_jobs.model.checkpoint import open_checkpoint

    s = config.stage
    ckpt = open_checkpoint(config.sources.model_uri)
    shapes = None
    if s.auto and not s.auto_stages:
        from ray_jobs.perf.data_sample import manifest_fragments, measure_shapes, sample_rows

        shapes = measure_shapes(ckpt, sample_rows(manifest_fragments(files)), open_images=False)
    decision = decide_layout(ckpt, s, config.job.batch_size, shapes)
    print("\n".join(decision.lines()))
    return ckpt, decision


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
    """Write the plan (continuing the dataset's last plan: unchanged work is kept); return one
    job per partition whose work is not committed yet (resume), plus the partitions the run's
    ``redo_*`` params name, which are embedded again (``--force``). Every job gets the model id
    and the stage spec ``check_inputs`` resolved."""
    from embedding_run.jobs import partition_jobs, plan_rows
    from ray_jobs.errors import JobInputError
    from ray_jobs.planning.plan import delta_line, run_plan

    config, model_id = config_of(checked), checked["model_id"]
    manifest = manifest_target(config)  # an iceberg:// manifest's catalog: read now, kept in this process
    try:
        result = run_plan(
            config.sources.manifest_uri,
            config.sources.output_uri,
            config.partitioning,
            run_id=plan_run_id(airflow_run_id),
            model_uri=config.sources.model_uri,
            dataset=dataset_of(config),
            manifest_catalog=manifest.catalog() if manifest else None,
        )
    except JobInputError as exc:
        raise _fail(exc) from None
    plan = result.plan
    print(result.summary())
    todo, redo = _work_to_do(plan, model_id, output_key_of(checked), config)
    return {
        "plan_uri": result.uri,
        "plan_id": plan.plan_id,
        "partitions": len(plan.partitions),
        "todo": todo,
        "redo": redo,
        "jobs": partition_jobs(
            config, result.uri, todo, model_id, checked.get("stages"), force=redo, rows=plan_rows(plan)
        ),
        "summary": result.summary().splitlines()[0],
        "delta": delta_line(plan),
        "started_at": time.time(),
    }


def _work_to_do(plan, model_id: str, output_key: str, config: RunConfig) -> tuple[list[int], list[int]]:
    """The partitions to run (not committed, or named by a ``redo_*`` param) and, of those, the
    committed ones to embed again."""
    from concurrent.futures import ThreadPoolExecutor

    from ray_jobs.output.markers import check_planned
    from ray_jobs.output.redo import partitions_to_redo

    with ThreadPoolExecutor(max_workers=max(1, min(32, len(plan.partitions)))) as pool:
        checks = list(pool.map(lambda p: check_planned(plan, p.index, model_id, output_key), plan.partitions))
    markers = {
        p.index: marker for p, (_, marker, problems) in zip(plan.partitions, checks, strict=True) if not problems
    }
    orch = config.orchestration
    try:
        redo = partitions_to_redo(plan, markers, orch.redo_partitions, orch.redo_rejects)
    except ValueError as exc:
        raise _fail(exc) from None
    if redo:
        print(f"redo: embedding {len(redo)} committed partition(s) again: {redo[:20]}")
    todo = sorted({p.index for p in plan.partitions if p.index not in markers} | set(redo))
    return todo, redo


def validate_partitions(checked: dict[str, Any], planned: dict[str, Any]) -> dict[str, Any]:
    from ray_jobs.output.validate import validate_plan
    from ray_jobs.planning.plan import load_plan

    config = config_of(checked)
    plan = load_plan(planned["plan_uri"])
    report = validate_plan(
        plan, checked["model_id"], max_reject_rate=config.acceptance.max_reject_rate, output_key=output_key_of(checked)
    )
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
    from ray_jobs.output.identity import OutputIdentity, record_output

    dataset = dataset_of(config)
    result = register_plan(
        plan, model_id, target.uri, run_id=airflow_run_id, dataset=dataset, output_key=output_key_of(checked)
    )
    print(result.summary())
    identity = OutputIdentity.of(model_id, config.stage, config.job)
    record_output(config.sources.output_uri, dataset, identity, result.table, airflow_run_id)
    return {
        **result.as_dict(),
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
    import json

    from embedding_run.metrics import emit_run_metrics
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
    validation = validate_plan(
        plan, model_id, max_reject_rate=max_reject_rate, output_key=output_key_of(checked), check_duplicates=False
    )
    report = build_report(
        plan,
        validation,
        wall_s=time.time() - planned["started_at"],
        catalog=catalog,
        embedded=planned.get("todo"),
        layout=(checked or {}).get("layout"),
    )
    json_uri, md_uri = write_report(report)
    print(report.to_markdown())
    if report.night:
        print(f"night: {report.night_line()}")
    # StatsD/OpenTelemetry, by Airflow's [metrics] config; only the partitions this run embedded
    emit_run_metrics(json.loads(report.to_json()), embedded=planned.get("todo"))
    if not validation.ok:
        failed = ", ".join(f"{c.index:05d}" for c in validation.failed)
        raise AirflowFailException(
            f"run incomplete: {len(validation.failed)} of {len(plan.partitions)} partitions not committed or "
            f"not valid ({failed}); report: {md_uri}. Clear the failed tasks or trigger again to resume."
        )
    if catalog is None:
        raise AirflowFailException(f"the catalog was not updated for this run; report: {md_uri}")
    return {
        "summary": report.summary(),
        "night": report.night_line(),
        "report_json": json_uri,
        "report_md": md_uri,
    }
