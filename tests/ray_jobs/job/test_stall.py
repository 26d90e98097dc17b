"""The stall rule, the diagnosis and the watchdog, with fake progress and fake operators (no Ray)."""

import threading
import time

import pytest

from ray_jobs.errors import STALL_EXIT_CODE, PipelineStalled
from ray_jobs.job.progress import end_state
from ray_jobs.job.stall import (
    ActorInfo,
    OperatorInfo,
    StallClock,
    StallWatchdog,
    _death_text,
    label_operators,
    stall_message,
    stuck_operator,
)


def test_the_clock_resets_on_every_change_and_gives_the_first_change_its_grace():
    clock = StallClock(10, now=0.0, grace_s=5)
    assert not clock.observe((0, 0), 1.0) and not clock.observe((0, 0), 14.0), "within timeout + grace"
    assert clock.observe((0, 0), 15.0)
    clock = StallClock(10, now=0.0, grace_s=5)
    assert not clock.observe((0, 0), 1.0), "the first reading is the start, not a change"
    assert not clock.observe((0, 16), 12.0) and clock.idle_s(12.0) == 0, "rows moved between operators"
    assert not clock.observe((0, 16), 21.9), "the grace is for the first change only"
    assert clock.observe((0, 16), 22.0) and clock.idle_s(22.0) == 10
    assert not clock.observe((16, 32), 22.5), "rows reached the sink"


def test_an_unreadable_progress_is_no_progress():
    clock = StallClock(1, now=0.0)
    assert not clock.observe(None, 0.5) and clock.observe(None, 1.0) and clock.mark is None


def test_the_clock_refuses_a_zero_timeout():
    with pytest.raises(ValueError):
        StallClock(0, now=0.0)


def _op(label, *, finished=False, queued=0, active=0, actors=()):
    return OperatorInfo(label, f"Ray({label})", finished, queued, active, 10, 10, tuple(actors))


ALIVE = ActorInfo("a1", "ALIVE", "MapWorker(MapBatches(ModelStage))", 11)
DEAD = ActorInfo(
    "d2",
    "DEAD",
    "MapWorker(MapBatches(ModelStage))",
    12,
    death_cause="WORKER_DIED: The actor is dead because its worker process has died. " + "x" * 400,
)
PENDING = ActorInfo("p3", "PENDING_CREATION", "MapWorker(MapBatches(Preprocessor))")


def test_the_stuck_operator_is_the_most_downstream_one_with_a_dead_actor():
    ops = [
        _op("read", finished=True),
        _op("preprocess", queued=4, actors=[PENDING]),
        _op("stage0", queued=2, active=1, actors=[ALIVE, DEAD]),
        _op("stage1", actors=[ALIVE]),
        _op("write"),
    ]
    assert stuck_operator(ops).label == "stage0"


def test_a_pool_growing_on_pending_actors_is_not_taken_for_the_stuck_one():
    ops = [_op("stage0", queued=1, actors=[ALIVE, PENDING]), _op("stage1", active=1, actors=[ALIVE]), _op("write")]
    assert stuck_operator(ops).label == "stage1"


def test_without_broken_actors_it_is_the_most_downstream_one_with_tasks_that_do_not_finish():
    """The write waits for a file's worth of rows (input queued, no task): the stage whose task
    hangs is the stuck one."""
    ops = [_op("read", queued=3), _op("stage0", active=2, actors=[ALIVE]), _op("stage1"), _op("write", queued=2)]
    assert stuck_operator(ops).label == "stage0"
    assert stuck_operator([_op("stage0", queued=1), _op("write", queued=2)]).label == "write"
    assert stuck_operator([_op("read", finished=True), _op("stage0"), _op("write")]).label == "stage0"
    assert stuck_operator([_op("read", finished=True)]) is None


def test_the_message_names_the_other_operators_holding_rows():
    ops = [_op("preprocess", queued=3), _op("stage0", active=1), _op("write", queued=2)]
    msg = stall_message(ops, idle_s=5, timeout_s=4, rows_done=0, rows_total=9)
    assert msg.endswith("; also holding rows: write (2 queued, 0 in flight), preprocess (3 queued, 0 in flight)")
    assert "stuck at stage0 (Ray(stage0))" in msg


