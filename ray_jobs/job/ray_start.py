"""Connect the job's driver to Ray: the cluster it runs on, or a local Ray sized for its footprint."""

from __future__ import annotations

import os

from ray_jobs.job.config import PreparedJob

#: Environment every Ray worker of the job gets (no hub access, quiet transformers).
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
#: Where storage is, never how to log in to it: the only variables of this process a job's
#: ``runtime_env`` carries. A ``runtime_env`` is shown by the Ray dashboard and its job API, so
#: credentials never go there: on a cluster, the workers use their own credential chain (an
#: instance or workload identity, or a Kubernetes Secret on KubeRay); a local Ray started here
#: inherits this process's environment.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "RAY_JOBS_CACHE_DIR")


def job_runtime_env() -> dict[str, str]:
    """The ``env_vars`` of the job's ``runtime_env``: :data:`WORKER_ENV` and :data:`FORWARDED_ENV`."""
    return {**WORKER_ENV, **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}


def ensure_ray(job: PreparedJob) -> None:
    import ray

    if ray.is_initialized():
        return
    env = job_runtime_env()
    if job.config.ray_address:
        ray.init(address=job.config.ray_address, runtime_env={"env_vars": env}, log_to_driver=True)
        return
    if os.environ.get("RAY_ADDRESS"):
        # inside a Ray job: the submitter's runtime_env (working_dir, env_vars) already applies
        ray.init(log_to_driver=True)
        return
    for k, v in env.items():
        os.environ.setdefault(k, v)
    ray.init(**local_ray_options(job), runtime_env={"env_vars": env}, log_to_driver=True)


def local_ray_options(job: PreparedJob) -> dict:
    """``ray.init`` arguments of the local Ray for *job* (no address, no ``runtime_env``)."""
    footprint = job.footprint
    needed = footprint.total()["CPU"] - footprint.driver_cpus  # this process is the driver
    # Logical CPUs: the whole minimum footprint (pools at their minimum, read/write tasks) plus
    # headroom for Ray Data's per-operator reservations, so a small machine oversubscribes
    # instead of queueing forever or pinning the preprocessing pool at its minimum.
    return {
        "num_cpus": max(os.cpu_count() or 1, int(needed + 0.999) + 2),
        "include_dashboard": False,
        "_node_ip_address": "127.0.0.1",  # loopback only
    }
