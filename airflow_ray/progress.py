"""A job's progress lines: parsed from its log, and written into the task log once per poll.

A Ray job that reports progress prints, every few seconds, one line of ``key=value`` figures
after the prefix ``progress:``::

    progress: rows_done=500000 rows_total=1000000 rows_rejected=12 rows_per_s=1234.5 eta_s=405

Every figure is optional except ``rows_done``. The trigger following the job's log keeps only
the newest such line of each poll and writes it in words (:meth:`Progress.describe`), so a
job that reports every second costs one task-log line per poll, within the log budget.
Nothing here knows what the job computes: any job printing this line gets it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

PREFIX = "progress:"
_PAIR = re.compile(r"([a-z_]+)=(\S+)")


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def duration(seconds: float) -> str:
    """``45s``, ``6m45s``, ``2h05m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass(frozen=True)
class Progress:
    rows_done: int
    rows_total: int | None = None
    rows_rejected: int | None = None
    rows_per_s: float | None = None
    eta_s: float | None = None

    def __post_init__(self) -> None:
        if self.rows_done < 0 or (self.rows_total is not None and self.rows_total < 0):
            raise ValueError(f"progress counts must be >= 0, got {self.rows_done}/{self.rows_total}")

    @classmethod
    def parse(cls, line: str) -> Progress | None:
        """The figures of a progress line (the prefix may follow a log record's own prefix), or
        None for any other line, or one whose ``rows_done`` is missing or not a count."""
        at = line.find(PREFIX)
        if at < 0:
            return None
        values = {k: _number(v) for k, v in _PAIR.findall(line[at + len(PREFIX) :])}
        done = values.get("rows_done")
        if done is None or done < 0:
            return None
        total = values.get("rows_total")
        rejected = values.get("rows_rejected")
        return cls(
            rows_done=int(done),
            rows_total=int(total) if total is not None and total >= 0 else None,
            rows_rejected=int(rejected) if rejected is not None and rejected >= 0 else None,
            rows_per_s=values.get("rows_per_s"),
            eta_s=values.get("eta_s"),
        )

    def describe(self, partition: int | str | None = None) -> str:
        """``partition 17: 500,000 of 1,000,000 rows (50.0%) · 1,234.5 rows/s · 12 rejected · ETA 6m45s``."""
        head = f"partition {partition}: " if partition is not None else ""
        rows = f"{self.rows_done:,}"
        if self.rows_total:
            rows += f" of {self.rows_total:,} rows ({100.0 * self.rows_done / self.rows_total:.1f}%)"
        else:
            rows += " rows"
        parts = [rows]
        if self.rows_per_s is not None:
            parts.append(f"{self.rows_per_s:,.1f} rows/s")
        if self.rows_rejected is not None:
            parts.append(f"{self.rows_rejected:,} rejected")
        if self.eta_s is not None:
            parts.append(f"ETA {duration(self.eta_s)}")
        return f"progress: {head}" + " · ".join(parts)


def split_progress(lines: Iterable[str]) -> tuple[list[str], Progress | None]:
    """*lines* without their progress lines, and the newest progress they held."""
    others, latest = [], None
    for line in lines:
        progress = Progress.parse(line)
        if progress is None:
            others.append(line)
        else:
            latest = progress
    return others, latest
