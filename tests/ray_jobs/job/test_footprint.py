"""A job's minimum footprint and how many jobs a cluster holds (pure, no Ray)."""

from __future__ import annotations

import pytest

from ray_jobs.errors import UsageError
from ray_jobs.job.admission import missing_resources
from ray_jobs.job.footprint import Bundle, Footprint, job_footprint


def _demo() -> Footprint:
    # preprocess 1 CPU, two stages of 1 CPU, tasks 0.75, driver 0.25 = 4 CPUs
    return job_footprint([(1.0, 0.0, 1), (1.0, 0.0, 1)], preprocess_cpus=1.0, preprocess_min=1)


def test_total_counts_every_pool_minimum_tasks_and_driver():
    fp = job_footprint([(1.0, 1.0, 2), (2.0, 0.5, 1)], preprocess_cpus=1.0, preprocess_min=3)
    assert fp.total() == {"CPU": 3 + 2 + 2 + 0.75 + 0.25, "GPU": 2.5}
    assert [b.name for b in fp.bundles] == ["preprocess", "stage0", "stage1", "tasks"]
    assert fp.bundles[1].resources() == {"CPU": 2.0, "GPU": 2.0}
    assert fp.bundle("tasks") == 3


def test_round_trips_through_json_dict():
    fp = job_footprint([(1.0, 0.5, 1)], preprocess_cpus=0.5, preprocess_min=2, driver_cpus=0.5)
    assert Footprint.from_dict(fp.to_dict()) == fp
    with pytest.raises(UsageError, match="invalid footprint"):
        Footprint.from_dict({"bundles": [{"name": "x"}]})


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        ([{"CPU": 4}], 1),
        ([{"CPU": 3.9}], 0),  # one job needs 4: a cluster smaller than one job holds none
        ([{"CPU": 8}], 2),
        ([{"CPU": 8.5}], 2),
        ([{"CPU": 0}, {"CPU": 4}, {"CPU": 4}], 2),  # a 0-CPU head runs nothing
        ([{"CPU": 2}, {"CPU": 2}], 1),  # bundles split across nodes, each fits one node
    ],
)
def test_jobs_that_fit_cpu_only(nodes, expected):
    assert _demo().jobs_that_fit(nodes) == expected


def test_jobs_that_fit_respects_gpus_per_node():
    # two GPU stages of one GPU each: a job needs 2 GPUs, on one node or two
    fp = job_footprint([(1.0, 1.0, 1), (1.0, 1.0, 1)], preprocess_cpus=1.0, preprocess_min=1)
    gpu_nodes = [{"CPU": 8, "GPU": 1}] * 4
    assert fp.jobs_that_fit(gpu_nodes) == 2
    assert fp.jobs_that_fit([{"CPU": 64}]) == 0  # no GPU at all
    # a pool's minimum shares one bundle: two 1-GPU actors need a 2-GPU node
    pooled = job_footprint([(1.0, 1.0, 2)], preprocess_cpus=1.0, preprocess_min=1)
    assert pooled.jobs_that_fit(gpu_nodes) == 0
    assert pooled.jobs_that_fit([{"CPU": 16, "GPU": 2}]) == 1


def test_jobs_that_fit_is_bounded():
    assert Footprint((Bundle("tasks", 0.01),), 0.01).jobs_that_fit([{"CPU": 1e9}], limit=7) == 7


def test_invalid_bundles_and_footprints_are_refused():
    with pytest.raises(UsageError, match="needs some CPU or GPU"):
        Bundle("x", 0.0)
    with pytest.raises(UsageError, match="driver CPUs must be > 0"):
        Footprint((Bundle("x", 1.0),), 0.0)
    with pytest.raises(UsageError, match="unique"):
        Footprint((Bundle("x", 1.0), Bundle("x", 1.0)))


def test_missing_resources_names_only_what_is_short():
    assert missing_resources({"CPU": 4, "GPU": 2}, {"CPU": 8, "GPU": 1}) == {"GPU": 1}
    assert missing_resources({"CPU": 4}, {"CPU": 4}) == {}
