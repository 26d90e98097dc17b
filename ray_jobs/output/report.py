"""The run report: per-partition counts, rejects by reason, throughput; JSON and Markdown.

Written next to the plan (``{output}/runs/{run_id}/report.json`` and ``report.md``); its
one-line summary is what the DAG logs and sets as the run's note.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from typing import Any

from ray_jobs import storage
from ray_jobs.contract.layout import join_uri
from ray_jobs.contract.plan import Plan
from ray_jobs.output.validate import ValidationReport

#: Start-up figures a commit marker's timings carry (:mod:`ray_jobs.job.startup`), in report order,
#: with their labels.
STARTUP_LABELS = {
    "startup_driver_s": "driver start",
    "startup_admission_wait_s": "admission wait",
    "startup_actor_start_s": "actor start",
    "startup_model_load_s": "model load",
    "time_to_first_batch_s": "first batch",
}
STARTUP_KEYS = tuple(STARTUP_LABELS)


def startup_medians(partitions) -> dict[str, float]:
    """Per start-up figure, its median over the partitions that recorded it."""
    import statistics

    out = {}
    for key in STARTUP_KEYS:
        values = [p["startup"][key] for p in partitions if key in p.get("startup", {})]
        if values:
            out[key] = round(statistics.median(values), 3)
    return out


@dataclass(frozen=True)
class RunReport:
    run_id: str
    plan_id: str
    model_id: str
    output_uri: str
    partitions: tuple[dict[str, Any], ...]
    rejects_by_reason: dict[str, int]
    rows_in: int
    rows_ok: int
    rows_rejected: int
    wall_s: float | None
    valid: bool
    problems: tuple[str, ...] = ()
    catalog: dict[str, Any] = field(default_factory=dict)
    #: :meth:`ray_jobs.perf.stage_balance.Recommendation.to_dict` of the committed partitions' stage stats
    stage_balance: dict[str, Any] = field(default_factory=dict)
    stage_balance_lines: tuple[str, ...] = ()

    @property
    def rows_per_s(self) -> float | None:
        return self.rows_in / self.wall_s if self.wall_s else None

    def summary(self) -> str:
        rate = f" rows/s={self.rows_per_s:.1f}" if self.rows_per_s else ""
        wall = f" wall={self.wall_s:.0f}s" if self.wall_s else ""
        table = f" table={self.catalog['table']}@{self.catalog['snapshot_id']}" if self.catalog else ""
        verdict = "OK" if self.valid else "FAILED"
        return (
            f"{verdict}: partitions={len(self.partitions)} rows_in={self.rows_in} rows_ok={self.rows_ok} "
            f"rows_rejected={self.rows_rejected}{rate}{wall}{table}"
        )

    def to_json(self) -> str:
        data = {k: v for k, v in self.__dict__.items() if k != "stage_balance_lines"}
        data["rows_per_s"] = self.rows_per_s
        data["startup_median"] = startup_medians(self.partitions)
        data["summary"] = self.summary()
        return json.dumps(data, indent=2, sort_keys=True)

    def to_markdown(self) -> str:
        lines = [
            f"# Embedding run `{self.run_id}`",
            "",
            f"**{self.summary()}**",
            "",
            f"- plan `{self.plan_id}`, model `{self.model_id}`",
            f"- output `{self.output_uri}`",
        ]
        if self.catalog:
            lines.append(f"- Iceberg table `{self.catalog['table']}`, snapshot `{self.catalog['snapshot_id']}`")
        lines += ["", "| partition | rows in | ok | rejected | rows/s | status |", "|---:|---:|---:|---:|---:|---|"]
        for p in self.partitions:
            rate = f"{p['rows_per_s']:.1f}" if p.get("rows_per_s") else "-"
            lines.append(
                f"| {p['index']} | {p.get('rows_in', '-')} | {p.get('rows_ok', '-')} | {p.get('rows_rejected', '-')} "
                f"| {rate} | {p['status']} |"
            )
        medians = startup_medians(self.partitions)
        if medians:
            lines += [
                "",
                "## Start-up (seconds)",
                "",
                "Driver start is the driver process's start to its pipeline's start, less the admission wait;",
                "actor start runs to the last actor having started and imported its libraries; model load is",
                "that actor's; first batch counts from the pipeline's start to the first batch at the sink.",
                "",
                "| partition | " + " | ".join(STARTUP_LABELS.values()) + " |",
                "|---:|" + "---:|" * len(STARTUP_KEYS),
            ]
            for p in self.partitions:
                if p.get("startup"):
                    cells = [f"{p['startup'][k]:.1f}" if k in p["startup"] else "-" for k in STARTUP_KEYS]
                    lines.append(f"| {p['index']} | " + " | ".join(cells) + " |")
            cells = [f"{medians[k]:.1f}" if k in medians else "-" for k in STARTUP_KEYS]
            lines.append("| **median** | " + " | ".join(cells) + " |")
        lines += ["", "## Rejects by reason", ""]
        if self.rejects_by_reason:
            lines += ["| reason | rows |", "|---|---:|"]
            lines += [f"| {reason} | {n} |" for reason, n in sorted(self.rejects_by_reason.items())]
        else:
            lines.append("None.")
        lines += ["", "## Stage balance", ""]
        lines += list(self.stage_balance_lines) or ["No stage statistics in the committed markers."]
        if self.problems:
            lines += ["", "## Problems", "", *(f"- {p}" for p in self.problems)]
        return "\n".join(lines) + "\n"


def build_report(
    plan: Plan,
    validation: ValidationReport,
    wall_s: float | None = None,
    catalog: dict[str, Any] | None = None,
) -> RunReport:
    parts, reasons = [], collections.Counter()
    for check in validation.checks:
        entry: dict[str, Any] = {
            "index": check.index,
            "rows_planned": check.rows_planned,
            "status": "ok" if check.ok else "; ".join(check.problems),
        }
        if check.rows_in is not None:
            entry.update(rows_in=check.rows_in, rows_ok=check.rows_ok, rows_rejected=check.rows_rejected)
            reasons.update(check.rejects_by_reason)
            if check.attempt:
                entry["attempt"] = check.attempt
            if check.timings.get("rows_per_s"):
                entry["rows_per_s"] = check.timings["rows_per_s"]
            startup = {k: check.timings[k] for k in STARTUP_KEYS if k in check.timings}
            if startup:
                entry["startup"] = startup
        parts.append(entry)
    return RunReport(
        run_id=plan.run_id,
        plan_id=plan.plan_id,
        model_id=validation.model_id,
        output_uri=plan.output_uri,
        partitions=tuple(parts),
        rejects_by_reason=dict(sorted(reasons.items())),
        rows_in=validation.rows_in,
        rows_ok=validation.rows_ok,
        rows_rejected=validation.rows_rejected,
        wall_s=wall_s,
        valid=validation.ok,
        problems=tuple(validation.problems()),
        catalog=dict(catalog or {}),
        **_stage_balance(validation),
    )


def _stage_balance(validation: ValidationReport) -> dict[str, Any]:
    """The bottleneck and a recommended layout from the committed partitions' stage statistics."""
    from ray_jobs.errors import UsageError
    from ray_jobs.perf.stage_balance import merge_stage_stats, most_common_layout, rates_from_stats, recommend

    groups = most_common_layout((c.stages, c.stage_stats) for c in validation.checks if c.ok)
    if not groups:
        return {}
    try:
        rec = recommend(rates_from_stats(merge_stage_stats(groups)))
    except UsageError as exc:
        return {"stage_balance": {"error": str(exc)}, "stage_balance_lines": (f"Not computed: {exc}",)}
    note = f"From {len(groups)} committed partition(s); rates are rows per busy second of one actor."
    return {"stage_balance": rec.to_dict(), "stage_balance_lines": (note, "", *rec.lines())}


def write_report(report: RunReport) -> tuple[str, str]:
    base = join_uri(report.output_uri, "runs", report.run_id)
    json_uri, md_uri = join_uri(base, "report.json"), join_uri(base, "report.md")
    storage.write_text(json_uri, report.to_json())
    storage.write_text(md_uri, report.to_markdown())
    return json_uri, md_uri
