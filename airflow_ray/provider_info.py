"""What Airflow's providers manager learns of this provider (the ``apache_airflow_provider``
entry point): its connection type, with the form the UI shows for it, and its extra link."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "multimodal-embeddings-pipeline"


def _version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # imported from a checkout that was not installed
        return "0.0.0"


def get_provider_info() -> dict:
    return {
        "package-name": DISTRIBUTION,
        "name": "Ray",
        "description": "Ray clusters (local, KubeRay, existing) and deferrable Ray jobs for Airflow 3.",
        "versions": [_version()],
        "connection-types": [
            {"connection-type": "ray_dashboard", "hook-class-name": "airflow_ray.hooks.ray_jobs.RayJobsHook"}
        ],
        "extra-links": ["airflow_ray.links.RayJobLink"],
    }
