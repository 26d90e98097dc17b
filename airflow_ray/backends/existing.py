"""``existing``: a cluster someone else runs; the dashboard address and token come from a connection.

The form may only name a connection the deployment lists (``deployment.existing_conn_ids``),
and the connection must be of type ``ray_dashboard``: its password is sent as a bearer token
to its host, so a connection made for anything else (a database, a cloud account) is refused
before a single request is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from airflow_ray.cluster import ClusterHandle, TokenRef
from airflow_ray.errors import ClusterError

CONN_TYPE = "ray_dashboard"


@dataclass(frozen=True)
class ExistingClusterBackend:
    conn_id: str = "ray_default"
    name: str = "existing"
    deletes_cluster: ClassVar[bool] = False

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
            backend=self.name,
            name=cluster_name,
            dashboard_url=hook.get_address(),
            token=TokenRef(kind="connection", conn_id=self.conn_id),
            details={"conn_id": self.conn_id},
        )

    def handle_for(self, cluster_name: str) -> ClusterHandle:
        return ClusterHandle(backend=self.name, name=cluster_name, dashboard_url="", details={"conn_id": self.conn_id})

    def down(self, handle: ClusterHandle) -> None:
        """Not ours to delete (the teardown operator stops the run's leftover jobs on it)."""
