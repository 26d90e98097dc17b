"""Refuse to submit to a Ray cluster whose version the Jobs API client does not support.

The Ray Jobs REST API and the job's own driver are only guaranteed compatible within one Ray
minor release: the cluster must run the same ``major.minor`` as this deployment was built for
(requirements.txt pins it; the Ray image pins the same). A mismatch fails the task with a
message saying which image to use, instead of a confusing error deep inside a job.
"""

from __future__ import annotations

from importlib import metadata

from airflow_ray.errors import RayJobError

#: The Ray release this repository pins (requirements.txt, docker/ray.Dockerfile).
EXPECTED_RAY_VERSION = "2.60.0"


def client_ray_version() -> str:
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        return EXPECTED_RAY_VERSION


def _minor(version: str) -> tuple[int, int]:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise RayJobError(f"cannot read Ray version {version!r}") from None


def check_compatible(cluster_version: str, client_version: str | None = None) -> None:
    client_version = client_version or client_ray_version()
    if _minor(cluster_version) != _minor(client_version):
        raise RayJobError(
            f"the Ray cluster runs Ray {cluster_version} but this Airflow deployment is built for Ray "
            f"{client_version}; the Jobs API is only supported within one minor release. Use a Ray image "
            f"built from docker/ray.Dockerfile (RAY_VERSION={client_version}) or align requirements.txt."
        )
