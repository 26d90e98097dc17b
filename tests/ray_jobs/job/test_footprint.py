"""A job's minimum footprint and how many jobs a cluster holds (pure, no Ray)."""

from __future__ import annotations

import pytest

from ray_jobs.errors import UsageError
from ray_jobs.job.admission import missing_resources
from ray_jobs.job.footprint import DRIVER_ENTRYPOINT_CPUS, DRIVER_ROOM, Bundle, Footprint, job_footprint


def test_total_counts_every_pool_minimum_tasks_and_driver():
    fp = job_footprint([(1.0, 1.0, 2), (2.0, 0.5, 1)], preprocess_cpus=1.0, preprocess_min=3)
    # pools 3 + 2 + 2, read 0.5 + write 0.25 (task_cpus 0.75), driver 0.25 less its room of 0.05
    # (its entrypoint share, 0.0001, is what the job supervisor holds)
    assert fp.total() == {"CPU": 3 + 2 + 2 + 0.75 + 0.2 + 0.0001, "GPU": 2.5}
    assert [b.name for b in fp.bundles] == ["preprocess", "stage0", "stage1", "read", "write", "driver"]
    assert fp.bundles[1].resources() == {"CPU": 2.0, "GPU": 2.0}
    assert (fp.bundle("read"), fp.bundle("write")) == (3, 4)
    assert fp.driver_cpus == DRIVER_ENTRYPOINT_CPUS
    # reads get two slots, writes one that reads never take; each slot a third of task_cpus
    assert (fp.bundles[3].count, fp.bundles[4].count) == (2, 1) and fp.bundles[3].cpus == fp.bundles[4].cpus == 0.25


def test_its_dict_is_what_the_provider_reads():
    fp = job_footprint([(1.0, 0.5, 1)], preprocess_cpus=0.5, preprocess_min=2, driver_cpus=0.5)
    assert fp.to_dict() == {
        "bundles": [
            {"name": "preprocess", "cpus": 0.5, "gpus": 0.0, "count": 2},
            {"name": "stage0", "cpus": 1.0, "gpus": 0.5, "count": 1},
            {"name": "read", "cpus": 0.25, "gpus": 0.0, "count": 2},
            {"name": "write", "cpus": 0.25, "gpus": 0.0, "count": 1},
            {"name": "driver", "cpus": 0.45, "gpus": 0.0, "count": 1},
        ],
        "driver_cpus": 0.0001,
        "total": {"CPU": 3.2001, "GPU": 0.5},
    }


def test_a_driver_share_must_leave_room_for_the_entrypoints():
    assert DRIVER_ROOM == 0.05
    with pytest.raises(UsageError, match=r"--driver-cpus must be above 0\.05"):
        job_footprint([(1.0, 0.0, 1)], preprocess_cpus=1.0, preprocess_min=1, driver_cpus=0.05)


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
