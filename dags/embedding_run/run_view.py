"""One run's figures for its run page: from its report, or while it runs, from its progress.

A run's directory is the plan's (``{output}/runs/{run_id}/``, from the ``plan`` task's XCom).
It holds ``report.json`` once the report step ran (:mod:`ray_jobs.output.report`, with the
last nights' figures in its ``history``) and, while partitions run, one
``progress/partition=NNNNN.json`` per partition (:mod:`ray_jobs.job.progress`). The page shows
whichever exists: a partition the report does not cover yet shows its latest progress.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: the task whose XCom names the run's plan (``plan_uri``)
PLAN_TASK = "plan"


class RunNotFound(LookupError):
    """No such run, or it has not planned its partitions yet."""


@dataclass(frozen=True)
class RunView:
    dag_id: str
    run_id: str
    state: str
    run_dir: str
    report: dict[str, Any] | None = None
    progress: tuple[dict[str, Any], ...] = ()
    partitions_planned: int | None = None
    problems: tuple[str, ...] = field(default_factory=tuple)

    def figures(self) -> dict[str, Any]:
        """The headline figures the page shows, each as report.json has it."""
        r = self.report or {}
        catalog = r.get("catalog") or {}
        balance = r.get("stage_balance") or {}
        return {
            "valid": r.get("valid"),
            "partitions": len(r.get("partitions") or ()) or self.partitions_planned,
            "rows_in": r.get("rows_in"),
            "rows_ok": r.get("rows_ok"),
            "rows_rejected": r.get("rows_rejected"),
            "rows_per_s": r.get("rows_per_s"),
            "wall_s": r.get("wall_s"),
            "bottleneck": balance.get("bottleneck"),
            "cost_usd": (r.get("cost") or {}).get("total_usd"),
            "table": catalog.get("table"),
            "snapshot_id": catalog.get("snapshot_id"),
        }

    def partition_rows(self) -> list[dict[str, Any]]:
        """Per partition: index, state, rows done / total, rows/s; from the report where it has
        the partition, else from its progress."""
        reported = {p["index"]: p for p in (self.report or {}).get("partitions") or ()}
        rows = {
            i: {
                "index": i,
                "state": "ok" if p.get("status") == "ok" else "failed",
                "rows_done": p.get("rows_in"),
                "rows_total": p.get("rows_planned"),
                "rows_per_s": p.get("rows_per_s"),
            }
            for i, p in reported.items()
        }
        for p in self.progress:
            i = p.get("partition")
            if isinstance(i, int) and i not in rows:
                rows[i] = {
                    "index": i,
                    "state": p.get("state", "running"),
                    "rows_done": p.get("rows_done"),
                    "rows_total": p.get("rows_total"),
                    "rows_per_s": p.get("rows_per_s"),
                    "eta_s": p.get("eta_s"),
                }
        return [rows[i] for i in sorted(rows)]

    def trend(self) -> list[dict[str, Any]]:
        """This run and the nights before it (the report's ``history``), oldest first."""
        r = self.report
        if not r:
            return []
        this = {
            "run_id": r.get("run_id"),
            "finished_at": r.get("finished_at"),
            "rows_in": r.get("rows_in"),
            "rows_per_s": r.get("rows_per_s"),
            "wall_s": r.get("wall_s"),
            "cost_usd": (r.get("cost") or {}).get("total_usd"),
        }
        return [*reversed(r.get("history") or []), this]


def plan_uri_of(dag_id: str, run_id: str) -> tuple[str, str]:
    """``(state, plan_uri)`` of the run, from Airflow's metadata database."""
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        state = session.scalar(select(DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
        if state is None:
            raise RunNotFound(f"no run {run_id!r} of {dag_id!r}")
        value = session.scalar(
            select(XComModel.value).where(
                XComModel.dag_id == dag_id,
                XComModel.run_id == run_id,
                XComModel.task_id == PLAN_TASK,
                XComModel.key == "return_value",
                XComModel.map_index == -1,
            )
        )
    planned = XComModel.deserialize_value(_Row(value)) if value is not None else None
    if not isinstance(planned, dict) or not planned.get("plan_uri"):
        raise RunNotFound(f"run {run_id!r} has not planned its partitions yet (state {state})")
    return str(state), planned["plan_uri"]


@dataclass(frozen=True)
class _Row:
    """What :meth:`XComModel.deserialize_value` reads: an object with a ``value``."""

    value: Any


def load_run_view(dag_id: str, run_id: str, state: str, plan_uri: str) -> RunView:
    """The run's report and progress, read from its directory beside *plan_uri*."""
    from ray_jobs import storage
    from ray_jobs.contract.layout import join_uri
    from ray_jobs.job.progress import PROGRESS_DIR

    run_dir = plan_uri.rstrip("/").rsplit("/", 1)[0]
    problems: list[str] = []
    report = None
    try:
        report = json.loads(storage.read_text(join_uri(run_dir, "report.json")))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        problems.append(f"report.json unreadable: {exc}")
    progress = []
    try:
        for uri in storage.list_files(join_uri(run_dir, PROGRESS_DIR)):
            try:
                progress.append(json.loads(storage.read_text(uri)))
            except (OSError, ValueError) as exc:
                problems.append(f"{uri} unreadable: {exc}")
    except OSError as exc:
        problems.append(f"progress unreadable: {exc}")
    planned = None
    try:
        planned = len(json.loads(storage.read_text(plan_uri)).get("partitions") or ())
    except (OSError, ValueError) as exc:
        problems.append(f"plan unreadable: {exc}")
    return RunView(dag_id, run_id, state, run_dir, report, tuple(progress), planned, tuple(problems))
