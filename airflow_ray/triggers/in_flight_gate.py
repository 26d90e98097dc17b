"""Bounded concurrency for the map indices of a mapped task: a sliding window over them.

Map index *i* may submit its Ray job once fewer than ``limit`` of the indices below it are
unfinished. The rule needs no lock and no counter, only the task instances' states, and
still admits at most ``limit`` tasks at a time: when the highest admitted index *m* passed,
fewer than ``limit`` indices below it were unfinished, and finished tasks stay finished.
It is work-conserving in index order (a task finishing anywhere below *i* opens a slot)
and immune to races between tasks checking at the same moment (each decides from states,
not from what others are about to do). A task waiting its turn is deferred here, holding
no worker slot; the states come from the Task SDK's supervisor channel, as in Airflow's own
``WorkflowTrigger``.

What a check costs, whatever the number of map indices N (:class:`GateBoard`):

- The indices below ``limit`` are open without reading anything.
- One number, how many of the task's map indices are finished (``F``, an SQL ``COUNT``
  through the supervisor channel), proves most waiting indices closed: fewer than ``i - F``
  lower indices can be finished, so ``i - F >= limit`` means at least ``limit`` are not.
- Only an index within ``limit`` of that frontier needs the states themselves; they are read
  once per change of ``F`` and kept as a sorted list of the unfinished indices, from which
  any index's count below it is a binary search.
- In the triggerer every waiting gate of one task shares one board per process: one ``COUNT``
  per poll interval for all of them, and one read of the states per poll interval at most,
  only when something finished. A gate's own poll is a dictionary lookup and a bisection.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

#: A task instance in one of these states holds no slot.
FINISHED = frozenset({"success", "failed", "skipped", "upstream_failed", "removed"})
#: The states read again from scratch at least this often, even if the finished count has not
#: moved (a task cleared while another finished leaves the count as it was).
FULL_READ_EVERY_S = 60.0


def unfinished_ahead(states: Mapping[int, str | None], map_index: int) -> int:
    """How many indices below *map_index* are not finished (queued, running, deferred, waiting a retry...)."""
    return sum(1 for i, state in states.items() if i < map_index and state not in FINISHED)


def gate_open(states: Mapping[int, str | None], map_index: int, limit: int) -> bool:
    return unfinished_ahead(states, map_index) < limit


def mapped_states(task_states: Mapping[str, Mapping[str, Any]], run_id: str, task_id: str) -> dict[int, str | None]:
    """``{map_index: state}`` from ``RuntimeTaskInstance.get_task_states`` (keys ``{task_id}_{map_index}``)."""
    pattern = re.compile(re.escape(task_id) + r"_(\d+)$")
    out: dict[int, str | None] = {}
    for key, state in (task_states.get(run_id) or {}).items():
        m = pattern.match(key)
        if m:
            out[int(m.group(1))] = state
    return out


def fetch_states(dag_id: str, run_id: str, task_id: str) -> dict[int, str | None]:
    """The states of every map index of *task_id* in this run (blocking; the Task SDK's channel)."""
    # private: no public API reads task states from a trigger (Airflow's standard/cncf triggers import it too)
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    raw = RuntimeTaskInstance.get_task_states(dag_id=dag_id, task_ids=[task_id], run_ids=[run_id])
    return mapped_states(raw, run_id, task_id)


def fetch_finished_count(dag_id: str, run_id: str, task_id: str) -> int:
    """How many map indices of *task_id* in this run are finished: one number (an SQL COUNT)."""
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    return RuntimeTaskInstance.get_ti_count(
        dag_id=dag_id, task_ids=[task_id], run_ids=[run_id], states=sorted(FINISHED)
    )


def slot_wait_bound(ahead: int, limit: int, job_timeout_s: float, tries: int = 1, slack_s: float = 600.0) -> float:
    """Seconds a partition with *ahead* unfinished partitions below it may wait for a slot: the
    queue ahead drains in waves of *limit* jobs, each try of each bounded by *job_timeout_s*, so
    ``ceil(ahead * tries / limit)`` waves at most, plus *slack_s* for Airflow's own latencies."""
    if limit < 1 or job_timeout_s <= 0:
        raise ValueError(f"need limit >= 1 and job_timeout_s > 0, got {limit}, {job_timeout_s}")
    waves = math.ceil(max(0, ahead) * max(1, tries) / limit)
    return waves * float(job_timeout_s) + slack_s


@dataclass
class _Snapshot:
    finished: int  # the finished count when the states were read
    unfinished: list[int]  # sorted map indices not finished
    read_at: float


@dataclass
class GateBoard:
    """What the gates of one mapped task know about its map indices, shared by every gate of it
    in one process; refreshed at most once per *max_age_s*, by whichever gate asks first."""

    dag_id: str
    run_id: str
    task_id: str
    max_age_s: float = 5.0
    #: the two calls (default: the supervisor channel's, :func:`fetch_finished_count` and :func:`fetch_states`)
    count_fn: Callable[[str, str, str], int] | None = None
    states_fn: Callable[[str, str, str], Mapping[int, str | None]] | None = None
    users: int = 0
    finished: int | None = None
    counted_at: float = float("-inf")
    snapshot: _Snapshot | None = None
    #: calls made, for the figures: how many COUNTs and how many reads of every state
    counts: int = 0
    full_reads: int = 0
    _lock: asyncio.Lock | None = field(default=None, repr=False)

    async def unfinished_below(self, map_index: int, limit: int) -> int:
        """Below *limit*: the gate is open (the indices below *limit* need no read; above them
        the exact count). At or above *limit*: closed (a lower bound of the count, or the count)."""
        if map_index < limit:
            return map_index
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one refresh at a time; the others reuse it
            now = time.monotonic()
            if now - self.counted_at >= self.max_age_s:
                count = self.count_fn or fetch_finished_count
                self.finished = await asyncio.to_thread(count, self.dag_id, self.run_id, self.task_id)
                self.counts += 1
                self.counted_at = now
            lower_bound = map_index - int(self.finished or 0)
            if lower_bound >= limit:
                return lower_bound
            snap = self.snapshot
            if snap is None or snap.finished != self.finished or now - snap.read_at >= FULL_READ_EVERY_S:
                read = self.states_fn or fetch_states
                states = await asyncio.to_thread(read, self.dag_id, self.run_id, self.task_id)
                self.full_reads += 1
                self.snapshot = _Snapshot(
                    int(self.finished or 0), sorted(i for i, s in states.items() if s not in FINISHED), now
                )
        return self._exact(map_index)

    def _exact(self, map_index: int) -> int:
        return bisect.bisect_left(self.snapshot.unfinished, map_index)


_BOARDS: dict[tuple[int, str, str, str], GateBoard] = {}


def join_board(dag_id: str, run_id: str, task_id: str, max_age_s: float) -> GateBoard:
    """This process's board for the task (one per event loop), with one more user."""
    key = (id(asyncio.get_running_loop()), dag_id, run_id, task_id)
    board = _BOARDS.get(key)
    if board is None:
        board = _BOARDS[key] = GateBoard(dag_id, run_id, task_id, max_age_s)
    board.max_age_s = min(board.max_age_s, max_age_s)
    board.users += 1
    return board


def leave_board(board: GateBoard) -> None:
    board.users -= 1
    if board.users <= 0:
        for key, known in list(_BOARDS.items()):
            if known is board:
                del _BOARDS[key]


def may_start_now(dag_id: str, run_id: str, task_id: str, map_index: int, limit: int) -> tuple[bool, int]:
    """The gate checked once from a worker (blocking): ``(open, unfinished below or a lower
    bound of it)``. Reads every state only when the finished count cannot decide."""
    if map_index < limit:
        return True, 0
    lower_bound = map_index - fetch_finished_count(dag_id, run_id, task_id)
    if lower_bound >= limit:
        return False, lower_bound
    ahead = unfinished_ahead(fetch_states(dag_id, run_id, task_id), map_index)
    return ahead < limit, ahead


class InFlightGateTrigger(BaseTrigger):
    """Fires ``{"status": "open"}`` when this map index may start, or ``{"status": "timeout"}``
    at ``deadline`` (epoch seconds: the bound of the wait for a slot, not of the job)."""

    def __init__(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        map_index: int,
        limit: int,
        poll_interval: float = 5.0,
        deadline: float | None = None,
    ):
        super().__init__()
        self.dag_id = dag_id
        self.run_id = run_id
        self.task_id = task_id
        self.map_index = map_index
        self.limit = limit
        self.poll_interval = poll_interval
        self.deadline = deadline

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "dag_id": self.dag_id,
                "run_id": self.run_id,
                "task_id": self.task_id,
                "map_index": self.map_index,
                "limit": self.limit,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent(
            await wait_for_slot(
                self.dag_id, self.run_id, self.task_id, self.map_index, self.limit, self.poll_interval, self.deadline
            )
        )


async def wait_for_slot(
    dag_id: str,
    run_id: str,
    task_id: str,
    map_index: int,
    limit: int,
    poll_interval: float = 5.0,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Wait (in a triggerer) until *map_index* may start: ``{"status": "open", "waited_s"}``, or
    ``{"status": "timeout", "ahead", "waited_s"}`` at *deadline* (epoch seconds)."""
    waited_from = time.time()
    board = join_board(dag_id, run_id, task_id, poll_interval)
    try:
        while True:
            ahead = await board.unfinished_below(map_index, limit)
            if ahead < limit:
                return {"status": "open", "waited_s": round(time.time() - waited_from, 1)}
            if deadline is not None and time.time() >= deadline:
                return {"status": "timeout", "ahead": ahead, "waited_s": round(time.time() - waited_from, 1)}
            await asyncio.sleep(poll_interval)
    finally:
        leave_board(board)
