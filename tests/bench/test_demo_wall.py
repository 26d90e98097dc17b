"""bench/demo_wall.py reads the demo's task walls and run duration from an `airflow dags test` log."""

from __future__ import annotations

from bench.demo_wall import run_duration, task_walls

LOG = """\
2026-11-29T11:32:46.652359Z [info     ] [DAG TEST] starting task_id=check_inputs map_index=-1 [x] loc=dag.py:1501
2026-11-29T11:32:54.780891Z [info     ] [DAG TEST] end task task_id=check_inputs map_index=-1 [x] loc=dag.py:1563
2026-11-29T11:33:02.781113Z [info     ] [DAG TEST] starting task_id=embed map_index=0 [x] loc=dag.py:1501
2026-11-29T11:33:03.701100Z [info     ] Pausing task as DEFERRED.
2026-11-29T11:33:35.187331Z [info     ] [DAG TEST] end task task_id=embed map_index=0 [x] loc=dag.py:1563
2026-11-29T11:34:31.309348Z [info     ] DagRun Finished: dag_id=x, run_duration=105.706541, state=success
"""


def test_task_walls_and_run_duration_come_from_the_dag_test_log():
    lines = LOG.splitlines()
    walls = dict(task_walls(lines))
    assert list(walls) == ["check_inputs", "embed[0]"]
    assert round(walls["check_inputs"], 2) == 8.13 and round(walls["embed[0]"], 1) == 32.4
    assert run_duration(lines) == (105.706541, "success")
    assert run_duration(lines[:-1]) is None