def test_the_message_names_the_operator_its_actors_and_a_clipped_death_cause():
    ops = [_op("stage0", queued=2, active=1, actors=[ALIVE, DEAD]), _op("write")]
    msg = stall_message(ops, idle_s=12.4, timeout_s=10, rows_done=48, rows_total=120)
    assert msg.startswith("pipeline stalled: no row moved for 12 s (stall_timeout_s=10; rows at the sink 48 of 120)")
    assert "stuck at stage0 (Ray(stage0))" in msg and "2 input blocks queued, 1 tasks in flight" in msg
    assert "actors 1/2 alive; MapWorker(MapBatches(ModelStage)) d2 DEAD pid 12: WORKER_DIED: The actor is dead" in msg
    assert "a1" not in msg, "alive actors are counted, not listed"
    assert "x" * 200 not in msg and "\n" not in msg, "one line, the death cause clipped"
    assert "could not be read" in stall_message(None, idle_s=1, timeout_s=1, rows_done=0, rows_total=1)


def test_pending_actors_are_named_with_their_state():
    msg = stall_message([_op("preprocess", actors=[PENDING])], idle_s=1, timeout_s=1, rows_done=0, rows_total=5)
    assert "stuck at preprocess" in msg and "p3 PENDING_CREATION" in msg and "actors 0/1 alive" in msg


def test_operator_labels_follow_the_pipeline():
    names = ["Input", "ReadManifest->MapBatches(Preprocessor)", "MapBatches(ModelStage)", "MapBatches(SlowStage)"]
    assert label_operators([*names, "Write"]) == ["Input", "preprocess", "stage0", "stage1", "write"]
    assert label_operators(["ReadRowGroups", "MapBatches(Preprocessor)", "Write"]) == ["read", "preprocess", "write"]


def test_death_causes_from_the_state_api_and_plain_text():
    cause = {"actor_died_error_context": {"error_message": "worker died", "reason": "WORKER_DIED"}}
    assert _death_text(cause) == "WORKER_DIED: worker died"
    assert _death_text({"creation_task_failure_context": {"error_message": "boom"}}) == "boom"
    assert _death_text(None) == "" and _death_text("gone") == "gone"


def test_the_last_progress_report_says_stalled():
    assert end_state(None) == "done" and end_state(PipelineStalled) == "stalled" and end_state(OSError) == "failed"


class FakeProgress:
    """``(rows at the sink, rows moved between operators)``: frozen, or growing on every read."""

    def __init__(self, rows=5, growing=False):
        self.rows, self.growing = rows, growing

    def __call__(self):
        if self.growing:
            self.rows += 1
        return self.rows, 3 * self.rows


def _watchdog(rows, lines, **kw):
    ops = [_op("stage0", queued=1, actors=[ALIVE]), _op("stage1", active=1, actors=[DEAD]), _op("write")]
    return StallWatchdog(
        rows, timeout_s=0.2, rows_total=100, poll_s=0.02, diagnose=lambda: ops, emit=lines.append, **kw
    )


def test_a_stall_interrupts_a_blocked_call_and_raises_naming_the_operator():
    """The write stands in as a plain blocking sleep: the SIGINT to the main thread interrupts it."""
    lines = []
    started = time.monotonic()
    with (
        pytest.raises(PipelineStalled, match=r"stuck at stage1 .* d2 DEAD") as err,
        _watchdog(FakeProgress(), lines) as w,
    ):
        w.run(lambda: time.sleep(30))
    assert time.monotonic() - started < 5
    assert err.value.__cause__ is None and w.stalled is err.value
    assert lines[-1] == f"stall: {err.value}" and lines[0].startswith("stall: stage0 (Ray(stage0))")


def test_a_pipeline_that_keeps_moving_is_left_alone():
    lines = []
    with _watchdog(FakeProgress(growing=True), lines) as w:
        assert w.run(lambda: time.sleep(0.45) or "written") == "written"
    assert w.stalled is None and lines == []


def test_an_error_of_the_write_passes_through_unchanged():
    with pytest.raises(KeyError), _watchdog(FakeProgress(growing=True), []) as w:
        w.run(lambda: {}["missing"])


