"""The backend interface: settings from a deployment, bring a cluster up, say where its dashboard
is and what it can hold, take it down.

Everything that differs between backends is a method here, so callers (operators, DAG code)
never branch on a backend's name: they get the backend by name (:func:`airflow_ray.backends.get_backend`)
and call it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from airflow_ray.cluster import ClusterHandle


class ClusterBackend(ABC):
    name: str
    #: True when :meth:`down` deletes the cluster, and with it every job still on it; False
    #: for a cluster the run only borrows, whose teardown stops the run's leftover jobs instead.
    deletes_cluster: ClassVar[bool]
    #: True when the cluster's nodes are this machine, running this Python: a job's entrypoint
    #: may name ``sys.executable`` and its ``runtime_env`` local paths. False for a cluster
    #: elsewhere, whose image holds the job's code and interpreter.
    on_this_host: ClassVar[bool] = False

    # ------------------------------------------------------------------ settings
    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ClusterBackend:
        """The backend with the settings *config* (what :meth:`settings_from` returns)."""
        return cls(**config)

    @classmethod
    @abstractmethod
    def settings_from(cls, choices: Mapping[str, Any], deployment: Mapping[str, Any]) -> dict[str, Any]:
        """This backend's settings (what :func:`~airflow_ray.backends.get_backend` takes as its
        config): *deployment*'s, narrowed by *choices*.

        *deployment*: what whoever deploys fixes (infrastructure, and the lists or maxima a
        choice must stay within); *choices*: what a run may pick (a trigger form's values; a
        ``None`` value is no choice). A choice outside what the deployment allows raises
        :class:`ValueError` naming it. Each backend documents its keys."""

    # ------------------------------------------------------------------ lifecycle
    @abstractmethod
    def up(self, cluster_name: str) -> ClusterHandle:
        """Create the cluster, or adopt the one this name already made; return when usable."""

    def up_deferrable(self, operator, cluster_name: str) -> dict[str, Any]:
        """From a setup operator: bring the cluster up and return its handle as a dict. A backend
        whose start is slow defers the wait (``operator.defer(..., method_name="execute_complete")``)
        and finishes in :meth:`complete`; this default blocks in :meth:`up`."""
        handle = self.up(cluster_name)
        operator.log.info("Ray cluster %s is up (%s backend): %s", cluster_name, self.name, handle.dashboard_url)
        return handle.to_dict()

    def complete(self, event: dict[str, Any]) -> dict[str, Any]:
        """The handle (as a dict) once the wait :meth:`up_deferrable` deferred has fired *event*."""
        raise NotImplementedError(f"the {self.name} backend never defers its start")

    @abstractmethod
    def handle_for(self, cluster_name: str) -> ClusterHandle:
        """A handle of *cluster_name* found without the setup's (a teardown after a failed setup)."""

    @abstractmethod
    def down(self, handle: ClusterHandle) -> None:
        """Delete the cluster; deleting one that is already gone is success."""

    @abstractmethod
    def credentials(self, handle: ClusterHandle) -> tuple[str, str | None]:
        """``(dashboard address, token)`` of the cluster *handle* names, from this backend's own
        settings and sources (never from the handle): raises
        :class:`~airflow_ray.errors.ClusterError` when the handle's ``dashboard_url`` is not
        that address (:func:`check_dashboard_url`), before the token is read."""

    # ------------------------------------------------------------------ capacity
    @abstractmethod
    def capacity_nodes(self, handle: ClusterHandle) -> list[dict[str, float]]:
        """The nodes the cluster can run jobs on, one ``{"CPU": n, "GPU": n}`` per node: what
        :func:`airflow_ray.capacity.max_in_flight` divides by one job's footprint."""


def narrowed(choice: Any, allowed: list[Any] | tuple[Any, ...] | None, what: str) -> Any:
    """*choice* if the deployment's *allowed* list has it (no list: anything), else ValueError.
    No choice (``None``): the list's first entry (or None)."""
    if choice is None:
        return allowed[0] if allowed else None
    if allowed is not None and choice not in allowed:
        raise ValueError(f"{what} {choice!r} is not one the deployment allows ({list(allowed)})")
    return choice


def check_dashboard_url(handle: ClusterHandle, expected: str) -> str:
    """*expected* (the address the backend produces) if the handle names it, else ClusterError:
    a token is only ever sent to the address its own source gives."""
    from airflow_ray.errors import ClusterError

    if handle.dashboard_url.rstrip("/") != expected.rstrip("/"):
        raise ClusterError(
            f"the handle of cluster {handle.name!r} names dashboard {handle.dashboard_url!r}, but the {handle.backend} "
            f"backend gives {expected!r} for it: no token is sent there"
        )
    return expected.rstrip("/")
