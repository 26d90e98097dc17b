"""Cluster backends by name: ``local`` (embedded default), ``kuberay`` (production), ``existing``."""

from __future__ import annotations

from typing import Any

BACKENDS = ("local", "kuberay", "existing")


def get_backend(name: str, config: dict[str, Any] | None = None):
    config = dict(config or {})
    if name == "local":
        from airflow_ray.backends.local import LocalRayBackend

        return LocalRayBackend(**config)
    if name == "kuberay":
        from airflow_ray.backends.kuberay import KubeRayBackend

        return KubeRayBackend.from_config(config)
    if name == "existing":
        from airflow_ray.backends.existing import ExistingClusterBackend

        return ExistingClusterBackend(**config)
    raise ValueError(f"unknown cluster backend {name!r}; choose one of {BACKENDS}")
