"""``existing``: a cluster someone else runs; the dashboard address and token come from a connection."""

from __future__ import annotations

from dataclasses import dataclass

from ray_embeddings.cluster import ClusterHandle, TokenRef


@dataclass(frozen=True)
class ExistingClusterBackend:
    conn_id: str = "ray_default"
    name: str = "existing"

    def up(self, cluster_name: str) -> ClusterHandle:
        from ray_embeddings.hooks.ray_jobs import RayJobsHook

        hook = RayJobsHook(self.conn_id)
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
        """Not ours to delete."""
