"""
### Nightly multimodal embeddings

Embeds every row of an (image, text) manifest with the twin-tower model split into pipeline
stages on a Ray cluster, validates that every input row is accounted for, and registers the
result as one snapshot of the Iceberg table `embeddings.<dataset>__<model_id>__<output_key>`.

**Flow:** check inputs → plan (Parquet footers only) → cluster up → one deferrable Ray job per
partition → validate → Iceberg catalog (+ asset event) → report → cluster down (always).

**Nightly runs embed only what changed:** the plan keeps the partitions of unchanged manifest
files, embeds new and rewritten row groups, and the night's snapshot removes the rows of
deleted or rewritten files. Clearing a failed run resumes it.

**Trigger with params** to run another manifest, model, backend or stage layout;
`redo_partitions` / `redo_rejects` embed chosen committed work again.

Outputs: `{output_uri}/embeddings/model=…/out=…/work=…/`, the plan and the report under
`{output_uri}/runs/{run_id}/`. Defaults: `include/multimodal_embeddings.defaults.yaml`
(override with `EMB_*` environment variables).
"""

from __future__ import annotations

import datetime as dt

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import Asset, dag, task

from airflow_ray.operators.ray_cluster import RayClusterSetupOperator, RayClusterTeardownOperator
from airflow_ray.operators.ray_job import RayJobOperator
from embedding_run.catalog_task import RegisterCatalogOperator
from embedding_run.config import build_params
from embedding_run.deadline import deadline_alert
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
    # the deployment's finish_by (UTC): a run still going then is reported late (it goes on)
    deadline=deadline_alert(CONFIG["deployment"]),
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
        backend_config=config,  # the token and the dashboard address come from the backend, not the handle
        poll_interval="{{ params.poll_interval_s }}",
        max_in_flight=slots["max_in_flight"],
        timeout_s="{{ params.embed_timeout_s }}",
        # a backstop behind the trigger's own deadline (which stops the job and names the partition)
        execution_timeout=dt.timedelta(seconds=int(CONFIG["params"]["embed_timeout_s"]) + 900),
        # At most this many partitions of a run are deferred or running at once (a deferred one
        # holds a trigger); the rest wait `scheduled`, holding nothing, and start in map-index
        # order. Half of one triggerer's default capacity (1,000): a run never fills it with
        # gate waits while the job triggers of admitted partitions wait to be assigned.
        max_active_tis_per_dagrun=512,
        map_index_template="{{ task.job_label }}",  # "partition 17 · 1,000,000 rows"
    ).expand_kwargs(jobs(planned))
    validated = validate(planned, checked)
    # registers the files (the table's Asset event) and reports the run's OpenLineage facets
    cataloged = RegisterCatalogOperator(
        task_id="catalog", checked=checked, planned=planned, validated=validated, table=EMBEDDINGS_TABLE
    )
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
