"""One Airflow stack (PostgreSQL, api-server, scheduler, dag-processor, triggerer) for every
real-topology module: starting one costs about a minute, so the modules share it. Each test
leaves it as it found it (its runs finished, no Ray process left)."""

from __future__ import annotations

import pytest

from tests.topology.airflow_stack import AirflowStack


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    from tests import postgres_server

    if not postgres_server.available():
        pytest.fail("PostgreSQL binaries are missing: `make setup` installs them (Debian package postgresql)")
    with AirflowStack(str(tmp_path_factory.mktemp("airflow-topology"))) as s:
        s.wait_for_dag()
        yield s
