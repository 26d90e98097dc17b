"""The 1,000-partition bench sizes its stand-in cluster so that the capacity task finds exactly
``--max-in-flight`` jobs, as on a real cluster of that many one-job nodes."""

import pytest

from airflow_ray.footprint import JobFootprint
from bench.control_plane_scale import job_node_resources
from embedding_run.deployment import load_defaults
from ray_jobs.job.footprint import job_footprint


@pytest.mark.parametrize("jobs", [1, 16, 64])
def test_the_stand_in_nodes_hold_exactly_the_jobs_asked_for_drivers_included(jobs):
    p = load_defaults()["params"]
    fp = job_footprint(
        [(float(p["stage_num_cpus"]), float(p["stage_num_gpus"]), int(str(p["stage_pool"]).partition("-")[0]))],
        preprocess_cpus=float(p["preprocess_cpus"]),
        preprocess_min=int(str(p["preprocess_pool"]).partition("-")[0]),
    )
    nodes = [job_node_resources(jobs)] * jobs
    assert JobFootprint.from_dict(fp.to_dict()).jobs_that_fit(nodes) == jobs
    assert JobFootprint.from_dict(fp.to_dict()).jobs_that_fit(nodes[:-1]) == jobs - 1
