"""The run report: per-partition counts, rejects by reason, throughput, cost; JSON and Markdown.

Written next to the plan (``{output}/runs/{run_id}/report.json`` and ``report.md``); its
one-line summary is what the DAG logs and sets as the run's note. Its cost is estimated from
the stages' resources × time and the run's object-store requests (:mod:`ray_jobs.perf.run_cost`,
the prices of ``capacity``), shown beside the last nights' (:data:`HISTORY_NIGHTS` earlier
reports under the same output).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ray_jobs import storage
from ray_jobs.contract.layout import join_uri
from ray_jobs.contract.marker import STARTUP_LABELS
from ray_jobs.contract.plan import Plan
from ray_jobs.output.validate import ValidationReport
from ray_jobs.perf.capacity_model import Prices

STARTUP_KEYS = tuple(STARTUP_LABELS)
#: How many earlier runs' figures a report carries (its ``history``), newest first.
HISTORY_NIGHTS = 7
#: The figures of an earlier run a report carries in its ``history``.
HISTORY_KEYS = ("run_id", "finished_at", "valid", "rows_in", "rows_ok", "rows_rejected", "rows_per_s", "wall_s")


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
    #: :meth:`ray_jobs.perf.run_cost.RunCost.to_dict` of the committed partitions
    cost: dict[str, Any] = field(default_factory=dict)
    #: per operator (read, preprocess, stage0.., write): busy seconds summed over the committed partitions
    stage_busy_s: dict[str, float] = field(default_factory=dict)
    #: the last nights' figures (:data:`HISTORY_KEYS` and ``cost_usd``), newest first
    history: tuple[dict[str, Any], ...] = ()
    #: when the report was built, UTC ISO 8601
    finished_at: str = ""
    #: the output identity the run wrote (its ``out=`` directory)
    output_key: str = ""
    #: what this night changed: rows of new work, rows kept from the plan it continues, rows
    #: removed from the table (retired work), and that plan's run id
    night: dict[str, Any] = field(default_factory=dict)
    #: the run's layout decision and its inputs (:meth:`ray_jobs.model.auto_layout.LayoutDecision.to_dict`),
    #: and per stage spec the committed partitions ran, its rate and gains
    #: (:func:`ray_jobs.perf.rebalance.layout_history`)
    layout: dict[str, Any] = field(default_factory=dict)
    layouts: tuple[dict[str, Any], ...] = ()
    layout_lines: tuple[str, ...] = ()

    def night_line(self) -> str:
        """``embedded N new or changed rows, kept M, removed K``."""
        n = self.night
        if not n:
            return ""
        return f"embedded {n['new_rows']} new or changed rows, kept {n['kept_rows']}, removed {n['removed_rows']}"

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
        data = {k: v for k, v in self.__dict__.items() if k not in ("stage_balance_lines", "layout_lines")}
        data["rows_per_s"] = self.rows_per_s
        data["night_line"] = self.night_line()
        data["startup_median"] = startup_medians(self.partitions)
        data["summary"] = self.summary()
        return json.dumps(data, indent=2, sort_keys=True)

    def to_markdown(self) -> str:
        lines = [
            f"# Embedding run `{self.run_id}`",
            "",
            f"**{self.summary()}**",
            "",
            f"- plan `{self.plan_id}`, model `{self.model_id}`, output identity `{self.output_key or '-'}`",
            f"- output `{self.output_uri}`",
        ]
        if self.night:
            since = self.night.get("previous_run_id")
            lines.append(f"- this night {self.night_line()}" + (f" (continuing run `{since}`)" if since else ""))
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
        lines += ["", "## Stage layout", ""]
        if self.layout:
            lines += [f"- {line}" for line in layout_decision_lines(self.layout)]
        lines += ["", *self.layout_lines] if self.layout_lines else []
        if not self.layout and not self.layout_lines:
            lines.append("No layout recorded.")
        lines += ["", "## Stage balance", ""]
        lines += list(self.stage_balance_lines) or ["No stage statistics in the committed markers."]
        lines += ["", "## Cost", ""]
        if self.cost:
            lines.append(f"Estimated {cost_line(self.cost)}.")
        else:
            lines.append("Not estimated: no committed partition has stage statistics.")
        if self.history:
            lines += [
                "",
                "| run | finished | rows in | rows/s | wall s | cost USD |",
                "|---|---|---:|---:|---:|---:|",
                f"| **{self.run_id}** (this run) | {self.finished_at} | {self.rows_in} | "
                f"{_fmt(self.rows_per_s)} | {_fmt(self.wall_s, 0)} | {_fmt(self.cost.get('total_usd'), 4)} |",
            ]
            for h in self.history:
                lines.append(
                    f"| {h['run_id']} | {h.get('finished_at') or '-'} | {h.get('rows_in', '-')} | "
                    f"{_fmt(h.get('rows_per_s'))} | {_fmt(h.get('wall_s'), 0)} | {_fmt(h.get('cost_usd'), 4)} |"
                )
        if self.problems:
            lines += ["", "## Problems", "", *(f"- {p}" for p in self.problems)]
        return "\n".join(lines) + "\n"


def layout_decision_lines(layout: dict[str, Any]) -> list[str]:
    """The run's layout decision (``check_inputs``) in words: how, why, and the figures it used."""
    from ray_jobs.model.stage_memory import format_bytes

    out = [f"layout: {layout['how']}: {layout['stages']} stage(s), replicas {layout['replicas']}; {layout['reason']}"]
    if "model_bytes" in layout:
        out.append(
            f"model weights {format_bytes(layout['model_bytes'])}, "
            f"activations ~{format_bytes(layout['activation_bytes'])} "
            f"at batch {layout['batch_size']}; a stage may hold {format_bytes(layout['limit_bytes'])} "
            f"({layout['limit_source']})"
        )
    data = layout.get("data") or {}
    if "text_tokens" in data:
        out.append(
            f"data sample {data.get('source', '')}: caption tokens median {data['text_tokens']['median']:g}, "
            f"max {data['text_tokens']['max']} of {data.get('text_max_length')}"
        )
    out.append(f"spec chosen for the run: `{layout['spec']}`")
    return out


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def cost_line(cost: dict[str, Any]) -> str:
    """One line of a report's ``cost``: the total, then compute and requests with their prices."""
    p = cost["prices"]
    return (
        f"${cost['total_usd']:,.4f}: compute ${cost['compute_usd']:,.4f} ({cost['cpu_hours']:,.3f} CPU-hours at "
        f"${p['cpu_hour']:g}, {cost['gpu_hours']:,.3f} GPU-hours at ${p['gpu_hour']:g}) + requests "
        f"${cost['requests_usd']:,.4f} ({cost['gets']:,} GETs at ${p['get_per_1k']:g}/1k, {cost['puts']:,} PUTs at "
        f"${p['put_per_1k']:g}/1k)"
    )


