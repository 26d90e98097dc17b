"""``existing``: a cluster someone else runs; the dashboard address and token come from a connection.

A run may only name a connection the deployment lists (``conn_ids`` in
:meth:`ExistingClusterBackend.settings_from`), and the connection must be of type
``ray_dashboard``: its password is sent as a bearer token to its host, so a connection made
for anything else (a database, a cloud account) is refused before a single request is made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from airflow_ray.backends.base import ClusterBackend, check_dashboard_url, narrowed
from airflow_ray.cluster import ClusterHandle
from airflow_ray.errors import ClusterError
from airflow_ray.provider_info import CONN_TYPE


@dataclass(frozen=True)
class ExistingClusterBackend(ClusterBackend):
    conn_id: str = "ray_default"
    name: str = "existing"
    deletes_cluster: ClassVar[bool] = False

    @classmethod
    def settings_from(cls, choices: Mapping[str, Any], deployment: Mapping[str, Any]) -> dict[str, Any]:
        """*deployment*: ``conn_ids``, the connections a run may name (the first is the default);
        *choices*: ``conn_id``."""
        unknown = sorted(set(deployment) - {"conn_ids"})
        if unknown:
            raise ValueError(f"unknown existing backend setting(s) {unknown}; known: ['conn_ids']")
        conn_id = narrowed(choices.get("conn_id") or None, deployment.get("conn_ids"), "connection")
        return {"conn_id": conn_id} if conn_id else {}

    def capacity_nodes(self, handle: ClusterHandle) -> list[dict[str, float]]:
        """The live cluster's alive nodes (the Ray state API)."""
        from airflow_ray.capacity import live_nodes

        return live_nodes(*self.credentials(handle))

    def _hook(self):
        from airflow_ray.hooks.ray_jobs import RayJobsHook

        hook = RayJobsHook(self.conn_id)
        conn_type = hook.get_connection(self.conn_id).conn_type
        if conn_type != CONN_TYPE:
            raise ClusterError(
                f"connection {self.conn_id!r} is of type {conn_type!r}, not {CONN_TYPE!r}: "
                "its password is not sent to its host as a Ray token"
            )
        return hook

    def up(self, cluster_name: str) -> ClusterHandle:
        hook = self._hook()
        with hook.get_client() as client:
            client.version()  # reachable, and the token (if any) is accepted
        return ClusterHandle(
            backend=self.name, name=cluster_name, dashboard_url=hook.get_address(), details={"conn_id": self.conn_id}
        )

    def credentials(self, handle: ClusterHandle) -> tuple[str, str | None]:
        """The deployment's connection (``conn_id``, of type ``ray_dashboard``): its address,
        which the handle must name, and its password."""
        hook = self._hook()
        return check_dashboard_url(handle, hook.get_address()), hook.get_token()

    def handle_for(self, cluster_name: str) -> ClusterHandle:
        return ClusterHandle(backend=self.name, name=cluster_name, dashboard_url="", details={"conn_id": self.conn_id})

    def down(self, handle: ClusterHandle) -> None:
        """Not ours to delete (the teardown operator stops the run's leftover jobs on it)."""
