"""The Ray runtime environment that ships the data plane's code with a job."""

from __future__ import annotations

import os

import ray_jobs


def working_tree_runtime_env(extra_env: dict[str, str] | None = None) -> dict:
    """``working_dir`` = the repository holding ``ray_jobs/``, with everything else excluded.

    Used for the ``local`` backend, whose workers run this machine's Python; on KubeRay the
    image already holds the code and no working_dir is shipped.
    """
    from ray_jobs.job.ray_start import WORKER_ENV  # no model hub access, quiet libraries

    package_dir = os.path.dirname(os.path.abspath(ray_jobs.__file__))
    root = os.path.dirname(package_dir)
    excludes = [f"/{entry}" for entry in sorted(os.listdir(root)) if entry != "ray_jobs"]
    excludes += ["__pycache__", "*.pyc"]
    return {"working_dir": root, "excludes": excludes, "env_vars": {**WORKER_ENV, **(extra_env or {})}}
