"""The ``embeddings_maintenance`` DAG's step: garbage-collect the deployment's output root
(:mod:`ray_jobs.output.gc`) against the catalog the nightly runs register in.

The output root and the catalog come from the deployment defaults (``EMB_OUTPUT_URI``,
``EMB_CATALOG_CONN_ID``), read when the task runs; the only params are the retention in days
and whether to only print what would go. An output root a run was triggered with by hand is
not collected here: run ``python -m ray_jobs gc --output …`` for it.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk.exceptions import AirflowFailException

#: Bounds of the ``retain`` param, in days: at least a day, so yesterday stays readable by time travel.
RETAIN_DAYS_DEFAULT, RETAIN_DAYS_MIN, RETAIN_DAYS_MAX = 7, 1, 365


def collect_garbage(retain_days: int, dry_run: bool, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Collect the default output root; the counts (and the catalog, redacted) for XCom."""
    from embedding_run.catalog_connection import CatalogConnectionError, resolve_catalog
    from embedding_run.deployment import load_defaults
    from ray_jobs.config.declare import ConfigError
    from ray_jobs.errors import JobInputError
    from ray_jobs.output.gc import collect

    if isinstance(retain_days, bool) or not isinstance(retain_days, int):
        raise AirflowFailException(f"retain must be a whole number of days, got {retain_days!r}")
    if not RETAIN_DAYS_MIN <= retain_days <= RETAIN_DAYS_MAX:
        raise AirflowFailException(f"retain must be {RETAIN_DAYS_MIN}..{RETAIN_DAYS_MAX} days, got {retain_days}")
    try:
        params = load_defaults(environ)["params"]
        output = params.get("output_uri")
        if not output:
            raise AirflowFailException("no output root to collect: set EMB_OUTPUT_URI (the nightly DAG's output_uri)")
        target = resolve_catalog(params.get("catalog_conn_id"), output)
        result = collect(output, retain_days * 86400.0, catalog_uri=target.uri, dry_run=bool(dry_run))
    except (CatalogConnectionError, ConfigError, JobInputError) as exc:
        raise AirflowFailException(str(exc)) from None
    for line in result.items():
        print(line)
    print(result.summary())
    return {
        "output_uri": output,
        "dry_run": result.dry_run,
        "snapshots_expired": result.snapshots_expired,
        "tables": result.tables,
        "work_dirs_removed": len(result.work_removed),
        "rows_removed": result.rows_removed,
        "attempt_dirs_removed": len(result.attempts_removed),
        "history_markers_removed": len(result.history_removed),
        "multipart_uploads_aborted": len(result.uploads_aborted),
        "run_dirs_removed": len(result.runs_removed),
        "kept": dict(result.kept),
        **target.public(),
    }
