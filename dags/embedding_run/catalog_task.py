"""The catalog step as an operator: it registers the run's files in the Iceberg table, sets the
table's Asset event, and reports the run's lineage to OpenLineage.

An operator rather than a ``@task`` so that the OpenLineage provider finds its
``get_openlineage_facets_on_complete``: the manifest in, the table out, with its schema, row
count and snapshot (:mod:`embedding_run.lineage`). The Asset event's ``extra`` carries the
same lineage beside the catalog result and the validation counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Asset, BaseOperator


class RegisterCatalogOperator(BaseOperator):
    """:func:`embedding_run.steps.register_catalog` for the run; *checked*, *planned* and
    *validated* are the results of ``check_inputs``, ``plan`` and ``validate`` (XComArgs)."""

    template_fields: Sequence[str] = ("checked", "planned", "validated")
    ui_color = "#e9f5ec"

    def __init__(self, *, checked: Any, planned: Any, validated: Any, table: Asset, **kwargs):
        super().__init__(outlets=[table], **kwargs)
        self.checked, self.planned, self.validated, self.table = checked, planned, validated, table
        self.lineage: dict[str, Any] | None = None

    def execute(self, context) -> dict[str, Any]:
        from embedding_run.lineage import run_lineage
        from embedding_run.steps import register_catalog

        run_id = context["run_id"]
        result = register_catalog(self.checked, self.planned, run_id)
        self.lineage = run_lineage(self.checked, result)
        context["outlet_events"][self.table].extra = {
            **result,
            **(self.validated or {}),
            "run_id": run_id,
            "lineage": self.lineage,
        }
        return result

    def get_openlineage_facets_on_complete(self, task_instance):
        from embedding_run.lineage import operator_lineage, run_lineage

        lineage = self.lineage
        if lineage is None:  # another process ran execute: rebuild it from the results
            result = task_instance.xcom_pull(task_ids=self.task_id, key="return_value")
            lineage = run_lineage(self.checked, result)
        return operator_lineage(lineage)
