"""A job's footprint as the provider reads it (a plain dict), and how many jobs fit a cluster.

The provider imports nothing of the data plane: it reads the dict the data plane's
``Footprint.to_dict()`` writes. The cross-check below keeps the two packings the same."""

from __future__ import annotations

import random

import pytest

from airflow_ray.capacity import DEFAULT_ADVICE, max_in_flight
from airflow_ray.errors import ClusterError
from airflow_ray.footprint import JobFootprint


def _dict(*bundles: tuple[float, float, int], driver_cpus: float = 0.25) -> dict:
    return {
        "bundles": [{"name": f"b{i}", "cpus": c, "gpus": g, "count": n} for i, (c, g, n) in enumerate(bundles)],
        "driver_cpus": driver_cpus,
    }


def test_a_footprint_is_read_from_its_dict_and_totals_its_bundles_and_driver():
    fp = JobFootprint.from_dict(_dict((1.0, 0.0, 2), (2.0, 1.0, 1), driver_cpus=0.5))
    assert fp.total() == {"CPU": 4.5, "GPU": 1.0}
    assert fp.describe() == "CPU:4.5,GPU:1 (b0=CPU:2, b1=CPU:2,GPU:1, driver entrypoint=CPU:0.5)"
    assert JobFootprint.from_dict({**_dict((1.0, 0.0, 1)), "total": {"CPU": 1.25}}).total() == {"CPU": 1.25}
    for bad in ({"bundles": [{"name": "x"}], "driver_cpus": 1}, _dict(), _dict((1.0, 0.0, 1), driver_cpus=0)):
        with pytest.raises(ValueError, match="invalid footprint"):
            JobFootprint.from_dict(bad)
    with pytest.raises(ValueError, match="needs some CPU or GPU"):
        JobFootprint.from_dict(_dict((0.0, 0.0, 1)))


def test_jobs_that_fit_packs_every_bundle_and_driver_on_one_node():
    fp = JobFootprint.from_dict(_dict((1.0, 1.0, 1), (1.0, 1.0, 1)))  # two 1-GPU bundles + a driver
    assert fp.jobs_that_fit([{"CPU": 8.0, "GPU": 1.0}] * 4) == 2
    assert fp.jobs_that_fit([{"CPU": 8.0, "GPU": 2.0}]) == 1
    assert fp.jobs_that_fit([{"CPU": 1.0, "GPU": 2.0}]) == 0, "the driver has no CPU left"
    assert JobFootprint.from_dict(_dict((0.01, 0.0, 1), driver_cpus=0.01)).jobs_that_fit([{"CPU": 1e9}], limit=7) == 7


def _demo() -> JobFootprint:
    # the data plane's shape: preprocess 1 CPU, two stages of 1 CPU, read 0.5, write 0.25, the
    # driver's bundle 0.2 and its entrypoint 0.0001 = 3.9501 CPUs
    bundles = ((1.0, 0.0, 1), (1.0, 0.0, 1), (1.0, 0.0, 1), (0.25, 0.0, 2), (0.25, 0.0, 1), (0.2, 0.0, 1))
    return JobFootprint.from_dict(_dict(*bundles, driver_cpus=0.0001))


def test_every_node_keeps_room_for_every_driver():
    """Ray's job supervisor may put every driver on one node, before any job reserves: two
    8-CPU nodes hold two 7.9-CPU jobs only if a driver asks (almost) nothing there."""
    nodes = [{"CPU": 8.0}, {"CPU": 8.0}]
    assert JobFootprint.from_dict(_dict((7.65, 0.0, 1), driver_cpus=0.25)).jobs_that_fit(nodes) == 1
    assert JobFootprint.from_dict(_dict((7.65, 0.0, 1), (0.2, 0.0, 1), driver_cpus=0.0001)).jobs_that_fit(nodes) == 2
    # a node exactly full of reservations still takes the drivers of all the jobs counted
    # (the data plane's driver bundle leaves 0.05 CPU of room: 500 drivers' entrypoints)
    exact = JobFootprint.from_dict(_dict((3.0, 0.0, 1), (0.95, 0.0, 1), driver_cpus=0.0001))
    assert exact.jobs_that_fit([{"CPU": 4.0}] * 64) == 64


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        ([{"CPU": 4}], 1),
        ([{"CPU": 3.9}], 0),  # one job needs 4: a cluster smaller than one job holds none
        ([{"CPU": 8}], 2),
        ([{"CPU": 8.5}], 2),
        ([{"CPU": 0}, {"CPU": 4}, {"CPU": 4}], 2),  # a 0-CPU head runs nothing
        ([{"CPU": 2.1}, {"CPU": 2.1}], 1),  # bundles split across nodes, each fits one node
        ([{"CPU": 2}, {"CPU": 2}], 0),  # two 1-CPU bundles fill a node: no room for a driver there
    ],
)
def test_jobs_that_fit_cpu_only(nodes, expected):
    assert _demo().jobs_that_fit(nodes) == expected


def test_jobs_that_fit_respects_gpus_per_node():
    # two GPU stages of one GPU each: a job needs 2 GPUs, on one node or two
    fp = JobFootprint.from_dict(_dict((1.0, 0.0, 1), (1.0, 1.0, 1), (1.0, 1.0, 1), (0.75, 0.0, 1)))
    gpu_nodes = [{"CPU": 8, "GPU": 1}] * 4
    assert fp.jobs_that_fit(gpu_nodes) == 2
    assert fp.jobs_that_fit([{"CPU": 64}]) == 0  # no GPU at all
    # a pool's minimum shares one bundle: two 1-GPU actors need a 2-GPU node
    pooled = JobFootprint.from_dict(_dict((1.0, 0.0, 1), (1.0, 1.0, 2), (0.75, 0.0, 1)))
    assert pooled.jobs_that_fit(gpu_nodes) == 0
    assert pooled.jobs_that_fit([{"CPU": 16, "GPU": 2}]) == 1


@pytest.mark.parametrize("seed", range(30))
def test_the_provider_reads_the_data_planes_footprint(seed):
    """The dict ``ray_jobs.job.footprint.Footprint.to_dict`` writes (a test-only import) reads
    back with the same totals and description."""
    from ray_jobs.job.footprint import job_footprint

    rng = random.Random(seed)
    stages = [
        (rng.choice([0.25, 0.5, 1.0, 2.0, 4.0]), rng.choice([0.0, 0.0, 0.5, 1.0]), rng.randint(1, 3))
        for _ in range(rng.randint(1, 5))
    ]
    theirs = job_footprint(
        stages, preprocess_cpus=rng.choice([0.5, 1.0]), preprocess_min=rng.randint(1, 3), driver_cpus=0.25
    )
    ours = JobFootprint.from_dict(theirs.to_dict())
    assert ours.total() == theirs.total() and ours.describe() == theirs.describe()


def test_max_in_flight_ends_its_refusal_with_the_callers_advice():
    with pytest.raises(ClusterError) as exc:
        max_in_flight(_dict((4.0, 0.0, 1)), [{"CPU": 3.0}], None)
    assert "holds at most CPU:3,GPU:0 over 1 nodes" in str(exc.value) and str(exc.value).endswith(DEFAULT_ADVICE)
    with pytest.raises(ClusterError, match=r"\(each bundle on one node\): set max_jobs_in_flight$"):
        max_in_flight(_dict((4.0, 0.0, 1)), [{"CPU": 3.0}], 0, advice="set max_jobs_in_flight")
