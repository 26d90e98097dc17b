"""The backend interface: bring a cluster up, say where its dashboard is, take it down."""

from __future__ import annotations

from typing import ClassVar, Protocol

from airflow_ray.cluster import ClusterHandle


class ClusterBackend(Protocol):
    name: str
    #: True when :meth:`down` deletes the cluster, and with it every job still on it; False
    #: for a cluster the run only borrows, whose teardown stops the run's leftover jobs instead.
    deletes_cluster: ClassVar[bool]

    def up(self, cluster_name: str) -> ClusterHandle:
        """Create the cluster, or adopt the one this name already made; return when usable."""

    def down(self, handle: ClusterHandle) -> None:
        """Delete the cluster; deleting one that is already gone is success."""
