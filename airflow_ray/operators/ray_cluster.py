"""Bring a Ray cluster up (setup) and take it down (teardown) for one DAG run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
from airflow.sdk import BaseOperator

from airflow_ray.backends import get_backend
from airflow_ray.cluster import ClusterHandle
from airflow_ray.errors import ClusterError, RayJobsApiError
from airflow_ray.hooks.ray_jobs import RayJobsClient
from airflow_ray.naming import cluster_name
from airflow_ray.submission import META_PARTITION, stop_jobs_of_run


class RayClusterSetupOperator(BaseOperator):
    """Create (or adopt) the run's cluster; returns the :class:`ClusterHandle` as a dict (no secrets).

    The cluster name derives from ``(dag_id, run_id)``, so a retried setup adopts the cluster
    it already made. A backend whose start is slow defers the wait to a trigger (``kuberay``:
    ``HeadPodReady``); the others block until the cluster answers.
    """

    template_fields: Sequence[str] = ("backend", "backend_config")
    ui_color = "#d9f2e6"

    def __init__(self, *, backend: str = "local", backend_config: dict[str, Any] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.backend = backend
        self.backend_config = backend_config or {}
        self._starting: str | None = None

    def execute(self, context) -> dict[str, Any]:
        ti = context["ti"]
        name = cluster_name(ti.dag_id, ti.run_id)
        backend = get_backend(self.backend, self.backend_config)
        self._starting = name
        return backend.up_deferrable(self, name)

    def execute_complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        backend = get_backend(self.backend, self.backend_config)
        return backend.complete(event)

    def on_kill(self) -> None:
        """Killed while starting (the run marked failed, a timeout): take down what this try
        started, found by its deterministic name; cluster_down does the same once it runs."""
        if self._starting is None:
            return
        try:
            backend = get_backend(self.backend, self.backend_config)
            backend.down(backend.handle_for(self._starting))
            self.log.info("task killed while starting Ray cluster %s: took it down", self._starting)
        except Exception:
            self.log.exception("task killed while starting Ray cluster %s: teardown failed", self._starting)


class RayClusterTeardownOperator(BaseOperator):
    """Delete the run's cluster. Give it the setup's handle; without one (setup failed before
    returning) it finds the cluster by its deterministic name. Deleting a cluster that is
    already gone is success.

    A cluster the run only borrows (``existing``) is not deleted: instead every job of this run
    still PENDING or RUNNING is stopped. By then each job's task has ended, so such a job
    is one whose task ended without stopping it: marked failed in the moment between its
    deferral and the triggerer loading its trigger (Airflow then never runs the trigger, and
    nothing calls ``on_kill``), or sensed by a worker that died. No job outlives its run on a
    shared cluster. If the jobs cannot be listed or stopped the task fails, naming the run.
    """

    template_fields: Sequence[str] = ("cluster", "backend", "backend_config")
    ui_color = "#f7e1e1"

    def __init__(
        self,
        *,
        cluster: dict[str, Any] | None = None,
        backend: str = "local",
        backend_config: dict[str, Any] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.cluster = cluster
        self.backend = backend
        self.backend_config = backend_config or {}

    def execute(self, context) -> None:
        ti = context["ti"]
        backend = get_backend(self.backend, self.backend_config)
        if self.cluster:
            handle = ClusterHandle.from_dict(self.cluster)
        else:
            handle = backend.handle_for(cluster_name(ti.dag_id, ti.run_id))
        if not backend.deletes_cluster:
            self._stop_leftover_jobs(backend, handle, ti.dag_id, ti.run_id)
            return
        backend.down(handle)
        self.log.info("Ray cluster %s is down", handle.name)

    def _stop_leftover_jobs(self, backend, handle: ClusterHandle, dag_id: str, run_id: str) -> None:
        if not handle.dashboard_url:  # no handle from the setup: it failed, no job was submitted
            self.log.info("cluster %s was never set up for this run: no job of it to stop", handle.name)
            return
        try:
            with RayJobsClient(*backend.credentials(handle)) as client:
                stopped = stop_jobs_of_run(client, dag_id, run_id)
        except (httpx.HTTPError, RayJobsApiError) as exc:
            raise ClusterError(
                f"could not list or stop this run's Ray jobs on cluster {handle.name} ({exc}); a job of run "
                f"{run_id!r} may still be running there: `ray job list` shows it by its metadata, `ray job stop` "
                "stops it"
            ) from exc
        for info in stopped:
            meta = info.get("metadata") or {}
            self.log.warning(
                "stopped Ray job %s (partition %s): still %s after its task ended",
                info["submission_id"],
                meta.get(META_PARTITION, "?"),
                info.get("status"),
            )
        self.log.info(
            "cluster %s is not this run's to delete; %d job(s) of this run were left running and are stopped",
            handle.name,
            len(stopped),
        )
