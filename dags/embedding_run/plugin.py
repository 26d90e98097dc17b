"""The ``embedding_run`` Airflow plugin: the run page, its extra link, and the deadline reference.

Registered through the ``airflow.plugins`` entry point of this project (pyproject.toml), so
every Airflow component that has the project installed and ``dags/`` on its path (the image
sets ``PYTHONPATH=/opt/airflow/dags``) loads it:

* the api-server mounts the run page (:mod:`embedding_run.run_page`) at ``/embeddings``;
* every task of the nightly DAG's runs gets the extra link "Run page" to it;
* the scheduler finds :class:`~embedding_run.deadline.FinishBy`, the reference of the DAG's
  ``finish_by`` deadline, when it evaluates a new run's deadline.

Importing this module is cheap (no FastAPI app, no matplotlib, no data plane until a page is
served): every component imports it.
"""

from __future__ import annotations

from typing import ClassVar

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink

from embedding_run.deadline import FinishBy
from embedding_run.run_page import URL_PREFIX, LazyApp, run_page_path

#: the DAG whose runs have a run page
DAG_ID = "multimodal_embeddings"


class RunPageLink(BaseOperatorLink):
    """From any task of a nightly run to its run page (other DAGs' tasks get no link)."""

    name = "Run page"

    def get_link(self, operator, *, ti_key) -> str:
        if ti_key.dag_id != DAG_ID:
            return ""
        from airflow.configuration import conf

        base = (conf.get("api", "base_url", fallback="") or "").rstrip("/")
        return base + run_page_path(ti_key.dag_id, ti_key.run_id)


class EmbeddingRunPlugin(AirflowPlugin):
    name = "embedding_run"
    fastapi_apps: ClassVar[list] = [{"app": LazyApp(), "url_prefix": URL_PREFIX, "name": "Embedding run pages"}]
    global_operator_extra_links: ClassVar[list] = [RunPageLink()]
    deadline_references: ClassVar[list] = [FinishBy]
