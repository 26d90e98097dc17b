"""The run page: one embedding run in the Airflow UI's api-server, at a stable URL.

``GET {base}/embeddings/runs/{dag_id}/{run_id}``: an HTML page with the run's headline figures
(rows, rows/s, wall time, bottleneck, estimated cost, Iceberg table and snapshot), its
partitions (state, rows done, rows/s, ETA while running) and server-rendered plots
(:mod:`embedding_run.run_plots`): per-partition rows/s, busy time per stage with the bottleneck,
rejects by reason, the start-up breakdown and the last nights' trend.
``GET .../figures.json``: the same figures as JSON.

Behind Airflow's own authentication and authorisation: the caller's JWT (the UI's session
cookie or a bearer token) must allow reading the DAG's runs. The page embeds its plots (no
second request, no script, no CDN).
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any
from urllib.parse import quote

from starlette.requests import Request  # FastAPI resolves the dependency's annotation from here

#: where the plugin mounts the app in the api-server
URL_PREFIX = "/embeddings"


def run_page_path(dag_id: str, run_id: str) -> str:
    return f"{URL_PREFIX}/runs/{quote(dag_id, safe='')}/{quote(run_id, safe='')}"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return html.escape(str(value))


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1b1f23;max-width:1100px}
table{border-collapse:collapse;margin:.5rem 0 1rem}td,th{border:1px solid #d0d7de;padding:.25rem .6rem;text-align:left}
th{background:#f6f8fa}.ok{color:#2e7d32}.failed{color:#c62828}.running{color:#1565c0}img{display:block;margin:.5rem 0}
"""


def render_page(view) -> str:
    """The page's HTML for a :class:`~embedding_run.run_view.RunView`."""
    from embedding_run.run_plots import PLOTS

    esc = html.escape
    figures = view.figures()
    # each figure's cell carries its report.json value in data-value, the text is for people
    rows = "".join(
        f'<tr><th>{esc(k.replace("_", " "))}</th><td data-figure="{esc(k)}" data-value="{esc(json.dumps(v))}">'
        f"{esc(str(v)) if k == 'snapshot_id' and v is not None else _cell(v)}</td></tr>"
        for k, v in figures.items()
    )
    parts = "".join(
        f'<tr data-partition="{esc(str(p["index"]))}"><td>{esc(str(p["index"]))}</td>'
        f'<td class="{esc(str(p["state"]))}">'
        f"{esc(str(p['state']))}</td><td>{_cell(p.get('rows_done'))} / {_cell(p.get('rows_total'))}</td>"
        f"<td>{_cell(p.get('rows_per_s'))}</td><td>{_cell(p.get('eta_s'))}</td></tr>"
        for p in view.partition_rows()
    )
    plots = []
    for name, plot in PLOTS.items():
        png = plot(view)
        if png is not None:
            data = base64.b64encode(png).decode()
            plots.append(f'<img data-plot="{name}" alt="{name}" src="data:image/png;base64,{data}">')
    trend = "".join(
        f"<tr><td>{esc(str(n.get('run_id')))}</td><td>{esc(str(n.get('finished_at') or '-'))}</td>"
        f"<td>{_cell(n.get('rows_in'))}</td><td>{_cell(n.get('rows_per_s'))}</td><td>{_cell(n.get('wall_s'))}</td>"
        f"<td data-trend-cost>{_cell(n.get('cost_usd'))}</td></tr>"
        for n in reversed(view.trend())
    )
    problems = "".join(f"<li>{esc(p)}</li>" for p in view.problems)
    status = "report written" if view.report else "running: figures from the partitions' progress"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Embedding run {esc(view.run_id)}</title>
<style>{_STYLE}</style></head><body>
<h1>Embedding run <code id="run-id">{esc(view.run_id)}</code></h1>
<p>DAG <code>{esc(view.dag_id)}</code> · state <b id="run-state">{esc(view.state)}</b> · {status} ·
output <code>{esc(view.run_dir)}</code></p>
<h2>Figures</h2><table id="figures">{rows}</table>
<h2>Partitions</h2>
<table id="partitions"><tr><th>partition</th><th>state</th><th>rows done / total</th><th>rows/s</th>
<th>ETA s</th></tr>{parts}</table>
<h2>Plots</h2>{"".join(plots) or "<p>Nothing to plot yet.</p>"}
<h2>Last nights</h2>
<table id="trend"><tr><th>run</th><th>finished</th><th>rows in</th><th>rows/s</th><th>wall s</th><th>cost USD</th></tr>
{trend}</table>
{f"<h2>Problems</h2><ul>{problems}</ul>" if problems else ""}
</body></html>
"""


async def _require_run_access(request: Request) -> None:
    """Airflow's own check, as its REST API makes it: the caller's JWT (bearer token, else the
    UI's cookie) must allow ``GET`` on the DAG's runs."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user, requires_access_dag

    user = await get_user(request, None, await bearer_scheme(request))
    requires_access_dag("GET", DagAccessEntity.RUN)(request, user)


def _view(dag_id: str, run_id: str):
    from fastapi import HTTPException

    from embedding_run.run_view import RunNotFound, load_run_view, plan_uri_of

    try:
        state, plan_uri = plan_uri_of(dag_id, run_id)
    except RunNotFound as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    return load_run_view(dag_id, run_id, state, plan_uri)


def create_app():
    """The FastAPI app the plugin mounts at :data:`URL_PREFIX`."""
    from fastapi import Depends, FastAPI
    from fastapi.responses import HTMLResponse

    app = FastAPI(title="Embedding runs", docs_url=None, redoc_url=None, openapi_url=None)
    access = [Depends(_require_run_access)]

    @app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse, dependencies=access)
    def run_page(dag_id: str, run_id: str) -> HTMLResponse:
        return HTMLResponse(render_page(_view(dag_id, run_id)))

    @app.get("/runs/{dag_id}/{run_id}/figures.json", dependencies=access)
    def run_figures(dag_id: str, run_id: str) -> dict[str, Any]:
        view = _view(dag_id, run_id)
        return {"figures": view.figures(), "partitions": view.partition_rows(), "trend": view.trend()}

    return app


class LazyApp:
    """An ASGI app that builds the FastAPI app on its first request: every Airflow component
    loads plugins, only the api-server serves pages, and the others should not pay for it."""

    def __init__(self, factory=create_app):
        self._factory = factory
        self._app = None

    async def __call__(self, scope, receive, send) -> None:
        if self._app is None:
            self._app = self._factory()
        await self._app(scope, receive, send)
