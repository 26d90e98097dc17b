"""No silent stall, on a real local Ray: a stage actor killed mid-run, and a stage that hangs."""

import itertools
import os
import signal
import tempfile
import threading
import time

import pytest

from ray_jobs import storage
from ray_jobs.errors import PipelineStalled
from ray_jobs.job.embed import prepare, run_prepared
from ray_jobs.job.stall import diagnose
from ray_jobs.model.staged import ModelStage
from ray_jobs.output.markers import committed_marker
from tests.ray_jobs.job.test_embed import _cfg

pytestmark = pytest.mark.integration


class SlowStage(ModelStage):
    """The real stage, 0.3 s slower per batch: the run lasts long enough to be interrupted."""

    def __call__(self, batch):
        time.sleep(0.3)
        return super().__call__(batch)


def _hang_flag(job_id: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"stall-test-{job_id}-hang")


class HangingLastStage(ModelStage):
    """The real stage, except that the last stage never returns from its third batch on (a
    stand-in for a model call that hangs: the rows stop at that stage). It flags the hang."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last, self.calls = kwargs["stage_index"] == 1, 0

    def __call__(self, batch):
        import ray

        self.calls += 1
        if self.last and self.calls > 2:
            open(_hang_flag(ray.get_runtime_context().get_job_id()), "w").close()
            time.sleep(3600)
        return super().__call__(batch)


def _clock_from(monkeypatch, started) -> None:
    """The stall clock runs once *started()* is true; until then every reading counts as progress.
    On this shared 2-core machine the actors' start-up alone can outlast a stall timeout of a few
    seconds (a deployed job's 15 min leave room for it): the test times the watchdog from the
    fault it injects."""
    from ray_jobs.job import stall

    real = stall.watch

    def watch(job, totals):
        watchdog = real(job, totals)
        progress, tick = watchdog.progress, itertools.count(1)
        watchdog.progress = lambda: progress() if started() else (-1, -next(tick))
        return watchdog

    monkeypatch.setattr(stall, "watch", watch)


def _stage_actor_pid(label: str, deadline: float) -> int | None:
    """The pid of an alive actor of operator *label* while it runs a task, read as the stall
    diagnosis reads it (the running executor's pools, Ray's actor table)."""
    while time.monotonic() < deadline:
        for op in diagnose() or ():
            alive = [a for a in op.actors if a.state == "ALIVE" and a.pid]
            if op.label == label and op.active_tasks > 0 and not op.finished and alive:
                return alive[0].pid
        time.sleep(0.05)
    return None


def test_a_stage_actor_killed_mid_run_recovers_or_fails_clearly(ray_session, demo_assets, tmp_path, monkeypatch):
    """SIGKILL one stage actor's process while it runs a task: Ray restarts the actor and retries
    its task, so the partition commits every row; should the pool keep the dead actor instead, the
    stall watchdog fails the job naming it. Either way within a bound: the job never hangs."""
    monkeypatch.setattr("ray_jobs.model.staged.ModelStage", SlowStage)
    killed = []
    _clock_from(monkeypatch, lambda: bool(killed))
    job = prepare(_cfg(demo_assets, tmp_path, num_stages=2, stall_timeout_s=20))

    def kill():
        pid = _stage_actor_pid("stage0", time.monotonic() + 60)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    try:
        result = run_prepared(job)
    except PipelineStalled as exc:
        assert "stuck at stage0" in str(exc), exc
        assert committed_marker(job.partition_uri, job.model_id) is None
    else:
        assert (result.rows_ok, result.rows_rejected) == (108, 12), "every row once, nothing lost to the kill"
    killer.join(5)
    assert killed, "a stage actor was killed while the pipeline ran"


def test_a_hung_stage_fails_the_job_within_the_stall_timeout(ray_session, demo_assets, tmp_path, monkeypatch, capsys):
    """The write is blocked inside Ray Data: the watchdog interrupts it within a poll of the
    timeout, names the last stage with its actor and the write waiting for a file's worth of rows,
    and the attempt leaves nothing behind."""
    import ray

    monkeypatch.setattr("ray_jobs.model.staged.ModelStage", HangingLastStage)
    flag = _hang_flag(ray.get_runtime_context().get_job_id())
    _clock_from(monkeypatch, lambda: os.path.exists(flag))
    job = prepare(_cfg(demo_assets, tmp_path, num_stages=2, stall_timeout_s=4))
    try:
        with pytest.raises(PipelineStalled) as err:
            run_prepared(job)
        hung_for = time.time() - os.path.getmtime(flag)
    finally:
        if os.path.exists(flag):
            os.unlink(flag)
    message = str(err.value)
    assert message.startswith("pipeline stalled: no row moved for "), message
    idle_s = float(message.split(" for ", 1)[1].split(" s ", 1)[0])
    assert 4 <= idle_s <= 8 and hung_for < 20, f"failed {hung_for:.0f} s after the hang: {message}"
    assert "stuck at stage1 (MapBatches(HangingLastStage)): running" in message, message
    assert "tasks in flight, actors 1/1 alive" in message and "also holding rows: write" in message, message
    out = capsys.readouterr().out
    assert "stall: stage1 (MapBatches(HangingLastStage))" in out and "stall: write (Write)" in out, out[-3000:]
    assert committed_marker(job.partition_uri, job.model_id) is None
    leftovers = [p for p in storage.sizes_under(job.partition_uri) if p.startswith("attempt=")]
    assert leftovers == [], "the stalled attempt was discarded"
