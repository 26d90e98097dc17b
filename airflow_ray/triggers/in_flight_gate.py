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
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

#: A task instance in one of these states holds no slot.
FINISHED = frozenset({"success", "failed", "skipped", "upstream_failed", "removed"})


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


class InFlightGateTrigger(BaseTrigger):
    """Fires ``{"status": "open"}`` when this map index may start, or ``{"status": "timeout"}``
    at the task's absolute deadline."""

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
        waited_from = time.time()
        while True:
            states = await asyncio.to_thread(fetch_states, self.dag_id, self.run_id, self.task_id)
            ahead = unfinished_ahead(states, self.map_index)
            if ahead < self.limit:
                yield TriggerEvent({"status": "open", "waited_s": round(time.time() - waited_from, 1)})
                return
            if self.deadline is not None and time.time() >= self.deadline:
                yield TriggerEvent(
                    {"status": "timeout", "ahead": ahead, "waited_s": round(time.time() - waited_from, 1)}
                )
                return
            await asyncio.sleep(self.poll_interval)
