"""What the tasks of a run pass each other about a cluster: no secret, and no say over one.

:class:`ClusterHandle` travels through XCom and trigger kwargs: the backend's name, the
cluster's name, its dashboard address and backend details (pid, temp dir, namespace). It names
no place a token is read from. The token, and the only address it is sent to, come from the
deployment's backend (:meth:`~airflow_ray.backends.base.ClusterBackend.credentials`): a
connection of type ``ray_dashboard`` (``existing``), the local backend's own private
directory, proven ours (``local``), or the Secret KubeRay made for this very cluster in the
deployment's namespace (``kuberay``). A handle whose ``dashboard_url`` is not what the backend
produces for that cluster is refused before any token is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ClusterHandle:
    backend: str
    name: str
    dashboard_url: str
    #: backend-specific, JSON-serialisable, never secret (pid, namespace, temp dir, ...)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "name": self.name,
            "dashboard_url": self.dashboard_url,
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterHandle:
        return cls(
            backend=data["backend"],
            name=data["name"],
            dashboard_url=data["dashboard_url"],
            details=dict(data.get("details") or {}),
        )
