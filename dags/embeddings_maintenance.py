"""
### Embeddings maintenance: garbage collection

Once a day, on the output root and Iceberg catalog of the deployment's defaults
(`EMB_OUTPUT_URI`, `EMB_CATALOG_CONN_ID`): expires the snapshots of the output's tables that
have not been current for the retention, then removes retired work no retained snapshot or
kept plan references, attempt directories no marker lists whose lease expired, superseded
`_history/` markers and their files, old run directories and (S3) incomplete multipart
uploads. It never removes a file a retained snapshot or a live attempt references; see the
"Garbage collection" section of `docs/operations.md`.

**Params:** `retain` (days, 1..365) and `dry_run` (print what would go, remove nothing).
Scheduled only once an output root is configured.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Param, dag, task

from embedding_run.deployment import load_defaults
from embedding_run.maintenance import RETAIN_DAYS_DEFAULT, RETAIN_DAYS_MAX, RETAIN_DAYS_MIN

CONFIG = load_defaults()
#: Midday UTC: away from the nightly run (02:00 by default); gc is safe beside a run, only slower.
SCHEDULE = "0 12 * * *"


@task
def collect_garbage(params=None) -> dict:
    from embedding_run.maintenance import collect_garbage as run

    return run(params["retain"], params["dry_run"])


@dag(
    dag_id="embeddings_maintenance",
    schedule=SCHEDULE if CONFIG["params"].get("output_uri") else None,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["embeddings", "iceberg", "ml-platform"],
    doc_md=__doc__,
    params={
        "retain": Param(
            RETAIN_DAYS_DEFAULT,
            type="integer",
            minimum=RETAIN_DAYS_MIN,
            maximum=RETAIN_DAYS_MAX,
            title="Retention (days)",
            description="keep snapshots, work, markers and runs younger than this many days",
        ),
        "dry_run": Param(False, type="boolean", title="Dry run", description="print what would go; remove nothing"),
    },
    default_args={
        "owner": CONFIG["owner"],
        "retries": CONFIG["retries"],
        "retry_delay": dt.timedelta(seconds=CONFIG["retry_delay_s"]),
        "retry_exponential_backoff": True,
        "executor_config": CONFIG["executor_config"],
    },
)
def embeddings_maintenance():
    collect_garbage()


embeddings_maintenance()
