"""The job trigger against a stand-in Jobs API: incremental logs with bounded memory, a
restart that does not replay, the absolute deadline, and a kill that never raises."""

from __future__ import annotations

import asyncio
import logging
import time
import tracemalloc

import pytest

from airflow_ray.hooks.ray_job_logs import JobLogFollower
from airflow_ray.triggers import ray_job as trigger_module
from airflow_ray.triggers.ray_job import RayJobTrigger
from tests.airflow_ray.jobs_api_standin import JobsApiStandIn, StandInJob, log_line

_LOG = logging.getLogger("test.ray_job_trigger")


async def _first(trigger: RayJobTrigger) -> dict:
    trigger._log = _LOG  # the triggerer's structlog logger, swapped for one pytest's caplog sees
    async for event in trigger.run():
        return event.payload
    raise AssertionError("no event")


def _logged(caplog, sid: str) -> list[str]:
    prefix = f"[ray job {sid}] "
    return [r.getMessage()[len(prefix) :] for r in caplog.records if r.getMessage().startswith(prefix)]


@pytest.fixture
def in_memory_checkpoints(monkeypatch):
    """Stand-in for the XCom channel the triggerer gives a trigger (tested for real in the topology tests)."""
    store: dict[str, int] = {}
    monkeypatch.setattr(trigger_module._OffsetCheckpoint, "_load", lambda self: store.get("offset", 0))
    monkeypatch.setattr(trigger_module._OffsetCheckpoint, "_save", lambda self, off: store.__setitem__("offset", off))
    return store


class _TI:
    dag_id, task_id, run_id, map_index = "d", "embed", "r", 3


def test_every_line_exactly_once_in_order_and_the_tail_in_the_event(caplog):
    caplog.set_level(logging.INFO)
    with JobsApiStandIn(jobs={"j": StandInJob(lines=1234, width=60)}, token="s3cret") as api:
        # no token where the API demands one: a clear error after the bounded retries, not a hang
        event = asyncio.run(_first(RayJobTrigger(api.url, "j", poll_interval=0.05)))
        assert event["status"] == "ERROR" and "HTTP 401" in event["message"]

        api.token = None
        event = asyncio.run(_first(RayJobTrigger(api.url, "j", poll_interval=0.2, max_log_lines=100_000)))
    assert event["status"] == "SUCCEEDED"
    lines = _logged(caplog, "j")
    assert lines == [log_line(i, 60) for i in range(1234)]
    assert event["log_tail"].splitlines() == [log_line(i, 60) for i in range(1234 - 40, 1234)]
    assert event["log_offset"] == 1234 * 61


def test_a_job_whose_log_has_ended_is_reported_without_waiting_a_poll_interval(caplog):
    """The whole log sent (normal close) means the job is ending: the status is asked again
    within a fraction of a second, not after ``poll_interval`` (here 30 s), while still
    polling until Ray reports the end (here 0.6 s after the log)."""
    caplog.set_level(logging.INFO)
    with JobsApiStandIn(jobs={"j": StandInJob(lines=50, status_lag_s=0.6)}) as api:
        t0 = time.monotonic()
        event = asyncio.run(_first(RayJobTrigger(api.url, "j", poll_interval=30)))
        took = time.monotonic() - t0
    assert event["status"] == "SUCCEEDED" and len(_logged(caplog, "j")) == 50
    assert 0.6 <= took < 5, f"job end reported after {took:.1f}s"


@pytest.mark.integration
def test_a_200_mb_log_streams_with_bounded_memory_and_lines_cut_per_poll(caplog):
    caplog.set_level(logging.INFO)
    n, width = 100_000, 2_000  # 200 MB of log
    with JobsApiStandIn(jobs={"big": StandInJob(lines=n, width=width)}) as api:
        trigger = RayJobTrigger(api.url, "big", poll_interval=0.5, max_log_lines=200, tail_lines=5)
        tracemalloc.start()
        start = time.monotonic()
        event = asyncio.run(_first(trigger))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        sent = api.jobs["big"].chars_sent
    assert sent == n * (width + 1) > 200e6
    assert event["status"] == "SUCCEEDED" and event["log_offset"] == sent
    assert event["log_tail"].splitlines() == [log_line(i, width) for i in range(n - 5, n)]
    assert peak < 40e6, f"peak traced memory {peak / 1e6:.1f} MB while following a {sent / 1e6:.0f} MB log"
    messages = [r.getMessage() for r in caplog.records]
    cut = [m for m in messages if "more lines not shown" in m]
    shown = _logged(caplog, "big")
    assert cut, "with 200 lines per poll most of a fast 1M-line log is cut, and said so"
    assert len([s for s in shown if s.startswith("line ")]) <= 200 * (time.monotonic() - start) / 0.5 + 400


