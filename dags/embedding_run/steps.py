"""What the nightly DAG's Python tasks do, kept out of the DAG file so it stays wiring only.

Each function takes the run's params and returns JSON-serialisable results for XCom
(URIs, ids, counts: never row data). The data plane (``ray_jobs``) is imported inside the
functions, at task run time.
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

_RUN_ID_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def plan_run_id(airflow_run_id: str) -> str:
    return _RUN_ID_SAFE.sub("_", airflow_run_id).strip("_")


def _checked(params: dict[str, Any], deployment: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's params checked again against the deployment as it is now (a run created
    before the deployment narrowed its lists is refused, naming the field)."""
    from airflow.sdk.exceptions import ParamValidationError

    from embedding_run.config import validated_params

    try:
        return validated_params(params, deployment)
    except ParamValidationError as exc:
        raise AirflowFailException(str(exc)) from None


def kuberay_config(kuberay: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The KubeRay backend's settings: the deployment's, narrowed by the form's choices."""
    cfg = {k: v for k, v in kuberay.items() if k != "images" and v is not None}
    cfg["image"] = params.get("kuberay_image") or kuberay["images"][0]
    for group in ("cpu_workers", "gpu_workers"):
        g = dict(kuberay[group])
        chosen = params.get(f"kuberay_{group}_max")
        if chosen is not None:
            g["max_replicas"] = min(int(chosen), int(g["max_replicas"]))
            g["min_replicas"] = min(int(g.get("min_replicas", 0)), g["max_replicas"])
        cfg[group] = g
    return cfg


def backend_config(params: dict[str, Any], deployment: dict[str, Any] | None = None) -> dict[str, Any]:
    """The chosen backend's settings: infrastructure from the deployment, choices from the form."""
    from embedding_run.config import load_defaults

    if deployment is None:
        deployment = load_defaults()["deployment"]
    params = _checked(params, deployment)
    backend = params["backend"]
    if backend == "local":
        return {"num_cpus": int(params["local_num_cpus"])}
    if backend == "existing":
        return {"conn_id": params["existing_conn_id"]}
    return kuberay_config(deployment["kuberay"], params)


def catalog_target(params: dict[str, Any]):
    """The run's Iceberg catalog (:class:`~embedding_run.catalog_connection.CatalogTarget`)."""
    from embedding_run.catalog_connection import CatalogConnectionError, resolve_catalog

    try:
        return resolve_catalog(params.get("catalog_conn_id"), params["output_uri"])
    except CatalogConnectionError as exc:
        raise AirflowFailException(str(exc)) from None


def _fail(exc: Exception) -> AirflowFailException:
    return AirflowFailException(str(exc))


def check_inputs(params: dict[str, Any]) -> dict[str, Any]:
    """Manifest readable and schema-valid, model present, stage layout fits, output writable.
    Any problem fails the task at once (no retry, no cluster)."""
    from ray_jobs import storage
    from ray_jobs.errors import JobInputError
    from ray_jobs.job.footprint import job_footprint
    from ray_jobs.model.checkpoint import open_checkpoint
    from ray_jobs.model.stage_spec import StageResources
    from ray_jobs.model.staged import build_layout
    from ray_jobs.planning.manifest import read_manifest

    params = _checked(params)
    catalog = catalog_target(params)  # the connection exists and is usable, before any cluster starts
    try:
        if params.get("partition_rows") and params.get("partition_bytes"):
            raise JobInputError("params: give partition_rows or partition_bytes, not both")
        files = read_manifest(params["manifest_uri"])
        ckpt = open_checkpoint(params["model_uri"])  # twin tower or a Hugging Face dual encoder, as saved
        lo, _, hi = str(params["stage_pool"]).partition("-")
        defaults = StageResources(
            float(params["stage_num_cpus"]), float(params["stage_num_gpus"]), int(lo), int(hi or lo)
        )
        layout = build_layout(
            ckpt,
            num_stages=None if params["stages"] else int(params["num_stages"]),
            spec=params["stages"] or None,
            defaults=defaults,
        )
        probe = f"{params['output_uri'].rstrip('/')}/_write_probe"
        try:
            storage.write_text(probe, "ok")
            storage.remove_tree(probe)
        except OSError as exc:
            raise JobInputError(f"params.output_uri {params['output_uri']} is not writable: {exc}") from exc
    except (JobInputError, ValueError) as exc:
        raise _fail(exc) from None
    return {
        "files": len(files),
        "rows": sum(f.rows for f in files),
        "model_id": ckpt.model_id,  # metadata only, once per run; every job gets it as --model-id
        "model_format": ckpt.format,
        "embed_dim": ckpt.embed_dim,
        "stages": layout.spec(),
        "footprint": job_footprint(
            ((s.resources.num_cpus, s.resources.num_gpus, s.resources.min_pool) for s in layout.stages),
            preprocess_cpus=float(params["preprocess_cpus"]),
            preprocess_min=int(str(params["preprocess_pool"]).partition("-")[0]),
        ).to_dict(),
        "catalog_uri": catalog.redacted_uri,
    }


def partition_capacity(params: dict[str, Any], cluster: dict[str, Any], footprint: dict[str, Any]) -> dict[str, Any]:
    """How many partitions run at once: ``max_partitions_in_flight``, or what the cluster holds."""
    from airflow_ray.capacity import live_nodes, max_in_flight, nodes_from_raycluster
    from airflow_ray.cluster import ClusterHandle
    from airflow_ray.errors import ClusterError

    handle = ClusterHandle.from_dict(cluster)
    try:
        if handle.backend == "kuberay":
            from airflow_ray.backends import get_backend

            nodes = nodes_from_raycluster(get_backend("kuberay", backend_config(params)).render(handle.name))
        else:
            nodes = live_nodes(handle)
        result = max_in_flight(footprint, nodes, params.get("max_partitions_in_flight"))
    except ClusterError as exc:
        raise _fail(exc) from None
    print(
        f"capacity: one job holds {result['job_footprint']}; the cluster ({result['nodes']} nodes, "
        f"{result['cluster_total']}) fits {result['cluster_fits']} at once; "
        f"max partitions in flight = {result['max_in_flight']}"
        + (" (requested)" if result["requested"] else " (computed)")
    )
    return result


#: form param -> `python -m ray_jobs embed` flag; None values are left out (the job's default)
EMBED_FLAGS = (
    ("model_uri", "--model"),
    ("batch_size", "--batch-size"),
    ("stage_num_cpus", "--stage-num-cpus"),
    ("stage_num_gpus", "--stage-num-gpus"),
    ("stage_pool", "--stage-pool"),
    ("preprocess_cpus", "--preprocess-cpus"),
    ("preprocess_pool", "--preprocess-pool"),
    ("fetch_threads", "--fetch-threads"),
    ("rows_per_file", "--rows-per-file"),
    ("max_image_pixels", "--max-image-pixels"),
    ("max_object_bytes", "--max-object-bytes"),
    ("admission_timeout_s", "--admission-timeout-s"),
    ("dtype", "--dtype"),
)


def embed_argv(
    params: dict[str, Any],
    plan_uri: str,
    partition: int,
    python: str,
    model_id: str | None = None,
    stages: str | None = None,
) -> list[str]:
    """The job's argv from validated values only: each value one ``--flag=value`` element, so
    no value is ever read as a flag of its own or split by a shell. *model_id* and *stages*
    (the resolved stage spec) are the ones ``check_inputs`` computed for the run: the job then
    reads no checkpoint metadata for its id and builds no tower to balance its stages (that
    imports torch and transformers: seconds of every job's driver start)."""
    argv = [python, "-m", "ray_jobs", "embed", f"--plan={plan_uri}", f"--partition={int(partition)}"]
    if model_id is not None:
        argv.append(f"--model-id={model_id}")
    for name, flag in EMBED_FLAGS:
        value = params.get(name)
        if value is not None:
            argv.append(f"{flag}={value}")
    spec = stages or params.get("stages")
    if spec:
        argv.append(f"--stages={spec}")
    else:
        argv.append(f"--num-stages={int(params['num_stages'])}")
    return argv


def embed_command(params: dict[str, Any], plan_uri: str, partition: int, python: str, **resolved: str | None) -> str:
    """The Ray job entrypoint (Ray runs it through a shell): :func:`embed_argv`, quoted by shlex;
    *resolved*: its ``model_id`` and ``stages``."""
    return shlex.join(embed_argv(params, plan_uri, partition, python, **resolved))


def plan_partitions(
    params: dict[str, Any], airflow_run_id: str, model_id: str, stages: str | None = None
) -> dict[str, Any]:
    """Write the plan; return one job per partition that is not committed yet (resume).
    *stages*: the stage spec ``check_inputs`` resolved, passed to every job as ``--stages``."""
    params = _checked(params)
    from ray_jobs.contract import partition_dir
    from ray_jobs.errors import JobInputError
    from ray_jobs.output.sink import committed_marker
    from ray_jobs.planning.plan import PlanSettings, run_plan

    try:
        settings = PlanSettings(
            partition_rows=None if params.get("partition_bytes") else params.get("partition_rows"),
            partition_bytes=params.get("partition_bytes"),
            max_partitions=int(params["max_partitions"]),
        )
        result = run_plan(
            params["manifest_uri"],
            params["output_uri"],
            settings,
            run_id=plan_run_id(airflow_run_id),
            model_uri=params["model_uri"],
        )
    except JobInputError as exc:
        raise _fail(exc) from None
    plan = result.plan
    todo = [
        p.index
        for p in plan.partitions
        if committed_marker(partition_dir(plan.output_uri, model_id, plan.plan_id, p.index), model_id) is None
    ]
    local = params["backend"] == "local"
    python = sys.executable if local else "python"
    runtime_env: dict[str, Any] = {}
    if local:
        from embedding_run.runtime_env import working_tree_runtime_env

        runtime_env = working_tree_runtime_env()
    from ray_jobs.job.footprint import DEFAULT_DRIVER_CPUS

    jobs = [
        {
            "partition": k,
            "entrypoint": embed_command(params, result.uri, k, python, model_id=model_id, stages=stages),
            "runtime_env": runtime_env,
            "entrypoint_num_cpus": DEFAULT_DRIVER_CPUS,  # counted in the footprint; keeps drivers off a 0-CPU head
        }
        for k in todo
    ]
    return {
        "plan_uri": result.uri,
        "plan_id": plan.plan_id,
        "partitions": len(plan.partitions),
        "todo": todo,
        "jobs": jobs,
        "summary": result.summary().splitlines()[0],
        "started_at": time.time(),
    }


def validate_partitions(params: dict[str, Any], planned: dict[str, Any], model_id: str) -> dict[str, Any]:
    from ray_jobs.output.validate import validate_plan
    from ray_jobs.planning.plan import load_plan

    plan = load_plan(planned["plan_uri"])
    report = validate_plan(plan, model_id, max_reject_rate=float(params["max_reject_rate"]))
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


def register_catalog(params: dict[str, Any], planned: dict[str, Any], model_id: str, airflow_run_id: str):
    """Register the run's files; the result (XCom, Asset event, report) names the catalog
    only by its redacted URI and connection id, never its credentials."""
    from ray_jobs.output.catalog import register_plan
    from ray_jobs.planning.plan import load_plan

    plan = load_plan(planned["plan_uri"])
    target = catalog_target(params)
    result = register_plan(plan, model_id, target.uri, run_id=airflow_run_id, dataset=params.get("dataset"))
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


def write_run_report(
    params: dict[str, Any], planned: dict[str, Any] | None, model_id: str | None, ti
) -> dict[str, Any]:
    """Write report.json/report.md for the run, whatever happened; fail if any partition is not committed.

    Runs as a teardown (so also after failures and after the run is marked failed by hand) with
    ``on_failure_fail_dagrun``: a night that did not embed everything never ends green. A run
    that ended before its partitions were planned (inputs refused, or stopped by hand) has no
    plan to report on: it fails saying so."""
    from ray_jobs.output.report import build_report, write_report
    from ray_jobs.output.validate import validate_plan
    from ray_jobs.planning.plan import load_plan

    if not planned or not model_id:
        stage = "its inputs were checked" if not model_id else "its partitions were planned"
        raise AirflowFailException(
            f"run incomplete: it ended before {stage} (check_inputs or plan failed, or the run was stopped); "
            "nothing was embedded. See check_inputs' and plan's logs; trigger again once fixed."
        )
    max_reject_rate = float(params["max_reject_rate"])
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
