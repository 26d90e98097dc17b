"""The partitions' Ray jobs: each one's entrypoint, derived from the run's typed config.

Every value reaches the job as one ``--flag=value`` argv element, from the settings' own
declarations (:func:`ray_jobs.config.declare.to_argv`), so no value is read as a flag of its
own or split by a shell. ``python -m ray_jobs embed`` parses them with options derived from
the same declarations."""

from __future__ import annotations

import dataclasses
import shlex

from embedding_run.config import RunConfig
from ray_jobs.config.declare import to_argv
from ray_jobs.job.footprint import DRIVER_ENTRYPOINT_CPUS


def embed_argv(
    config: RunConfig,
    plan_uri: str,
    partition: int,
    python: str,
    model_id: str | None = None,
    stages: str | None = None,
    force: bool = False,
) -> list[str]:
    """The job's argv. *model_id* and *stages* (the resolved stage spec) are the ones
    ``check_inputs`` computed for the run: the job then reads no checkpoint metadata for its id
    and builds no tower to balance its stages (that imports torch and transformers: seconds of
    every job's driver start)."""
    argv = [python, "-m", "ray_jobs", "embed", f"--plan={plan_uri}", f"--partition={int(partition)}"]
    if model_id is not None:
        argv.append(f"--model-id={model_id}")
    argv.append(f"--model={config.sources.model_uri}")
    if force:  # a redo: embed again and replace the committed marker atomically
        argv.append("--force")
    if stages and config.stage.auto:  # num_stages auto, as check_inputs resolved it: the job may rebalance it
        return argv + to_argv(config.stage) + [f"--auto-stages={stages}"] + to_argv(config.job)
    stage = dataclasses.replace(config.stage, stages=stages) if stages else config.stage
    return argv + to_argv(stage) + to_argv(config.job)


def embed_command(config: RunConfig, plan_uri: str, partition: int, python: str, **resolved: str | bool | None) -> str:
    """The Ray job entrypoint (Ray runs it through a shell): :func:`embed_argv`, quoted by shlex;
    *resolved*: its ``model_id``, ``stages`` and ``force``."""
    return shlex.join(embed_argv(config, plan_uri, partition, python, **resolved))


def partition_label(partition: int, rows: int | None) -> str:
    """What a mapped embed task is called in the UI: ``partition 17 · 1,000,000 rows``."""
    return f"partition {partition}" + (f" · {rows:,} rows" if rows is not None else "")


def plan_rows(plan) -> dict[int, int]:
    """Each planned partition's row count, by index."""
    return {p.index: p.rows for p in plan.partitions}


def partition_jobs(
    config: RunConfig,
    plan_uri: str,
    partitions: list[int],
    model_id: str,
    stages: str | None,
    force: list[int] | tuple[int, ...] = (),
    rows: dict[int, int] | None = None,
) -> list[dict]:
    """One Ray job submission per partition (the mapped task's kwargs); the partitions in
    *force* are embedded again even though committed. *rows*: each partition's planned rows,
    for its label (:func:`partition_label`)."""
    import sys

    from airflow_ray.backends import backend_class

    local = backend_class(config.cluster.backend).on_this_host  # its workers run this machine's Python
    python = sys.executable if local else "python"
    runtime_env: dict = {}
    if local:
        from embedding_run.runtime_env import working_tree_runtime_env

        runtime_env = working_tree_runtime_env()
    redo = set(force)
    return [
        {
            "partition": k,
            "entrypoint": embed_command(config, plan_uri, k, python, model_id=model_id, stages=stages, force=k in redo),
            "runtime_env": runtime_env,
            # keeps drivers off a 0-CPU head; the rest of the driver's share is in its reservation
            "entrypoint_num_cpus": DRIVER_ENTRYPOINT_CPUS,
            "job_label": partition_label(k, (rows or {}).get(k)),
        }
        for k in partitions
    ]