def test_a_rebuilt_trigger_resumes_after_the_last_logged_line(caplog, in_memory_checkpoints):
    caplog.set_level(logging.INFO)
    with JobsApiStandIn(jobs={"slow": StandInJob(lines=600, width=40, rate=400)}) as api:

        async def interrupted():
            first = RayJobTrigger(api.url, "slow", poll_interval=0.2, checkpoint_every_s=0)
            first.task_instance = _TI()
            task = asyncio.create_task(_first(first))
            await asyncio.sleep(0.8)
            task.cancel()  # the triggerer is SIGKILLed: the trigger simply stops
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(interrupted())
        before = _logged(caplog, "slow")
        assert 0 < len(before) < 600 and in_memory_checkpoints["offset"] > 0
        # a new triggerer rebuilds the trigger from its *original* kwargs (offset 0) ...
        rebuilt = RayJobTrigger(api.url, "slow", poll_interval=0.2, checkpoint_every_s=0)
        rebuilt.task_instance = _TI()
        event = asyncio.run(_first(rebuilt))
        assert api.jobs["slow"].connections == 2
    assert event["status"] == "SUCCEEDED"
    after = _logged(caplog, "slow")
    # ... and resumes from the checkpoint: nothing replayed, nothing lost
    assert after == [log_line(i, 40) for i in range(600)]


def test_checkpoints_are_written_at_most_every_interval_and_none_at_the_job_end(caplog, monkeypatch):
    """A checkpoint is a write to the metadata database through the triggerer: a job shorter
    than the interval writes none (its event carries the offset), a longer one about one per
    interval, however often lines arrive."""
    caplog.set_level(logging.INFO)
    saves: list[int] = []
    monkeypatch.setattr(trigger_module._OffsetCheckpoint, "_load", lambda self: 0)
    monkeypatch.setattr(trigger_module._OffsetCheckpoint, "_save", lambda self, off: saves.append(off))
    with JobsApiStandIn(
        jobs={"short": StandInJob(lines=100, width=80, rate=400), "long": StandInJob(lines=600, width=80, rate=400)}
    ) as api:
        for sid, every in (("short", 30.0), ("long", 0.5)):
            trigger = RayJobTrigger(api.url, sid, poll_interval=0.1, checkpoint_every_s=every)
            trigger.task_instance = _TI()
            start = time.monotonic()
            event = asyncio.run(_first(trigger))
            took = time.monotonic() - start
            assert event["status"] == "SUCCEEDED" and len(_logged(caplog, sid)) == event["log_offset"] // 81 > 0
            if sid == "short":
                assert saves == [], "a job shorter than the interval checkpoints nothing"
    assert 1 <= len(saves) <= took / 0.5 + 1, (saves, took)
    assert saves == sorted(saves) and saves[-1] < event["log_offset"], "no checkpoint at the end: the event has it"


@pytest.mark.integration
def test_what_a_triggerer_restart_re_receives_of_a_200_mb_log(caplog, in_memory_checkpoints, capsys):
    """A triggerer restart in the middle of a 200 MB log: Ray 2.60 has no read from an offset
    for a job's log, so the new stream starts at byte 0 again; the prefix up to the checkpoint is
    received and skipped (counted in ``resent``), nothing is logged twice, and the figure printed
    is what the restart cost."""
    caplog.set_level(logging.INFO)
    n, width = 100_000, 2_000  # 200 MB of log, written at 20,000 lines (40 MB) a second; 200 lines logged per poll
    with JobsApiStandIn(jobs={"big": StandInJob(lines=n, width=width, rate=20_000)}) as api:

        async def interrupted():
            first = RayJobTrigger(
                api.url, "big", poll_interval=0.5, max_log_lines=200, tail_lines=5, checkpoint_every_s=0
            )
            first.task_instance = _TI()
            task = asyncio.create_task(_first(first))
            while in_memory_checkpoints.get("offset", 0) < 80e6:
                await asyncio.sleep(0.05)
            task.cancel()  # the triggerer is SIGKILLed here
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(interrupted())
        at_restart, sent_before = in_memory_checkpoints["offset"], api.jobs["big"].chars_sent
        rebuilt = RayJobTrigger(
            api.url, "big", poll_interval=0.5, max_log_lines=200, tail_lines=5, checkpoint_every_s=0
        )
        rebuilt.task_instance = _TI()
        start = time.monotonic()
        follower_cls = trigger_module.JobLogFollower
        followers = []

        class Recording(follower_cls):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                followers.append(self)

        trigger_module.JobLogFollower = Recording
        try:
            event = asyncio.run(_first(rebuilt))
        finally:
            trigger_module.JobLogFollower = follower_cls
        took = time.monotonic() - start
        sent_after = api.jobs["big"].chars_sent - sent_before
    assert event["status"] == "SUCCEEDED" and event["log_offset"] == n * (width + 1)
    shown = [int(line[5:14]) for line in _logged(caplog, "big") if line.startswith("line ")]
    assert shown == sorted(set(shown)), "no line logged twice across the restart (most are cut: 200 per poll)"
    resent = followers[0].resent
    assert resent == at_restart, "exactly the checkpointed prefix is received again, and skipped"
    with capsys.disabled():
        print(
            f"\ntriggerer restart at {at_restart / 1e6:.1f} MB of a {n * (width + 1) / 1e6:.1f} MB log: the new stream "
            f"sent {sent_after / 1e6:.1f} MB, of which {resent / 1e6:.1f} MB received again and skipped "
            f"(Ray 2.60 has no offset read); {took:.1f}s to the job's end"
        )


