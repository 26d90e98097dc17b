"""
### Nightly multimodal embeddings

Embeds every row of an (image, text) manifest with the twin-tower model split into pipeline
stages on a Ray cluster, validates that every input row is accounted for, and registers the
result as one snapshot of the Iceberg table `embeddings.<dataset>__<model_id>`.

**Flow:** check inputs → plan (Parquet footers only) → cluster up → one deferrable Ray job per
partition → validate → Iceberg catalog (+ asset event) → report → cluster down (always).

**Trigger with params** to run another manifest, model, backend or stage layout. Clearing a
failed run resumes it: partitions already committed are skipped. A second run of the same
manifest and settings re-embeds nothing and adds no rows.

Outputs: `{output_uri}/embeddings/model=…/plan=…/partition=…/`, the plan and the report under
`{output_uri}/runs/{run_id}/`. Defaults: `include/multimodal_embeddings.defaults.yaml`
(override with `EMB_*` environment variables).
"""

from __future__ import annotations

import datetime as dt

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import Asset, dag, task

from airflow_ray.operators.ray_cluster import RayClusterSetupOperator, RayClusterTeardownOperator
from airflow_ray.operators.ray_job import RayJobOperator
from embedding_run.config import build_params
from embedding_run.deployment import load_defaults

CONFIG = load_defaults()
EMBEDDINGS_TABLE = Asset(name="multimodal_embeddings_table", uri="iceberg://embeddings/multimodal")


# The run's steps: each one a task whose body lives in embedding_run.steps (wiring only here).
@task(retries=0)
def check_inputs(params=None) -> dict:
    from embedding_run.steps import check_inputs as run

    return run(params)


@task
def plan(checked: dict, run_id=None) -> dict:
    from embedding_run.steps import plan_partitions

    return plan_partitions(checked, run_id)


@task
def jobs(planned: dict) -> list[dict]:
    return planned["jobs"]


@task(trigger_rule="all_done")  # runs after failed partitions too, and names them
def validate(planned: dict, checked: dict) -> dict:
    from embedding_run.steps import validate_partitions

    return validate_partitions(checked, planned)


@task(outlets=[EMBEDDINGS_TABLE])
def catalog(planned: dict, checked: dict, validated: dict, run_id=None, outlet_events=None):
    from embedding_run.steps import register_catalog

    result = register_catalog(checked, planned, run_id)
    outlet_events[EMBEDDINGS_TABLE].extra = {**result, **validated, "run_id": run_id}
    return result


@task  # its verdict raises AirflowFailException (no retry); storage errors are retried
def report(planned: dict | None, checked: dict | None, ti=None) -> dict:
    from embedding_run.steps import write_run_report

    return write_run_report(checked, planned, ti)


@task(multiple_outputs=True)
def capacity(cluster: dict, checked: dict, backend_cfg: dict) -> dict:
    from embedding_run.steps import partition_capacity

    return partition_capacity(checked, cluster, backend_cfg)


@task
def cluster_config(checked: dict) -> dict:
    from embedding_run.steps import backend_config, config_of

    return backend_config(config_of(checked))


@dag(
    dag_id="multimodal_embeddings",
    schedule=CONFIG["schedule"],
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["embeddings", "ray", "iceberg", "nightly"],
    params=build_params(CONFIG),
    doc_md=__doc__,
    default_args={
        "owner": CONFIG["owner"],
        "retries": CONFIG["retries"],
        "retry_delay": dt.timedelta(seconds=CONFIG["retry_delay_s"]),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(minutes=30),
        "executor_config": CONFIG["executor_config"],  # KubernetesExecutor: the dedicated service account
    },
)
def multimodal_embeddings():
    # The run's first setup, succeeding at once: the report and cluster_down teardowns name it
    # with cluster_up, so they run whatever happens (a teardown runs once any of its setups
    # succeeded). Without it a run marked failed before cluster_up ran, or while it ran, skipped
    # both teardowns: the run then ended green and a half-started cluster was left behind.
    started = EmptyOperator(task_id="run_started")
    checked = check_inputs()
    planned = plan(checked)
    config = cluster_config(checked)
    cluster_up = RayClusterSetupOperator(task_id="cluster_up", backend="{{ params.backend }}", backend_config=config)
    slots = capacity(cluster_up.output, checked, config)
    embed = RayJobOperator.partial(
        task_id="embed",
        cluster=cluster_up.output,
        poll_interval="{{ params.poll_interval_s }}",
        max_in_flight=slots["max_in_flight"],
        timeout_s="{{ params.embed_timeout_s }}",
        # a backstop behind the trigger's own deadline (which stops the job and names the partition)
        execution_timeout=dt.timedelta(seconds=int(CONFIG["params"]["embed_timeout_s"]) + 900),
        max_active_tis_per_dagrun=1024,
    ).expand_kwargs(jobs(planned))
    validated = validate(planned, checked)
    cataloged = catalog(planned, checked, validated)
    # The report is a teardown that fails the run when anything is missing: it runs after
    # failures and after a run is marked failed by hand, and a night that did not embed every
    # partition never ends green.
    reported = report(planned, checked).as_teardown(setups=[started, cluster_up], on_failure_fail_dagrun=True)
    cluster_down = RayClusterTeardownOperator(
        task_id="cluster_down", cluster=cluster_up.output, backend="{{ params.backend }}", backend_config=config
    )

    started.as_setup() >> checked
    planned >> config >> cluster_up >> slots >> embed >> validated
    cataloged >> reported >> cluster_down.as_teardown(setups=[started, cluster_up])


multimodal_embeddings()
