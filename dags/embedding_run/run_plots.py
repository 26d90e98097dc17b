"""The run page's plots, rendered on the server with matplotlib's Agg backend into PNG bytes.

Each function takes a :class:`~embedding_run.run_view.RunView` and returns a PNG, or None when
the run has nothing to plot there yet. Figures are built with :class:`matplotlib.figure.Figure`
(no pyplot: no global state, safe in the api-server's threads).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from embedding_run.run_view import RunView
from ray_jobs.contract.marker import STARTUP_LABELS

OK, FAILED, RUNNING, BOTTLENECK, PLAIN = "#2e7d32", "#c62828", "#1565c0", "#ef6c00", "#78909c"
STATE_COLOURS = {"ok": OK, "done": OK, "failed": FAILED, "stalled": FAILED, "running": RUNNING}


def _figure(height: float = 3.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(8.0, height), dpi=90, layout="constrained")


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def partitions_plot(view: RunView) -> bytes | None:
    """Rows/s per partition, coloured by state; a running one's bar is its rows/s so far."""
    rows = view.partition_rows()
    if not rows:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    indices = [r["index"] for r in rows]
    ax.bar(indices, [r["rows_per_s"] or 0.0 for r in rows], color=[STATE_COLOURS.get(r["state"], PLAIN) for r in rows])
    ax.set_xlabel("partition")
    ax.set_ylabel("rows/s")
    ax.set_title("Partitions: rows/s (green ok, blue running, red failed)")
    if len(rows) <= 40:
        ax.set_xticks(indices)
    return _png(fig)


def _barh(title: str, labels: Sequence[str], values: Sequence[float], colours: Sequence[str], unit: str) -> bytes:
    fig = _figure(0.6 + 0.35 * max(3, len(labels)))
    ax = fig.add_subplot()
    ax.barh(list(labels), list(values), color=list(colours))
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(title)
    for y, v in enumerate(values):
        ax.annotate(
            f"{v:,.1f}" if isinstance(v, float) else f"{v:,}",
            (v, y),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    return _png(fig)


def stages_plot(view: RunView) -> bytes | None:
    """Busy seconds per operator over the committed partitions; the bottleneck in orange."""
    report = view.report or {}
    busy = report.get("stage_busy_s") or {}
    if not busy:
        return None
    bottleneck = (report.get("stage_balance") or {}).get("bottleneck")
    names = list(busy)
    return _barh(
        f"Busy time per stage (bottleneck: {bottleneck or 'not computed'})",
        names,
        [float(busy[n]) for n in names],
        [BOTTLENECK if n == bottleneck else PLAIN for n in names],
        "busy seconds, all partitions",
    )


def rejects_plot(view: RunView) -> bytes | None:
    reasons = (view.report or {}).get("rejects_by_reason") or {}
    if not reasons:
        return None
    names = sorted(reasons, key=lambda k: -reasons[k])
    return _barh("Rejects by reason", names, [int(reasons[n]) for n in names], [FAILED] * len(names), "rows")


def startup_plot(view: RunView) -> bytes | None:
    medians = (view.report or {}).get("startup_median") or {}
    keys = [k for k in STARTUP_LABELS if k in medians]
    if not keys:
        return None
    return _barh(
        "Start-up, median over partitions",
        [STARTUP_LABELS[k] for k in keys],
        [float(medians[k]) for k in keys],
        [PLAIN] * len(keys),
        "seconds",
    )


def trend_plot(view: RunView) -> bytes | None:
    """This run beside the last nights: rows/s, wall time and estimated cost."""
    nights = view.trend()
    if not nights:
        return None
    labels = [(n.get("finished_at") or n.get("run_id") or "?")[:16].replace("T", " ") for n in nights]
    fig = _figure(4.2)
    axes = fig.subplots(3, 1, sharex=True)
    series = (("rows_per_s", "rows/s"), ("wall_s", "wall s"), ("cost_usd", "cost USD"))
    xs = list(range(len(nights)))
    for ax, (key, label) in zip(axes, series, strict=True):
        values = [n.get(key) or 0.0 for n in nights]
        ax.plot(xs, values, marker="o", color=RUNNING)
        ax.plot(xs[-1:], values[-1:], marker="o", markersize=9, color=BOTTLENECK, linestyle="")
        ax.set_ylabel(label)
    axes[0].set_title(f"Last {len(nights) - 1} nights and this run (orange)")
    axes[-1].set_xticks(xs, labels)
    axes[-1].tick_params(axis="x", labelrotation=20, labelsize=7)
    return _png(fig)


PLOTS = {
    "partitions": partitions_plot,
    "stages": stages_plot,
    "rejects": rejects_plot,
    "startup": startup_plot,
    "trend": trend_plot,
}