def test_a_stream_that_closes_while_the_job_runs_is_reopened_and_loses_nothing(caplog):
    caplog.set_level(logging.INFO)
    with JobsApiStandIn(jobs={"j": StandInJob(lines=300, width=30, rate=600, close_first_after=120)}) as api:
        event = asyncio.run(_first(RayJobTrigger(api.url, "j", poll_interval=0.2)))
        assert api.jobs["j"].connections >= 2
    assert event["status"] == "SUCCEEDED"
    assert _logged(caplog, "j") == [log_line(i, 30) for i in range(300)]


def test_a_dropped_agent_closing_the_stream_normally_is_not_the_end_of_the_log(caplog):
    """Ray's head closes the log websocket with code 1000 when its connection to the agent
    drops, while the job runs on: the follower reconnects, skips what it already logged, and
    logs the rest of the job's log exactly once."""
    caplog.set_level(logging.INFO)
    job = StandInJob(lines=400, width=30, rate=800, close_first_after=150, close_first_code=1000)
    with JobsApiStandIn(jobs={"j": job}) as api:
        # (the stand-in's job ends once a stream has sent its whole log: a follower that took the
        # first close for the end would wait for it until this deadline)
        trigger = RayJobTrigger(api.url, "j", poll_interval=0.2, deadline=time.time() + 30)
        event = asyncio.run(_first(trigger))
        assert api.jobs["j"].connections >= 2
    assert event["status"] == "SUCCEEDED"
    assert _logged(caplog, "j") == [log_line(i, 30) for i in range(400)]
    assert event["log_offset"] == 400 * 31


def test_the_deadline_stops_the_job_and_ends_with_timeout():
    with JobsApiStandIn(jobs={"stuck": StandInJob(lines=10**9, width=10, rate=1)}) as api:
        trigger = RayJobTrigger(api.url, "stuck", poll_interval=0.2, deadline=time.time() + 1.5)
        start = time.monotonic()
        event = asyncio.run(_first(trigger))
        assert api.jobs["stuck"].status == "STOPPED"
    assert event["status"] == "TIMEOUT" and "deadline passed" in event["message"]
    assert time.monotonic() - start < 10


def test_on_kill_stops_the_job_says_which_and_never_raises(caplog):
    caplog.set_level(logging.INFO)
    with JobsApiStandIn(jobs={"k": StandInJob(lines=10**9, rate=1)}) as api:
        for sid, partition in (("k", 7), ("gone", 8)):  # "gone": 404, no exception
            trigger = RayJobTrigger(api.url, sid, partition=partition)
            trigger._log = _LOG
            asyncio.run(trigger.on_kill())
        assert api.jobs["k"].status == "STOPPED"
    unreachable = RayJobTrigger("http://127.0.0.1:9", "k")
    unreachable._log = _LOG
    asyncio.run(unreachable.on_kill())  # logged with its traceback, no exception
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "stopping Ray job k failed" in text and any(r.exc_info for r in caplog.records)
    assert "stop requested for Ray job k (partition 7): stopping" in text
    assert "Ray job gone (partition 8): already finished or not found" in text


def test_follower_hands_out_a_partial_last_line_once_the_stream_ends():
    follower = JobLogFollower("http://x", "j", max_lines=10)
    from airflow_ray.hooks.ray_job_logs import LogChunk

    out = LogChunk()
    follower._take("a\nb", out)
    follower._take("c\n" + "z" * 20_000, out)
    assert out.lines[:2] == ["a", "bc"] and len(out.lines[2]) == 16_384
    assert follower.offset == 2 + 3 + 16_384
    follower._flush_partial(out)
    assert len(out.lines[3]) == 20_000 - 16_384


def test_a_credential_lookup_that_fails_for_a_moment_is_retried_and_one_that_keeps_failing_is_named(
    monkeypatch, caplog
):
    """The backend's lookup (a Kubernetes API, a secrets backend) failing for a moment does not
    end the sensing; failing every try, the event names the cluster and the error."""
    caplog.set_level(logging.INFO)
    calls = {"n": 0}
    original = RayJobTrigger._client

    async def flaky(self, timeout: float = 30.0):
        calls["n"] += 1
        if calls["n"] <= calls.get("fail", 0):
            raise ConnectionError("kubernetes API: connection refused")
        return await original(self, timeout)

    monkeypatch.setattr(RayJobTrigger, "_client", flaky)
    with JobsApiStandIn(jobs={"j": StandInJob(lines=3)}) as api:
        calls["fail"] = 2
        event = asyncio.run(_first(RayJobTrigger(api.url, "j", cluster_name="c", poll_interval=0.01)))
        assert event["status"] == "SUCCEEDED" and calls["n"] == 3
        calls.update(n=0, fail=10**6)
        event = asyncio.run(_first(RayJobTrigger(api.url, "j", cluster_name="c", poll_interval=0.01)))
    assert event["status"] == "ERROR" and calls["n"] == trigger_module._MAX_CONSECUTIVE_ERRORS
    assert "no credentials for cluster 'c': kubernetes API: connection refused" in event["message"]