def test_progress_that_cannot_be_read_stalls_too():
    def broken():
        raise TimeoutError("executor gone")

    with pytest.raises(PipelineStalled, match="rows at the sink 0 of 100"), _watchdog(broken, []) as w:
        w.run(lambda: time.sleep(30))


def test_off_the_main_thread_the_process_is_ended_with_the_stall_exit_code():
    """Nothing can interrupt a thread that is not the main one: the watchdog ends the process (a
    stand-in records the exit code instead)."""
    exits, release, outcome = [], threading.Event(), {}

    def exit_process(code):
        exits.append(code)
        release.set()

    def worker():
        with _watchdog(FakeProgress(), [], exit_after_s=0.1, exit_process=exit_process) as w:
            try:
                w.run(lambda: release.wait(30))
            except PipelineStalled as exc:
                outcome["raised"] = exc

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert exits == [STALL_EXIT_CODE] and "raised" in outcome


def test_a_stalled_job_exits_4_with_the_message_as_its_last_line(capsys, monkeypatch):
    import ray_jobs.cli as cli

    def stalled(args):
        raise PipelineStalled("pipeline stalled: no row moved for 900 s; stuck at stage1")

    monkeypatch.setitem(cli.COMMANDS, "model-id", (cli.COMMANDS["model-id"][0], stalled))
    assert cli.main(["model-id", "--model", "x"]) == STALL_EXIT_CODE == 4
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: pipeline stalled: ")


def test_actor_records_come_from_the_state_api_or_else_the_gcs_table(monkeypatch):
    """Ray's two actor tables, each replaced by a stand-in returning rows shaped as Ray 2.60 returns
    them (the state API needs the dashboard, which a local test Ray does not run)."""
    import types

    import ray
    import ray._private.state
    import ray.util.state

    from ray_jobs.job.stall import actor_table

    context = types.SimpleNamespace(gcs_address="127.0.0.1:6379", get_job_id=lambda: "01000000")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
    seen = {}

    def list_actors(**kw):
        seen.update(kw)
        return [
            types.SimpleNamespace(
                actor_id="aa", state="DEAD", class_name="MapWorker(X)", pid=7, num_restarts=1,
                death_cause={"actor_died_error_context": {"error_message": "gone", "reason": "WORKER_DIED"}},
            ),
            {"actor_id": "zz", "state": "ALIVE", "class_name": "Other", "pid": 9, "num_restarts": 0,
             "death_cause": None},
        ]  # fmt: skip

    monkeypatch.setattr(ray.util.state, "list_actors", list_actors)
    assert actor_table(["aa", "bb"]) == {"aa": ActorInfo("aa", "DEAD", "MapWorker(X)", 7, 1, "WORKER_DIED: gone")}
    assert seen["filters"] == [("job_id", "=", "01000000")] and seen["address"] == "127.0.0.1:6379"

    def unavailable(**kw):
        raise ConnectionError("no dashboard")

    gcs = {"bb": {"ActorID": "bb", "State": "PENDING_CREATION", "ActorClassName": "MapWorker(Y)", "Pid": 0,
                  "NumRestarts": 0, "DeathCause": None}}  # fmt: skip
    monkeypatch.setattr(ray.util.state, "list_actors", unavailable)
    monkeypatch.setattr(ray._private.state, "actors", lambda: gcs)
    assert actor_table(["bb"]) == {"bb": ActorInfo("bb", "PENDING_CREATION", "MapWorker(Y)", None, 0, "")}
    assert actor_table([]) == {}


def test_rows_moved_sums_what_every_operator_took_in_and_put_out():
    """A stand-in for Ray Data's executor: its topology maps operators (with their metrics) to states."""
    import types

    class Op:
        def __init__(self, rows_in, rows_out):
            self.metrics = types.SimpleNamespace(num_row_inputs_received=rows_in, rows_task_outputs_generated=rows_out)

    op = Op

    from ray_jobs.job.stall import rows_moved

    executor = types.SimpleNamespace(_topology={op(0, 120): None, op(120, 64): None, op(64, 0): None})
    assert rows_moved(executor) == 368 and rows_moved(None) == 0