def recent_runs(output_uri: str, exclude_run_id: str, limit: int = HISTORY_NIGHTS) -> tuple[dict[str, Any], ...]:
    """The figures of the newest *limit* reports under ``{output_uri}/runs/`` other than
    *exclude_run_id*'s, newest first (by their ``finished_at``; a report without one sorts last).
    An unreadable report is skipped: history never fails a report."""
    runs = join_uri(output_uri, "runs")
    try:
        names = [d.rstrip("/").rsplit("/", 1)[-1] for d in storage.list_dirs(runs)]
    except (FileNotFoundError, OSError):
        return ()
    out = []
    for name in names:
        if name.startswith("_") or name == exclude_run_id:
            continue
        try:
            data = json.loads(storage.read_text(join_uri(runs, name, "report.json")))
        except (FileNotFoundError, OSError, ValueError):
            continue
        entry = {k: data.get(k) for k in HISTORY_KEYS}
        entry["cost_usd"] = (data.get("cost") or {}).get("total_usd")
        out.append(entry)
    out.sort(key=lambda h: str(h.get("finished_at") or ""), reverse=True)
    return tuple(out[:limit])


def build_report(
    plan: Plan,
    validation: ValidationReport,
    wall_s: float | None = None,
    catalog: dict[str, Any] | None = None,
    prices: Prices | None = None,
    history: Sequence[dict[str, Any]] | None = None,
    embedded: Sequence[int] | None = None,
    layout: dict[str, Any] | None = None,
) -> RunReport:
    """*history*: the last nights' figures; None reads them (:func:`recent_runs`). *embedded*:
    the partitions this run embedded (default: the plan's new ones). *layout*: the run's layout
    decision as ``check_inputs`` made it."""
    import datetime as dt

    from ray_jobs.perf.run_cost import run_cost

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
            if check.timings.get("wall_s") is not None:
                entry["wall_s"] = check.timings["wall_s"]
            if check.stages:
                entry["stages"] = check.stages
            startup = {k: check.timings[k] for k in STARTUP_KEYS if k in check.timings}
            if startup:
                entry["startup"] = startup
        parts.append(entry)
    with_stats = [c.stage_stats for c in validation.checks if c.ok and c.stage_stats]
    busy: dict[str, float] = {}
    for stats in with_stats:
        for stat in stats:
            busy[stat.name] = busy.get(stat.name, 0.0) + stat.busy_s
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
        cost=run_cost(with_stats, validation.rows_in, prices).to_dict() if with_stats else {},
        stage_busy_s={k: round(v, 3) for k, v in busy.items()},
        history=tuple(recent_runs(plan.output_uri, plan.run_id) if history is None else history),
        finished_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        output_key=validation.output_key,
        night=night_figures(plan, catalog, embedded),
        layout=dict(layout or {}),
        **_layouts(validation),
    )


def _layouts(validation: ValidationReport) -> dict[str, Any]:
    """The stage spec each committed partition ran, grouped, with measured and predicted gains."""
    from ray_jobs.perf.rebalance import MeasuredPartition, layout_history

    ran = [MeasuredPartition(c.index, c.stages, tuple(c.stage_stats)) for c in validation.checks if c.ok and c.stages]
    rows, lines = layout_history(ran)
    if not rows:
        return {}
    note = (
        "Stage specs the committed partitions ran (a later partition may run the split measured on earlier ones); "
        "model stages rows/s is the slowest stage pool's rows per busy second; gains against layout 1: predicted "
        "from layout 1's stage statistics, and measured."
    )
    return {"layouts": tuple(rows), "layout_lines": (note, "", *lines)}


def night_figures(plan: Plan, catalog: dict[str, Any] | None, embedded: Sequence[int] | None = None) -> dict[str, Any]:
    """What the night changed: rows of the partitions it embedded (*embedded*, the run's
    to-do list; else the plan's new partitions), the rows it kept, and the rows that left the
    table (the catalog's count when it registered, else the plan's retired rows)."""
    removed = (catalog or {}).get("rows_removed")
    if embedded is None:
        new_rows = sum(p.rows for p in plan.partitions if not p.kept)
    else:
        new_rows = sum(plan.partitions[i].rows for i in set(embedded))
    return {
        "new_rows": new_rows,
        "kept_rows": plan.rows - new_rows,
        "removed_rows": plan.retired_rows if removed is None else removed,
        "previous_run_id": plan.previous_run_id,
    }


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
