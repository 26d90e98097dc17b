"""The backend interface: bring a cluster up, say where its dashboard is, take it down."""

from __future__ import annotations

from typing import Protocol

from ray_embeddings.cluster import ClusterHandle


class ClusterBackend(Protocol):
    name: str

    def up(self, cluster_name: str) -> ClusterHandle:
        """Create the cluster, or adopt the one this name already made; return when usable."""

    def down(self, handle: ClusterHandle) -> None:
        """Delete the cluster; deleting one that is already gone is success."""
