"""What the tasks of a run pass each other about a cluster: no secret, only references.

:class:`ClusterHandle` travels through XCom and trigger kwargs. It names where the dashboard
is and *where* the auth token lives (a file of the local backend, a Kubernetes Secret made by
KubeRay, or an Airflow connection); the token itself is read only where it is used.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_ray.errors import ClusterError


@dataclass(frozen=True)
class TokenRef:
    """Where a Ray auth token lives. ``kind``: none | file | k8s_secret | connection."""

    kind: str = "none"
    path: str | None = None
    namespace: str | None = None
    name: str | None = None
    key: str = "auth_token"
    conn_id: str | None = None
    kube_config: str | None = None  # k8s_secret: a kubeconfig path instead of the connection's

    def __post_init__(self) -> None:
        if self.kind not in ("none", "file", "k8s_secret", "connection"):
            raise ValueError(f"unknown token reference kind {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TokenRef:
        return cls(**(data or {}))


def resolve_token(ref: TokenRef) -> str | None:
    """Read the token now (blocking I/O: call through :func:`aresolve_token` from async code)."""
    if ref.kind == "none":
        return None
    if ref.kind == "file":
        try:
            with open(ref.path) as fh:
                return fh.read().strip() or None
        except OSError as exc:
            raise ClusterError(f"cannot read the cluster's auth token file {ref.path}: {exc}") from exc
    if ref.kind == "k8s_secret":
        from airflow_ray.hooks.kuberay import KubeRayHook

        hook = KubeRayHook(kubernetes_conn_id=ref.conn_id, config_file=ref.kube_config)
        return hook.read_secret_value(ref.namespace, ref.name, ref.key)
    from airflow_ray.hooks.ray_jobs import RayJobsHook

    return RayJobsHook(ref.conn_id).get_token()


async def aresolve_token(ref: TokenRef) -> str | None:
    return await asyncio.to_thread(resolve_token, ref)


@dataclass(frozen=True)
class ClusterHandle:
    backend: str
    name: str
    dashboard_url: str
    token: TokenRef = field(default_factory=TokenRef)
    #: backend-specific, JSON-serialisable, never secret (pid, namespace, temp dir, ...)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "name": self.name,
            "dashboard_url": self.dashboard_url,
            "token": self.token.to_dict(),
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterHandle:
        return cls(
            backend=data["backend"],
            name=data["name"],
            dashboard_url=data["dashboard_url"],
            token=TokenRef.from_dict(data.get("token")),
            details=dict(data.get("details") or {}),
        )
