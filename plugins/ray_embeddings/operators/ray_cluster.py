"""Bring a Ray cluster up (setup) and take it down (teardown) for one DAG run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from ray_embeddings.backends import get_backend
from ray_embeddings.cluster import ClusterHandle
from ray_embeddings.naming import cluster_name


class RayClusterSetupOperator(BaseOperator):
    """Create (or adopt) the run's cluster; returns the :class:`ClusterHandle` as a dict (no secrets).

    The cluster name derives from ``(dag_id, run_id)``, so a retried setup adopts the cluster
    it already made. For ``kuberay`` the wait for ``HeadPodReady`` is deferred to a trigger.
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
        if self.backend == "kuberay":
            return backend.up_deferrable(self, name)
        handle = backend.up(name)
        self.log.info("Ray cluster %s is up (%s backend): %s", name, self.backend, handle.dashboard_url)
        return handle.to_dict()

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
    already gone is success."""

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
        backend.down(handle)
        self.log.info("Ray cluster %s is down", handle.name)
