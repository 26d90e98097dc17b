"""A stand-in for a real notifier (Slack, SMTP, PagerDuty: none is reachable from the test
machine): an Airflow notifier that appends each notification, as JSON, to a local file the
real-topology test reads. The deployment names it as it would name a provider's notifier."""

from __future__ import annotations

import json

from airflow.sdk.bases.notifier import BaseNotifier


class FileNotifierStandIn(BaseNotifier):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def notify(self, context) -> None:
        record = {
            "message": context.get("deadline_message"),
            "run_id": (context.get("dag_run") or {}).get("dag_run_id"),
            "deadline": str((context.get("deadline") or {}).get("deadline_time")),
        }
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    async def async_notify(self, context) -> None:
        self.notify(context)
