"""No silent stall: a pipeline that moves no row to the sink for ``stall_timeout_s`` fails, naming
where it is stuck.

Ray Data does not fail a pipeline that stops moving. An actor that died but keeps its pool slot,
or one that never gets its resources, leaves the write waiting forever, and nothing visible
happens. So the driver watches the rows at the sink (the :class:`~ray_jobs.job.progress.RowCounter`
the write tasks add to) and the rows that its executor's operators have taken in and put out. The
sink gets rows a file at a time (a write task bundles ``rows_per_file`` rows), so rows at the sink
alone would stand still for as long as a file takes; rows moving between any two operators are
progress too. Then

* :class:`StallClock` is the rule: no row moved for ``timeout_s`` (before the first one:
  ``timeout_s + grace_s``) is a stall;
* :func:`diagnose` reads the running executor's operators (queued input blocks, tasks in flight,
  rows in and out) and each actor pool's actors with their state in Ray's actor table
  (``PENDING_CREATION``, ``RESTARTING``, ``DEAD`` with its death cause), and names the stuck
  operator (:func:`stuck_operator`);
* :class:`StallWatchdog` is a daemon thread that, on a stall, prints the diagnosis, records a
  :class:`~ray_jobs.errors.PipelineStalled` and interrupts the driver's main thread (SIGINT to that
  thread: the blocked ``write_datasink`` returns with ``KeyboardInterrupt``, which
  :meth:`StallWatchdog.run` turns into the recorded error). Should the main thread not come back
  within ``exit_after_s``, the watchdog prints the error and ends the process with
  :data:`~ray_jobs.errors.STALL_EXIT_CODE`: a stalled job never hangs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ray_jobs.errors import STALL_EXIT_CODE, PipelineStalled
from ray_jobs.job.progress import PROGRESS_INTERVAL_S, print_line

log = logging.getLogger(__name__)

#: Ray's actor states that mean an actor is not working (ALIVE is; DEPENDENCIES_UNREADY waits
#: for its arguments, PENDING_CREATION for its resources, RESTARTING for a new process).
NOT_WORKING = ("DEAD", "RESTARTING", "PENDING_CREATION", "DEPENDENCIES_UNREADY")
#: Ray's actor states of an actor that lost its process.
BROKEN = ("DEAD", "RESTARTING")
#: Seconds the main thread has to stop after the interrupt before the process is ended.
EXIT_AFTER_S = 60.0
#: Characters kept of one actor's death cause in the one-line error.
DEATH_CAUSE_CHARS = 160


class StallClock:
    """The pipeline's progress mark (rows at the sink, rows moved between operators) and when it
    last changed. ``observe`` says whether the pipeline has stalled: no change for ``timeout_s``
    (before the first change: ``timeout_s + grace_s``)."""

    def __init__(self, timeout_s: float, *, now: float, grace_s: float = 0.0):
        if timeout_s <= 0 or grace_s < 0:
            raise ValueError(f"needs timeout_s > 0 and grace_s >= 0, got {timeout_s}, {grace_s}")
        self.timeout_s = timeout_s
        self.mark: object = None
        self.since = now
        self.deadline = now + timeout_s + grace_s

    def observe(self, mark: object, now: float) -> bool:
        """Record the progress *mark* at *now* (None: it could not be read, which is no progress);
        True once the pipeline has stalled."""
        if mark is None:
            return now >= self.deadline
        if self.mark is None:  # the first reading: the start, not a change
            self.mark = mark
        elif mark != self.mark:
            self.mark, self.since, self.deadline = mark, now, now + self.timeout_s
        return now >= self.deadline

    def idle_s(self, now: float) -> float:
        return now - self.since


@dataclass(frozen=True)
class ActorInfo:
    actor_id: str
    state: str
    class_name: str = ""
    pid: int | None = None
    restarts: int = 0
    death_cause: str = ""

    def text(self) -> str:
        pid = f" pid {self.pid}" if self.pid else ""
        restarts = f" restarts={self.restarts}" if self.restarts else ""
        cause = f": {_clip(self.death_cause)}" if self.death_cause and self.state == "DEAD" else ""
        return f"{self.class_name or 'actor'} {self.actor_id} {self.state}{pid}{restarts}{cause}"


@dataclass(frozen=True)
class OperatorInfo:
    label: str  # the pipeline's name for it: read, preprocess, stage0 .. stageK-1, write
    name: str  # Ray Data's
    finished: bool
    queued_blocks: int
    active_tasks: int
    rows_in: int
    rows_out: int
    actors: tuple[ActorInfo, ...] = ()

    @property
    def not_working(self) -> tuple[ActorInfo, ...]:
        return tuple(a for a in self.actors if a.state in NOT_WORKING)

    @property
    def broken(self) -> tuple[ActorInfo, ...]:
        return tuple(a for a in self.actors if a.state in BROKEN)

    @property
    def holds_work(self) -> bool:
        return self.queued_blocks > 0 or self.active_tasks > 0

    def text(self) -> str:
        head = (
            f"{self.label} ({self.name}): {'finished' if self.finished else 'running'}, rows in={self.rows_in} "
            f"out={self.rows_out}, {self.queued_blocks} input blocks queued, {self.active_tasks} tasks in flight"
        )
        if not self.actors:
            return head
        alive = sum(a.state == "ALIVE" for a in self.actors)
        troubled = "; ".join(a.text() for a in self.not_working)
        return f"{head}, actors {alive}/{len(self.actors)} alive" + (f"; {troubled}" if troubled else "")


def stuck_operator(operators: Iterable[OperatorInfo]) -> OperatorInfo | None:
    """Where the rows stopped: the most downstream unfinished operator with a dead or restarting
    actor, else the most downstream one with tasks in flight (tasks that do not finish), else the
    most downstream one with input queued (rows pile up in front of an operator that cannot start
    its tasks), else the first unfinished one. A pending actor alone does not name its operator: a
    pool growing past its reserved minimum waits for free capacity while the pipeline runs, and a
    pool with no actor at all holds its queued input."""
    running = [op for op in operators if not op.finished]
    for pick in (lambda op: op.broken, lambda op: op.active_tasks > 0, lambda op: op.queued_blocks > 0):
        hits = [op for op in running if pick(op)]
        if hits:
            return hits[-1]
    return running[0] if running else None


def stall_message(
    operators: list[OperatorInfo] | None, *, idle_s: float, timeout_s: float, rows_done: int, rows_total: int
) -> str:
    """The one-line error: how long nothing moved, and the stuck operator with its actors."""
    head = (
        f"pipeline stalled: no row moved for {idle_s:.0f} s (stall_timeout_s={timeout_s:g}; "
        f"rows at the sink {rows_done} of {rows_total})"
    )
    if operators is None:
        return f"{head}; the running pipeline's operators could not be read"
    stuck = stuck_operator(operators)
    if stuck is None:
        return f"{head}; every operator had finished"
    others = [
        f"{op.label} ({op.queued_blocks} queued, {op.active_tasks} in flight)"
        for op in reversed(operators)
        if op is not stuck and not op.finished and op.holds_work
    ]
    also = f"; also holding rows: {', '.join(others)}" if others else ""
    return f"{head}; stuck at {stuck.text()}{also}"


# ---------------------------------------------------------------------------- reading Ray


def label_operators(names: list[str]) -> list[str]:
    """The pipeline's names for Ray Data's operators, in pipeline order: ``read``, ``preprocess``,
    then ``stage0``, ``stage1``, ... (the model stages all look alike to Ray Data), ``write``."""
    labels, stage, preprocessed = [], 0, False
    for name in names:
        if name.startswith("Write") or "->Write" in name:
            labels.append("write")
        elif "Preprocessor" in name:
            labels.append("preprocess")
            preprocessed = True
        elif preprocessed:
            labels.append(f"stage{stage}")
            stage += 1
        elif "Read" in name:
            labels.append("read")
        else:
            labels.append(name)
    return labels


def running_executor():
    """This driver's running Ray Data executor (a thread named after its dataset), or None."""
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    found = [t for t in threading.enumerate() if isinstance(t, StreamingExecutor) and t.is_alive()]
    return found[-1] if found else None


