"""The maintenance DAG: its shape and params, and its step collecting the default output root."""

import json
import os

import pytest
from airflow.sdk.exceptions import AirflowFailException, ParamValidationError

from embedding_run.maintenance import collect_garbage
from tests.dags.test_dag_integrity import DAGS
from tests.ray_jobs.output.test_gc import Nights, _retired_by_night_2


@pytest.fixture(scope="module")
def maintenance_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=os.path.join(DAGS, "embeddings_maintenance.py"))
    assert bag.import_errors == {}
    return bag.dags["embeddings_maintenance"]


def test_dag_shape_and_params(maintenance_dag):
    from airflow.sdk.definitions.param import ParamsDict

    dag = maintenance_dag
    assert [t.task_id for t in dag.tasks] == ["collect_garbage"]
    assert dag.catchup is False and dag.max_active_runs == 1
    assert set(dag.params.keys()) == {"retain", "dry_run"}
    assert dag.params["retain"] == 7 and dag.params["dry_run"] is False
    for bad in ({"retain": 0}, {"retain": 366}, {"retain": "7d"}, {"dry_run": "yes"}):
        params = ParamsDict(dict(dag.params.items()))  # a copy, as a trigger's form would be
        with pytest.raises(ParamValidationError):
            params.update(bad)
            params.validate()


def _environ(nights):
    return {
        "EMB_OUTPUT_URI": nights.out,
        "EMB_DEPLOYMENT_ALLOWED_URI_PREFIXES": json.dumps(["s3://", str(nights.tmp)]),
    }


def test_the_step_collects_the_default_output_with_the_embedded_catalog(tmp_path):
    out = tmp_path / "out"
    nights = Nights(tmp_path, catalog=f"sqlite:///{out}/iceberg_catalog.db")  # the embedded default
    retired = _retired_by_night_2(nights)
    dry = collect_garbage(1, True, environ=_environ(nights))
    assert dry["dry_run"] and dry["work_dirs_removed"] == 0 and dry["snapshots_expired"] == 0, "all within a day"
    assert dry["catalog_uri"] == nights.catalog and len(dry["tables"]) == 1
    assert all(os.path.exists(w) for w in retired)
    done = collect_garbage(1, False, environ=_environ(nights))
    assert not done["dry_run"] and done["run_dirs_removed"] == 0 and done["kept"]["run dirs"] == 3
    with pytest.raises(AirflowFailException, match="EMB_OUTPUT_URI"):
        collect_garbage(7, False, environ={})
    with pytest.raises(AirflowFailException, match=r"retain must be 1\.\.365"):
        collect_garbage(0, False, environ=_environ(nights))
