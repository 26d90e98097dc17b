"""Shared stand-ins for the control-plane tests (Airflow's task runner does not run here)."""

import asyncio


class StandInTaskInstance:
    """Stands in for Airflow's runtime task instance: ids and an XCom dict."""

    def __init__(self, dag_id="test_dag", run_id="manual__1"):
        self.dag_id, self.run_id, self.xcom = dag_id, run_id, {}

    def xcom_push(self, key, value):
        self.xcom[key] = value


async def first_event(trigger):
    """The payload of the trigger's first event, as the triggerer would receive it."""
    async for event in trigger.run():
        return event.payload


def run_trigger(trigger):
    return asyncio.run(first_event(trigger))
