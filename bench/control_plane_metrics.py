"""The figures of ``bench/control_plane_scale.py``, as pure functions: the job delays, the ideal
schedule they allow, CPU time of process trees from ``/proc``, the embed phase from task
instances, and the linear extrapolation to more partitions.
"""

from __future__ import annotations

import heapq
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

FINISHED = frozenset({"success", "failed", "skipped", "upstream_failed", "removed"})


class MetricsError(ValueError):
    """Input the figures cannot be computed from (named in the message)."""


# ---------------------------------------------------------------------------------------------- jobs
def seeded_delays(n: int, min_s: float, max_s: float, seed: int) -> list[float]:
    """Partition *k*'s job delay, uniform in ``[min_s, max_s]``; the same for the same seed."""
    if n < 1:
        raise MetricsError(f"need at least one partition, got {n}")
    if not 0 <= min_s <= max_s:
        raise MetricsError(f"need 0 <= min delay <= max delay, got {min_s} and {max_s}")
    rng = random.Random(seed)
    return [round(rng.uniform(min_s, max_s), 3) for _ in range(n)]


def ideal_makespan(delays: Sequence[float], limit: int) -> float:
    """Wall time of the jobs scheduled greedily in index order with at most *limit* at once and
    no overhead at all: job *k* starts the moment a slot frees (the DAG's in-flight gate admits
    in index order too). This is the "slowest job chain" a perfect control plane would take."""
    if limit < 1:
        raise MetricsError(f"in-flight limit must be >= 1, got {limit}")
    slots = [0.0] * min(limit, max(1, len(delays)))
    end = 0.0
    for d in delays:
        start = heapq.heappop(slots)
        heapq.heappush(slots, start + d)
        end = max(end, start + d)
    return end


def peak_concurrent(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals ``(start, end)`` open at one instant (one ending at *t* has closed
    before one starting at *t* opens)."""
    spans = list(intervals)
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    peak = cur = 0
    for _, step in edges:
        cur += step
        peak = max(peak, cur)
    return peak


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (*q* in 0..100) of a non-empty sample."""
    if not values:
        raise MetricsError("percentile of an empty sample")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


# ---------------------------------------------------------------------------------------------- CPU
@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    own_ticks: int  # utime + stime
    children_ticks: int  # cutime + cstime: children it has waited for


def parse_proc_stat(text: str) -> ProcStat:
    """One ``/proc/<pid>/stat`` line. The command name may hold spaces and parentheses, so
    the fields are counted from the *last* ``)``."""
    head, sep, rest = text.rpartition(")")
    if not sep:
        raise MetricsError(f"not a /proc/<pid>/stat line: {text[:80]!r}")
    try:
        pid = int(head.split("(", 1)[0])
        fields = rest.split()
        # fields[0] is the state (field 3 of proc(5)); utime..cstime are fields 14..17
        return ProcStat(pid, int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))
    except (IndexError, ValueError) as exc:
        raise MetricsError(f"unreadable /proc/<pid>/stat line {text[:80]!r}: {exc}") from exc


def read_stats(proc: str = "/proc") -> dict[int, ProcStat]:
    """Every live process's stat; processes that exit while being read are left out."""
    out: dict[int, ProcStat] = {}
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(proc, name, "stat")) as fh:
                out[int(name)] = parse_proc_stat(fh.read())
        except (OSError, MetricsError):
            continue
    return out


def descendants(stats: Mapping[int, ProcStat], root: int) -> set[int]:
    """*root* and every live process below it."""
    children: dict[int, list[int]] = {}
    for s in stats.values():
        children.setdefault(s.ppid, []).append(s.pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in found or pid not in stats:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


def tree_cpu_ticks(stats: Mapping[int, ProcStat], root: int) -> int:
    """CPU ticks of a process tree: every live member's own time plus the time of the children
    each has reaped (a reaped child's time moves into its parent's ``cutime``, so nothing is
    counted twice; a child orphaned to init before exiting is lost, which Airflow's
    components do not do)."""
    return sum(stats[p].own_ticks + stats[p].children_ticks for p in descendants(stats, root))


def ticks_to_seconds(ticks: int) -> float:
    return ticks / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------- run
def parse_ts(value: str | None) -> float | None:
    """An ISO 8601 timestamp from the REST API as epoch seconds."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class EmbedPhase:
    start: float  # the first embed task's start
    end: float  # the last embed task's end
    tasks: int
    succeeded: int

    @property
    def wall_s(self) -> float:
        return self.end - self.start


def embed_phase(task_instances: Iterable[Mapping[str, Any]], task_id: str = "embed") -> EmbedPhase:
    """First start to last end over the mapped *task_id* instances (REST ``taskInstances``)."""
    tis = [t for t in task_instances if t.get("task_id") == task_id]
    if not tis:
        raise MetricsError(f"no {task_id!r} task instances in the run")
    unfinished = [t["map_index"] for t in tis if t.get("state") not in FINISHED]
    if unfinished:
        raise MetricsError(f"{task_id!r} map indices still unfinished: {unfinished[:20]}")
    starts = [parse_ts(t.get("start_date")) for t in tis]
    ends = [parse_ts(t.get("end_date")) for t in tis]
    if None in starts or None in ends:
        raise MetricsError(f"a finished {task_id!r} task instance has no start or end date")
    return EmbedPhase(min(starts), max(ends), len(tis), sum(t.get("state") == "success" for t in tis))


@dataclass(frozen=True)
class ScaleFigures:
    """One run's figures, and a linear extrapolation to more partitions."""

    partitions: int
    limit: int
    wall_s: float
    ideal_s: float
    triggerer_cpu_s: float
    scheduler_cpu_s: float

    def __post_init__(self) -> None:
        if self.partitions < 1 or self.limit < 1:
            raise MetricsError(f"partitions and limit must be >= 1, got {self.partitions}, {self.limit}")

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.ideal_s

    @property
    def overhead_per_partition_s(self) -> float:
        return self.overhead_s / self.partitions

    def extrapolate(self, partitions: int, ideal_s: float) -> dict[str, float]:
        """Assumes Airflow's overhead and CPU grow linearly with the partition count at the same
        in-flight limit (each partition costs the same task starts, trigger runs and polls);
        *ideal_s* is that count's own ideal schedule."""
        scale = partitions / self.partitions
        return {
            "partitions": partitions,
            "ideal_s": ideal_s,
            "overhead_s": self.overhead_s * scale,
            "wall_s": ideal_s + self.overhead_s * scale,
            "triggerer_cpu_s": self.triggerer_cpu_s * scale,
            "scheduler_cpu_s": self.scheduler_cpu_s * scale,
        }
