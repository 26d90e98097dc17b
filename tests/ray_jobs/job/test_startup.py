"""Start-up breakdown: the critical-path reduction and the driver's own process start."""

from __future__ import annotations

import os
import time

import pytest

from ray_jobs.job.startup import ActorStart, ActorTimer, breakdown, process_started_at


def _actor(op, pid, began, done, load=0.0):
    return ActorStart(
        op=op, pid=pid, process_started_at=began - 1, init_started_at=began, init_done_at=done, model_load_s=load
    )


def test_the_actor_ready_last_is_the_critical_path_and_its_model_load_is_split_off():
    t0 = 1000.0
    actors = [
        _actor("preprocess", 1, t0 + 2, t0 + 6),
        _actor("stage0", 2, t0 + 3, t0 + 9, load=2.5),
        _actor("stage1", 3, t0 + 3, t0 + 8, load=1.0),
    ]
    b = breakdown(driver_started_at=t0 - 10, pipeline_started_at=t0, admission_wait_s=4.0, actors=actors)
    assert b.driver_s == pytest.approx(6.0)  # 10 s before the pipeline, 4 of them waiting for admission
    assert b.slowest_actor == "stage0"
    assert b.actor_start_s == pytest.approx(6.5) and b.model_load_s == pytest.approx(2.5)
    assert b.to_timings() == {
        "startup_driver_s": 6.0,
        "startup_admission_wait_s": 4.0,
        "startup_actor_start_s": 6.5,
        "startup_model_load_s": 2.5,
    }


def test_restarts_before_the_pipeline_and_missing_records_are_not_start_up():
    t0 = 1000.0
    stale = _actor("stage0", 9, t0 - 50, t0 - 40, load=1.0)  # another attempt's record under the scope
    b = breakdown(driver_started_at=t0 - 3, pipeline_started_at=t0, admission_wait_s=0.0, actors=[stale])
    assert b.actor_start_s is None and b.model_load_s is None
    assert set(b.to_timings()) == {"startup_driver_s", "startup_admission_wait_s"}


def test_an_actor_record_that_ends_before_it_begins_is_refused():
    with pytest.raises(ValueError, match="ended before it began"):
        _actor("stage0", 1, 10.0, 9.0)


def test_process_start_is_this_process_and_the_timer_separates_model_load():
    started = process_started_at()
    assert started <= time.time() and time.time() - started < 24 * 3600
    assert abs(process_started_at(os.getpid()) - started) < 0.05
    timer = ActorTimer("stage0", scope="")  # no scope: nothing is recorded, nothing raises
    with timer.model_load():
        time.sleep(0.05)
    rec = timer.done()
    assert rec.model_load_s >= 0.05 and rec.init_done_at - rec.init_started_at >= rec.model_load_s
