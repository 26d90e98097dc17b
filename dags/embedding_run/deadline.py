"""The night's morning deadline: the deployment's ``finish_by`` as an Airflow deadline alert.

``deployment.finish_by: "07:00"`` (UTC, ``HH:MM`` or ``HH:MM:SS``) puts a
:class:`~airflow.sdk.DeadlineAlert` on the DAG: a run not finished by the first ``finish_by``
at or after its logical date (the night it is for; a run without one: when it was created)
has missed it. The scheduler then queues :func:`deadline_missed` in the triggerer, which logs
the miss and calls the notifier the deployment names (``deadline_notifier``, the dotted path
of an Airflow notifier class, with ``deadline_notifier_kwargs``). The run itself goes on: a
late night is reported, never stopped.

:class:`FinishBy` is a custom deadline reference; the scheduler finds it through the
``embedding_run`` plugin (:mod:`embedding_run.plugin`), which every Airflow component loads.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from typing import Any, ClassVar

from airflow.sdk import AsyncCallback, DeadlineAlert
from airflow.sdk.definitions.deadline import REFERENCE_TYPE_FIELD, BaseDeadlineReference

from ray_jobs.config.declare import ConfigError

log = logging.getLogger(__name__)

_TIME_OF_DAY = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def time_of_day(text: str) -> dt.time:
    """``"07:00"`` or ``"07:00:30"`` (UTC) as a :class:`datetime.time`."""
    m = _TIME_OF_DAY.match(str(text).strip())
    if not m:
        raise ConfigError(f"deployment.finish_by must be a UTC time of day HH:MM or HH:MM:SS, got {text!r}")
    return dt.time(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0), tzinfo=dt.UTC)


def first_after(base: dt.datetime, at: dt.time) -> dt.datetime:
    """The first *at* (UTC) at or after *base*."""
    base = base.astimezone(dt.UTC)
    candidate = dt.datetime.combine(base.date(), at.replace(tzinfo=None), tzinfo=dt.UTC)
    return candidate if candidate >= base else candidate + dt.timedelta(days=1)


@dataclasses.dataclass
class FinishBy(BaseDeadlineReference):
    """The first ``finish_by`` (UTC) at or after the run's logical date, else its ``run_after``."""

    finish_by: str = "07:00"
    required_kwargs: ClassVar[frozenset[str]] = frozenset({"dag_id", "run_id"})

    def __post_init__(self) -> None:
        time_of_day(self.finish_by)

    def serialize_reference(self) -> dict[str, Any]:
        return {REFERENCE_TYPE_FIELD: self.reference_name, "finish_by": self.finish_by}

    @classmethod
    def deserialize_reference(cls, reference_data: dict[str, Any]) -> FinishBy:
        return cls(finish_by=reference_data["finish_by"])

    def _evaluate_with(self, *, session, dag_id: str, run_id: str, **_: Any) -> dt.datetime | None:
        from airflow.models import DagRun
        from sqlalchemy import select

        row = session.execute(
            select(DagRun.logical_date, DagRun.run_after).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)
        ).first()
        if row is None:
            return None
        base = row.logical_date or row.run_after
        return first_after(base, time_of_day(self.finish_by)) if base is not None else None

    def __hash__(self) -> int:
        return hash((self.reference_name, self.finish_by))


@dataclasses.dataclass(frozen=True)
class DeadlineSettings:
    finish_by: str
    notifier: str | None = None
    notifier_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        time_of_day(self.finish_by)
        if self.notifier is not None and not (isinstance(self.notifier, str) and _DOTTED.match(self.notifier)):
            raise ConfigError(
                f"deployment.deadline_notifier must be the dotted path of a notifier class, got {self.notifier!r}"
            )
        if not isinstance(self.notifier_kwargs, dict):
            raise ConfigError(
                f"deployment.deadline_notifier_kwargs must be a mapping, got {type(self.notifier_kwargs).__name__}"
            )

    @classmethod
    def from_deployment(cls, deployment: dict[str, Any]) -> DeadlineSettings | None:
        """The deployment's deadline, or None without ``finish_by``."""
        finish_by = deployment.get("finish_by")
        if finish_by in (None, ""):
            return None
        return cls(
            finish_by=str(finish_by),
            notifier=deployment.get("deadline_notifier") or None,
            notifier_kwargs=dict(deployment.get("deadline_notifier_kwargs") or {}),
        )


def deadline_alert(deployment: dict[str, Any]) -> DeadlineAlert | None:
    """The DAG's deadline alert from the deployment's ``finish_by`` (None: no deadline)."""
    settings = DeadlineSettings.from_deployment(deployment)
    if settings is None:
        return None
    return DeadlineAlert(
        reference=FinishBy(settings.finish_by),
        interval=dt.timedelta(0),
        callback=AsyncCallback(
            deadline_missed,
            kwargs={
                "finish_by": settings.finish_by,
                "notifier": settings.notifier,
                "notifier_kwargs": settings.notifier_kwargs,
            },
        ),
        name=f"finish by {settings.finish_by} UTC",
    )


def miss_message(context: dict[str, Any] | None, finish_by: str) -> str:
    run = (context or {}).get("dag_run") or {}  # the REST API's DAG run: its id is dag_run_id
    deadline = ((context or {}).get("deadline") or {}).get("deadline_time")
    run_id = run.get("dag_run_id") or run.get("run_id") or "?"
    return (
        f"deadline missed: run {run_id} of {run.get('dag_id', '?')} was not finished by "
        f"{finish_by} UTC (deadline {deadline}); state {run.get('state', '?')}. The run goes on; this is a warning."
    )


async def deadline_missed(
    context: dict[str, Any] | None = None,
    finish_by: str = "",
    notifier: str | None = None,
    notifier_kwargs: dict[str, Any] | None = None,
) -> str:
    """Log the miss and notify through the deployment's notifier (runs in the triggerer)."""
    import asyncio

    from airflow.sdk._shared.module_loading import import_string

    message = miss_message(context, finish_by)
    log.warning("%s", message)
    if notifier:
        instance = import_string(notifier)(**(notifier_kwargs or {}))
        notify_context = {**(context or {}), "deadline_message": message}
        try:
            await instance.async_notify(notify_context)
        except NotImplementedError:
            await asyncio.to_thread(instance.notify, notify_context)
        log.info("deadline miss notified through %s", notifier)
    return message
