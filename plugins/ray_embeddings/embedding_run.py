"""What the nightly DAG's Python tasks do, kept out of the DAG file so it stays wiring only.

Each function takes the run's params and returns JSON-serialisable results for XCom
(URIs, ids, counts: never row data). The data plane (``ray_jobs``) is imported inside the
functions, at task run time.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

_RUN_ID_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def plan_run_id(airflow_run_id: str) -> str:
    return _RUN_ID_SAFE.sub("_", airflow_run_id).strip("_")


def backend_config(params: dict[str, Any]) -> dict[str, Any]:
    backend = params["backend"]
    if backend == "local":
        return {"num_cpus": int(params["local_num_cpus"])}
    if backend == "existing":
        return {"conn_id": params["existing_conn_id"]}
    cfg = {k: v for k, v in dict(params.get("kuberay") or {}).items() if v not in ("", None)}
    return cfg


def catalog_uri(params: dict[str, Any]) -> str:
    if params.get("catalog_uri"):
        return params["catalog_uri"]
    from ray_jobs import storage

    out = params["output_uri"]
    if not storage.is_remote(out):
        return f"sqlite:///{storage.filesystem_for(out)[1]}/iceberg_catalog.db"
    home = os.environ.get("AIRFLOW_HOME", os.path.expanduser("~/airflow"))
    return f"sqlite:///{home}/embeddings_iceberg_catalog.db"


def _fail(exc: Exception) -> AirflowFailException:
    return AirflowFailException(str(exc))


def check_inputs(params: dict[str, Any]) -> dict[str, Any]:
    """Manifest readable and schema-valid, model present, stage layout fits, output writable.
    Any problem fails the task at once (no retry, no cluster)."""
    from ray_jobs import storage
    from ray_jobs.errors import JobInputError
    from ray_jobs.manifest import read_manifest
    from ray_jobs.model.checkpoint import TwinTowerCheckpoint
    from ray_jobs.model.stage_spec import StageResources
    from ray_jobs.model.staged import build_layout

    try:
        if params.get("partition_rows") and params.get("partition_bytes"):
            raise JobInputError("params: give partition_rows or partition_bytes, not both")
        files = read_manifest(params["manifest_uri"])
        ckpt = TwinTowerCheckpoint(params["model_uri"])
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
        "model_id": ckpt.model_id,
        "embed_dim": ckpt.config.embed_dim,
        "stages": layout.spec(),
    }


def embed_command(params: dict[str, Any], plan_uri: str, partition: int, python: str) -> str:
    args = [
        python,
        "-m",
        "ray_jobs",
        "embed",
        "--plan",
        plan_uri,
        "--partition",
        str(partition),
        "--model",
        params["model_uri"],
        "--batch-size",
        str(params["batch_size"]),
        "--stage-num-cpus",
        str(params["stage_num_cpus"]),
        "--stage-num-gpus",
        str(params["stage_num_gpus"]),
        "--stage-pool",
        str(params["stage_pool"]),
    ]
    args += ["--stages", params["stages"]] if params["stages"] else ["--num-stages", str(params["num_stages"])]
    command = shlex.join(args)
    if params.get("embed_extra_args"):
        command += " " + params["embed_extra_args"]
    return command


def plan_partitions(params: dict[str, Any], airflow_run_id: str, model_id: str) -> dict[str, Any]:
    """Write the plan; return one job per partition that is not committed yet (resume)."""
    from ray_jobs.contract import partition_dir
    from ray_jobs.errors import JobInputError
    from ray_jobs.planning import PlanSettings, run_plan
    from ray_jobs.sink import committed_marker

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
        from ray_embeddings.runtime_env import working_tree_runtime_env

        runtime_env = working_tree_runtime_env()
    jobs = [
        {"partition": k, "entrypoint": embed_command(params, result.uri, k, python), "runtime_env": runtime_env}
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
    from ray_jobs.planning import load_plan
    from ray_jobs.validate import validate_plan

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
    from ray_jobs.catalog import register_plan
    from ray_jobs.planning import load_plan

    plan = load_plan(planned["plan_uri"])
    result = register_plan(plan, model_id, catalog_uri(params), run_id=airflow_run_id, dataset=params.get("dataset"))
    print(result.summary())
    return {
        "table": result.table,
        "snapshot_id": result.snapshot_id,
        "rows": result.rows,
        "files": result.files,
        "new_snapshot": result.new_snapshot,
        "plan_id": plan.plan_id,
        "model_id": model_id,
        "catalog_uri": catalog_uri(params),
    }


def write_run_report(planned: dict[str, Any], model_id: str, catalog: dict[str, Any] | None, max_reject_rate: float):
    from ray_jobs.planning import load_plan
    from ray_jobs.report import build_report, write_report
    from ray_jobs.validate import validate_plan

    plan = load_plan(planned["plan_uri"])
    validation = validate_plan(plan, model_id, max_reject_rate=max_reject_rate)
    report = build_report(plan, validation, wall_s=time.time() - planned["started_at"], catalog=catalog)
    json_uri, md_uri = write_report(report)
    print(report.to_markdown())
    return {"summary": report.summary(), "report_json": json_uri, "report_md": md_uri}