def rows_moved(executor) -> int:
    """Rows *executor*'s operators have taken in and put out so far (0: no executor)."""
    if executor is None:
        return 0
    return sum(
        int(op.metrics.num_row_inputs_received) + int(op.metrics.rows_task_outputs_generated)
        for op in list(executor._topology)
    )


def _pool_actors(op) -> list[tuple[str, bool]]:
    """``(actor id, pending)`` for each actor of *op*'s pool (none: *op* runs tasks)."""
    pool = getattr(op, "_actor_pool", None)
    if pool is None:
        return []
    running = list(pool._running_actors)
    pending = list(pool._pending_actors.values())
    return [(h._actor_id.hex(), False) for h in running] + [(h._actor_id.hex(), True) for h in pending]


def read_operators(executor, actors: Callable[[list[str]], dict[str, ActorInfo]]) -> list[OperatorInfo]:
    """*executor*'s operators in pipeline order, each with its pool's actors as *actors* finds them."""
    topology = list(executor._topology.items())
    labels = label_operators([op.name for op, _ in topology])
    pools = [_pool_actors(op) for op, _ in topology]
    table = actors([actor_id for pool in pools for actor_id, _ in pool])
    out = []
    for (op, op_state), label, pool in zip(topology, labels, pools, strict=True):
        metrics = op.metrics
        out.append(
            OperatorInfo(
                label=label,
                name=op.name,
                finished=bool(op.has_execution_finished()),
                queued_blocks=int(op_state.total_enqueued_input_blocks()),
                active_tasks=int(op.num_active_tasks()),
                rows_in=int(metrics.num_row_inputs_received),
                rows_out=int(metrics.rows_task_outputs_generated),
                actors=tuple(
                    table.get(actor_id) or ActorInfo(actor_id, "PENDING_CREATION" if pending else "UNKNOWN")
                    for actor_id, pending in pool
                ),
            )
        )
    return out


