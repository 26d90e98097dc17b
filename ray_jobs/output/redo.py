"""Which committed partitions a run embeds again: named ones, or those with rejects of a given reason.

After an outage a night may commit partitions whose rows were rejected for a reason outside
the data (say ``access denied`` while a credential was revoked) within ``max_reject_rate``,
or above it, so validation fails and clearing the run skips them: they are committed. The
DAG's ``redo_partitions`` (``3,7,10-12``) and ``redo_rejects`` (reject reasons as the report
lists them, comma-separated: ``access denied,unreadable object``) pick such partitions, and
only those, to be embedded again; their new commit replaces the old one atomically (the old
marker is kept in ``_history/``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ray_jobs.contract.marker import CommitMarker
from ray_jobs.contract.plan import Plan

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_partitions(spec: str) -> set[int]:
    """``3,7,10-12`` -> {3, 7, 10, 11, 12}; raises ValueError naming the bad item."""
    out: set[int] = set()
    for item in spec.split(","):
        if not item.strip():
            continue
        m = _RANGE.match(item)
        if not m:
            raise ValueError(f"redo_partitions: {item.strip()!r} is not a partition index or range (e.g. 3,7,10-12)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"redo_partitions: range {item.strip()!r} runs backwards")
        out.update(range(lo, hi + 1))
    return out


def partitions_to_redo(
    plan: Plan,
    committed: Mapping[int, CommitMarker],
    partitions: str | None,
    rejects: str | None,
) -> list[int]:
    """The committed partitions of *plan* to embed again: those *partitions* names and those
    whose marker counts rejects for one of the reasons *rejects* lists."""
    chosen: set[int] = set()
    if partitions:
        chosen = parse_partitions(partitions)
        beyond = sorted(i for i in chosen if i >= len(plan.partitions))
        if beyond:
            raise ValueError(
                f"redo_partitions: the plan has partitions 0..{len(plan.partitions) - 1}, not {beyond[:5]}"
            )
    if rejects:
        reasons = {r.strip() for r in rejects.split(",") if r.strip()}
        chosen |= {i for i, m in committed.items() if reasons & set(m.rejects_by_reason)}
    return sorted(i for i in chosen if i in committed)
