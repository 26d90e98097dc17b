"""Cluster backends by name: ``local`` (the default: a head on this machine), ``kuberay``
(a RayCluster per run on Kubernetes), ``existing`` (a cluster someone else runs).

Callers never branch on a backend's name: what differs between backends is a method of
:class:`~airflow_ray.backends.base.ClusterBackend`, reached through the functions below.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_ray.backends.base import ClusterBackend
    from airflow_ray.cluster import ClusterHandle

#: name -> the class implementing it (imported when first used)
_CLASSES = {
    "local": "airflow_ray.backends.local.LocalRayBackend",
    "kuberay": "airflow_ray.backends.kuberay.KubeRayBackend",
    "existing": "airflow_ray.backends.existing.ExistingClusterBackend",
}
BACKENDS = tuple(_CLASSES)


def backend_class(name: str) -> type[ClusterBackend]:
    try:
        module, _, attr = _CLASSES[name].rpartition(".")
    except KeyError:
        raise ValueError(f"unknown cluster backend {name!r}; choose one of {BACKENDS}") from None
    return getattr(importlib.import_module(module), attr)


def get_backend(name: str, config: Mapping[str, Any] | None = None) -> ClusterBackend:
    """The backend *name* with the settings *config* (:func:`backend_settings` makes one)."""
    return backend_class(name).from_config(dict(config or {}))


def backend_settings(name: str, choices: Mapping[str, Any], deployment: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of backend *name*: *deployment*'s (that backend's own section), narrowed
    by a run's *choices*; ValueError names a choice the deployment does not allow. The keys
    are each backend's ``settings_from``'s."""
    return backend_class(name).settings_from(choices, deployment)


def cluster_nodes(handle: ClusterHandle | Mapping[str, Any], config: Mapping[str, Any] | None = None) -> list:
    """The nodes the cluster of *handle* can run jobs on (``{"CPU": n, "GPU": n}`` each), asked
    of its backend with the settings *config* it was set up with: what
    :func:`airflow_ray.capacity.max_in_flight` divides by a job's footprint."""
    from airflow_ray.cluster import ClusterHandle

    if not isinstance(handle, ClusterHandle):
        handle = ClusterHandle.from_dict(dict(handle))
    return get_backend(handle.backend, config).capacity_nodes(handle)


def credentials(
    handle: ClusterHandle | Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> tuple[str, str | None]:
    """``(dashboard address, token)`` of the cluster of *handle*, from its backend with the
    deployment's settings *config*: never from the handle, whose ``dashboard_url`` must be the
    address the backend produces (:class:`~airflow_ray.errors.ClusterError` otherwise). Blocking I/O."""
    from airflow_ray.cluster import ClusterHandle

    if not isinstance(handle, ClusterHandle):
        handle = ClusterHandle.from_dict(dict(handle))
    return get_backend(handle.backend, config).credentials(handle)


#: How long the triggerer reuses a cluster's looked-up address and token. Every trigger needs
#: them, and each lookup is a round trip through the triggerer's supervisor to the secrets
#: backend: at a thousand partitions one lookup per cluster a minute instead of one per trigger.
CREDENTIALS_TTL_S = 60.0
_looked_up: dict[str, tuple[float, tuple[str, str | None]]] = {}


def forget_credentials() -> None:
    """Drop every reused answer of :func:`acredentials` (the next lookup asks the backend)."""
    _looked_up.clear()


async def acredentials(
    handle: ClusterHandle | Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> tuple[str, str | None]:
    """:func:`credentials` from async code (a trigger), off the event loop; an answer for the
    same handle and settings is reused for :data:`CREDENTIALS_TTL_S` (a failed lookup is not)."""
    import asyncio
    import json
    import time

    from airflow_ray.cluster import ClusterHandle

    as_dict = handle.to_dict() if isinstance(handle, ClusterHandle) else dict(handle)
    key = json.dumps([as_dict, dict(config or {})], sort_keys=True, default=str)
    now = time.monotonic()
    hit = _looked_up.get(key)
    if hit is not None and now - hit[0] < CREDENTIALS_TTL_S:
        return hit[1]
    answer = await asyncio.to_thread(credentials, handle, config)
    for stale in [k for k, (at, _) in _looked_up.items() if now - at >= CREDENTIALS_TTL_S]:
        del _looked_up[stale]
    _looked_up[key] = (time.monotonic(), answer)
    return answer
