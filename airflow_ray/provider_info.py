"""What Airflow's providers manager learns of this provider (the ``apache_airflow_provider``
entry point): its connection type, with the form the UI shows for it, and its extra link.

The form is declared here (``ui-field-behaviour``), as Airflow 3.2+ reads it: from the
provider info, without importing the hook (a hook's ``get_ui_field_behaviour()`` is the
deprecated way; :class:`~airflow_ray.hooks.ray_jobs.RayJobsHook` keeps one, returning the same).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

#: The distribution that ships this package (pyproject.toml's ``name``): the providers manager
#: requires ``package-name`` to be it. Named, not looked up: a lookup scans every installed
#: distribution, in every process that loads the providers.
DISTRIBUTION = "multimodal-embeddings-pipeline"
CONN_TYPE = "ray_dashboard"
HOOK_NAME = "Ray cluster (dashboard address + auth token)"
#: The ``ray_dashboard`` connection form: the host is the whole dashboard URL (scheme and port
#: included) and the password the cluster's auth token; nothing else is read from the form.
#: (A connection defined outside the form may still give ``schema`` and ``port``: they are honoured.)
FIELD_BEHAVIOUR = {
    "hidden_fields": ["schema", "login", "port", "extra"],
    "relabeling": {"host": "Dashboard URL", "password": "Auth token"},
    "placeholders": {
        "host": "http://ray-head-svc.ray.svc.cluster.local:8265",
        "password": "the cluster's Ray auth token (empty: the cluster does not use token auth)",
    },
}


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:  # imported from a checkout that was not installed
        return "0.0.0"


def get_provider_info() -> dict:
    return {
        "package-name": DISTRIBUTION,
        "name": "Ray",
        "description": "Ray clusters (local, KubeRay, existing) and deferrable Ray jobs for Airflow 3.",
        "versions": [_version(DISTRIBUTION)],
        "connection-types": [
            {
                "connection-type": CONN_TYPE,
                "hook-class-name": "airflow_ray.hooks.ray_jobs.RayJobsHook",
                "hook-name": HOOK_NAME,
                "ui-field-behaviour": {
                    "hidden-fields": list(FIELD_BEHAVIOUR["hidden_fields"]),
                    "relabeling": dict(FIELD_BEHAVIOUR["relabeling"]),
                    "placeholders": dict(FIELD_BEHAVIOUR["placeholders"]),
                },
            }
        ],
        "extra-links": ["airflow_ray.links.RayJobLink"],
    }
