"""The run's figures as Airflow metrics: StatsD or OpenTelemetry, as the deployment's Airflow
config (``[metrics]``) says, under Airflow's prefix (``airflow.embeddings.*`` by default).

Emitted by the report step from the run report, once per run, for the partitions this run
embedded (work kept from earlier nights is not counted again):

========================================  ======  =============================================
``embeddings.rows_ok``                    count   rows embedded (committed partitions)
``embeddings.rows_rejected``              count   rows rejected, every reason
``embeddings.partitions_done``            count   partitions committed
``embeddings.partition_seconds``          timer   one per committed partition: its job's wall time
``embeddings.admission_wait_seconds``     timer   one per committed partition: its admission wait
``embeddings.run_cost_estimate``          gauge   the run's estimated cost, USD
========================================  ======  =============================================
"""

from __future__ import annotations

import datetime as dt
from typing import Any

PREFIX = "embeddings"
NAMES = (
    "rows_ok",
    "rows_rejected",
    "partitions_done",
    "partition_seconds",
    "admission_wait_seconds",
    "run_cost_estimate",
)


def _stats():
    from airflow.sdk.observability.stats import Stats

    return Stats


def emit_run_metrics(report: dict[str, Any], stats=None, embedded=None) -> dict[str, Any]:
    """Emit *report*'s (``report.json``'s) figures for the partitions in *embedded* (the run's
    to-do list; None: every partition); returns what was emitted, by metric name."""
    stats = stats or _stats()
    chosen = None if embedded is None else set(embedded)
    done = [
        p
        for p in report.get("partitions", ())
        if p.get("status") == "ok" and (chosen is None or p.get("index") in chosen)
    ]
    emitted: dict[str, Any] = {
        "rows_ok": sum(int(p.get("rows_ok") or 0) for p in done),
        "rows_rejected": sum(int(p.get("rows_rejected") or 0) for p in done),
        "partitions_done": len(done),
    }
    for name, count in emitted.items():
        stats.incr(f"{PREFIX}.{name}", count)
    walls = [float(p["wall_s"]) for p in done if p.get("wall_s") is not None]
    waits = [
        float(p["startup"]["startup_admission_wait_s"])
        for p in done
        if "startup_admission_wait_s" in p.get("startup", {})
    ]
    for name, values in (("partition_seconds", walls), ("admission_wait_seconds", waits)):
        for value in values:
            stats.timing(f"{PREFIX}.{name}", dt.timedelta(seconds=value))
        emitted[name] = values
    cost = (report.get("cost") or {}).get("total_usd")
    if cost is not None:
        stats.gauge(f"{PREFIX}.run_cost_estimate", float(cost))
        emitted["run_cost_estimate"] = float(cost)
    return emitted