def _death_text(cause) -> str:
    """The error message (and reason) of an actor's death cause, as the state API or the GCS
    table gives it (a nested dict, or its protobuf message)."""
    if cause is None or cause == "":
        return ""
    if not isinstance(cause, dict):
        try:
            from google.protobuf.json_format import MessageToDict

            cause = MessageToDict(cause, preserving_proto_field_name=True)
        except Exception:
            return str(cause)
    for value in cause.values():
        if isinstance(value, dict) and value.get("error_message"):
            reason = value.get("reason")
            return f"{reason}: {value['error_message']}" if reason else str(value["error_message"])
    return str(cause)


def _clip(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= DEATH_CAUSE_CHARS else text[: DEATH_CAUSE_CHARS - 3] + "..."


def actor_table(ids: list[str]) -> dict[str, ActorInfo]:
    """Ray's record of each actor in *ids*: from the state API (the dashboard's), or, where the
    cluster runs no dashboard, from the GCS's actor table that the state API reads."""
    if not ids:
        return {}
    import ray

    try:
        from ray.util.state import list_actors

        rows = list_actors(
            address=ray.get_runtime_context().gcs_address,
            filters=[("job_id", "=", ray.get_runtime_context().get_job_id())],
            detail=True,
            limit=10_000,
            timeout=10,
            raise_on_missing_output=False,
        )
        records = [r if isinstance(r, dict) else r.__dict__ for r in rows]
        keys = ("actor_id", "state", "class_name", "pid", "num_restarts", "death_cause")
    except Exception as exc:  # no dashboard: the state API's server is not there
        log.info("stall: state API unavailable (%s); reading the GCS actor table", type(exc).__name__)
        from ray._private import state

        records = list(state.actors().values())
        keys = ("ActorID", "State", "ActorClassName", "Pid", "NumRestarts", "DeathCause")
    wanted = set(ids)
    out = {}
    for r in records:
        actor_id, st, cls, pid, restarts, cause = (r.get(k) for k in keys)
        if actor_id in wanted:
            out[actor_id] = ActorInfo(
                actor_id, str(st), str(cls or ""), pid or None, int(restarts or 0), _death_text(cause)
            )
    return out


def diagnose() -> list[OperatorInfo] | None:
    """The running pipeline's operators with their actors (None: no executor runs here)."""
    executor = running_executor()
    return None if executor is None else read_operators(executor, actor_table)


# ---------------------------------------------------------------------------- the watchdog


class StallWatchdog:
    """Fail the pipeline that the ``with`` block runs once *progress* has not changed for
    *timeout_s*: see the module's docstring. *progress* returns ``(rows at the sink, rows moved
    between operators)``. Use::

        with StallWatchdog(progress, timeout_s=900, rows_total=n) as watchdog:
            watchdog.run(lambda: ds.write_datasink(sink))
    """

    def __init__(
        self,
        progress: Callable[[], tuple[int, int]],
        *,
        timeout_s: float,
        rows_total: int,
        grace_s: float = 0.0,
        poll_s: float | None = None,
        diagnose: Callable[[], list[OperatorInfo] | None] = diagnose,
        emit: Callable[[str], None] = print_line,
        exit_after_s: float = EXIT_AFTER_S,
        exit_process: Callable[[int], None] = os._exit,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.progress, self.timeout_s, self.rows_total, self.grace_s = progress, timeout_s, rows_total, grace_s
        self.rows_done = 0  # rows at the sink, as last read
        self.poll_s = poll_s if poll_s is not None else min(PROGRESS_INTERVAL_S, timeout_s / 4)
        self.diagnose, self.emit, self.clock = diagnose, emit, clock
        self.exit_after_s, self.exit_process = exit_after_s, exit_process
        #: the error, once the pipeline stalled
        self.stalled: PipelineStalled | None = None
        self._lock = threading.Lock()
        self._armed = False
        self._target: int | None = None  # the thread to interrupt: run()'s, when it is the main thread
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StallWatchdog:
        self._clock = StallClock(self.timeout_s, now=self.clock(), grace_s=self.grace_s)
        self._armed = True
        self._thread = threading.Thread(target=self._loop, name="stall-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._disarm()
        self._stop.set()
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 15)

    def run(self, fn: Callable[[], object]):
        """Call *fn* (the pipeline's write) so that a stall interrupts it and raises
        :class:`~ray_jobs.errors.PipelineStalled` (any error *fn* raised on the way out is chained)."""
        on_main = threading.current_thread() is threading.main_thread()
        previous = None
        if on_main:  # SIGINT must raise KeyboardInterrupt here, whatever handler was installed
            previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        self._target = threading.get_ident() if on_main else None
        try:
            try:
                result = fn()
                self._disarm()  # a stall recorded from here on is not ours; one recorded before is
            except BaseException as exc:
                self._disarm()
                if self.stalled is not None:
                    raise self.stalled from (None if isinstance(exc, KeyboardInterrupt) else exc)
                raise
            if self.stalled is not None:
                raise self.stalled
            return result
        except KeyboardInterrupt:  # our interrupt landed after fn returned or raised something else
            if self.stalled is not None:
                raise self.stalled from None
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _disarm(self) -> None:
        with self._lock:
            self._armed = False

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                mark = tuple(int(n) for n in self.progress())
                self.rows_done = mark[0] if mark[0] >= 0 else self.rows_done
            except Exception as exc:  # an unreadable counter is no progress
                log.warning("stall: the pipeline's progress unavailable (%s)", exc)
                mark = None
            now = self.clock()
            if self._clock.observe(mark, now):
                self._fire(self._clock.idle_s(now))
                return

    def _fire(self, idle_s: float) -> None:
        try:
            operators = self.diagnose()
        except Exception as exc:
            log.warning("stall: could not read the pipeline's operators (%s)", exc)
            operators = None
        error = PipelineStalled(
            stall_message(
                operators,
                idle_s=idle_s,
                timeout_s=self.timeout_s,
                rows_done=self.rows_done,
                rows_total=self.rows_total,
            )
        )
        with self._lock:
            if not self._armed:
                return
            self._armed = False
            self.stalled = error
            for op in operators or ():
                self.emit(f"stall: {op.text()}")
            self.emit(f"stall: {error}")
            if self._target is not None:
                signal.pthread_kill(self._target, signal.SIGINT)
        if not self._done.wait(self.exit_after_s):
            print(
                f"error: {error} (the driver did not stop within {self.exit_after_s:g} s; exiting)",
                file=sys.stderr,
                flush=True,
            )
            self.exit_process(STALL_EXIT_CODE)


def watch(job, totals: Callable[[], tuple[int, int]]) -> StallWatchdog:
    """The watchdog of *job*'s pipeline: rows at the sink from *totals* (``(ok, rejected)``), rows
    moved between operators from this driver's running executor.

    Under ``admission: none`` the pools wait for their actors inside the pipeline, for up to
    ``admission_timeout_s``: the first row gets that much more time."""
    cfg = job.config.job

    def progress() -> tuple[int, int]:
        try:
            at_sink = sum(totals())
        except Exception as exc:  # the counter's loss stops the reports, not the pipeline
            log.warning("stall: rows at the sink unavailable (%s)", exc)
            at_sink = -1
        try:
            moved = rows_moved(running_executor())
        except Exception as exc:  # Ray Data's executor changed shape: the sink alone still counts
            log.warning("stall: the executor's row counts unavailable (%s)", exc)
            moved = -1
        return at_sink, moved

    return StallWatchdog(
        progress,
        timeout_s=cfg.stall_timeout_s,
        rows_total=job.rows_in,
        grace_s=cfg.admission_timeout_s if cfg.admission == "none" else 0.0,
    )
