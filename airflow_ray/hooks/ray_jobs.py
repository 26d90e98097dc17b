"""The Ray Jobs REST API (the dashboard's ``/api/jobs/``), sync and async, token-aware.

The sync client serves operators (submit, adopt, stop); the async client serves triggers,
so polling never blocks the triggerer's event loop. The token goes in the ``Authorization``
header and nowhere else: not in URLs, logs, exceptions or XCom.
"""

from __future__ import annotations

import copy
import functools
import ssl
from typing import Any

import httpx

from airflow_ray.errors import RayJobsApiError
from airflow_ray.provider_info import CONN_TYPE, FIELD_BEHAVIOUR, HOOK_NAME

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
ACTIVE = frozenset({"PENDING", "RUNNING"})
FAILED = frozenset({"FAILED", "STOPPED"})


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS settings every client of this process uses, made once: what httpx builds for
    ``verify=True`` (certifi's CAs, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``), which costs ~35 ms
    of CPU each time. A triggerer opens a client per job; at 1,000 partitions a night that was
    a third of its CPU."""
    return httpx.create_ssl_context()


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _check(resp: httpx.Response, what: str) -> None:
    if resp.status_code >= 400:
        body = resp.text[:500]
        hint = " (is the cluster's auth token right?)" if resp.status_code in (401, 403) else ""
        raise RayJobsApiError(f"Ray Jobs API: {what} failed: HTTP {resp.status_code}{hint}: {body}", resp.status_code)


def uploads_working_dir(runtime_env: dict[str, Any] | None) -> bool:
    """True when submitting with *runtime_env* uploads a local ``working_dir`` (from the
    submitting machine's disk) instead of naming a remote package by its URI."""
    wd = (runtime_env or {}).get("working_dir")
    return bool(wd) and "://" not in str(wd)


class RayJobsClient:
    """Blocking client for one cluster's dashboard address."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 30.0):
        self.address = address.rstrip("/")
        self._auth = _headers(token)  # also for Ray's own client (a submission that uploads a working_dir)
        self._client = httpx.Client(base_url=self.address, headers=self._auth, timeout=timeout, verify=tls_context())

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RayJobsClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def version(self) -> dict[str, Any]:
        resp = self._client.get("/api/version")
        _check(resp, "version")
        return resp.json()

    def nodes(self) -> dict[str, Any]:
        """The cluster's nodes with their total resources (Ray state API)."""
        resp = self._client.get("/api/v0/nodes", params={"detail": "1", "limit": "10000"})
        _check(resp, "list nodes")
        return resp.json()

    def jobs(self) -> list[dict[str, Any]]:
        """Every job the cluster knows (``GET /api/jobs/``): submitted jobs carry their
        ``submission_id``, ``status`` and ``metadata``; drivers started by hand have no
        submission id."""
        resp = self._client.get("/api/jobs/")
        _check(resp, "list jobs")
        return resp.json()

    def get(self, submission_id: str) -> dict[str, Any] | None:
        """The job's info, or None if no job has this submission id."""
        resp = self._client.get(f"/api/jobs/{submission_id}")
        if resp.status_code == 404:
            return None
        _check(resp, f"get job {submission_id}")
        return resp.json()

    def submit(
        self,
        submission_id: str,
        entrypoint: str,
        runtime_env: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        entrypoint_num_cpus: float | None = None,
        entrypoint_memory: int | None = None,
    ) -> str:
        """Submit; ``entrypoint_num_cpus``/``entrypoint_memory`` are the driver's own resources, so
        Ray places it on a node that has them (never a KubeRay head with ``num-cpus: 0``).

        A ``runtime_env`` whose ``working_dir`` is a local directory is submitted through Ray's
        public ``JobSubmissionClient``, which first uploads the directory as a content-addressed
        package (``excludes`` and ``.gitignore`` honoured; a package the cluster already has is
        not sent again): the REST API itself accepts only package URIs."""
        if uploads_working_dir(runtime_env):
            return self._submit_uploading(
                submission_id, entrypoint, runtime_env, metadata, entrypoint_num_cpus, entrypoint_memory
            )
        body: dict[str, Any] = {"entrypoint": entrypoint, "submission_id": submission_id}
        if runtime_env:
            body["runtime_env"] = runtime_env
        if metadata:
            body["metadata"] = metadata
        if entrypoint_num_cpus is not None:
            body["entrypoint_num_cpus"] = entrypoint_num_cpus
        if entrypoint_memory is not None:
            body["entrypoint_memory"] = int(entrypoint_memory)
        resp = self._client.post("/api/jobs/", json=body)
        _check(resp, f"submit job {submission_id}")
        return resp.json().get("submission_id", submission_id)

    def _submit_uploading(
        self,
        submission_id: str,
        entrypoint: str,
        runtime_env: dict[str, Any],
        metadata: dict[str, str] | None,
        entrypoint_num_cpus: float | None,
        entrypoint_memory: int | None,
    ) -> str:
        from ray.job_submission import JobSubmissionClient

        try:
            client = JobSubmissionClient(self.address, headers=dict(self._auth))
            return client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env=runtime_env,
                metadata=dict(metadata or {}),
                entrypoint_num_cpus=entrypoint_num_cpus,
                entrypoint_memory=None if entrypoint_memory is None else int(entrypoint_memory),
            )
        except (RuntimeError, ConnectionError) as exc:  # what Ray's client raises for a refused request
            raise RayJobsApiError(
                f"Ray Jobs API: submit job {submission_id} (working_dir {runtime_env['working_dir']} uploaded "
                f"first) failed: {str(exc)[:500]}"
            ) from exc

    def logs(self, submission_id: str) -> str:
        resp = self._client.get(f"/api/jobs/{submission_id}/logs")
        _check(resp, f"logs of job {submission_id}")
        return resp.json().get("logs", "")

    def stop(self, submission_id: str) -> bool:
        resp = self._client.post(f"/api/jobs/{submission_id}/stop")
        if resp.status_code == 404:
            return False
        _check(resp, f"stop job {submission_id}")
        return bool(resp.json().get("stopped", False))


class AsyncRayJobsClient:
    """Non-blocking client used by triggers."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 30.0):
        self.address = address.rstrip("/")
        self.token = token  # kept for the log stream's connection; never logged
        self._client = httpx.AsyncClient(
            base_url=self.address, headers=_headers(token), timeout=timeout, verify=tls_context()
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def get(self, submission_id: str) -> dict[str, Any] | None:
        resp = await self._client.get(f"/api/jobs/{submission_id}")
        if resp.status_code == 404:
            return None
        _check(resp, f"get job {submission_id}")
        return resp.json()

    async def logs(self, submission_id: str) -> str:
        resp = await self._client.get(f"/api/jobs/{submission_id}/logs")
        _check(resp, f"logs of job {submission_id}")
        return resp.json().get("logs", "")

    async def stop(self, submission_id: str) -> bool:
        resp = await self._client.post(f"/api/jobs/{submission_id}/stop")
        if resp.status_code == 404:
            return False
        _check(resp, f"stop job {submission_id}")
        return bool(resp.json().get("stopped", False))


def _base_hook():
    from airflow.sdk import BaseHook

    return BaseHook


class RayJobsHook(_base_hook()):
    """Airflow hook for an existing Ray cluster: the connection's host is the dashboard
    address (``http://ray-head:8265``), its password the auth token (optional)."""

    conn_name_attr = "ray_conn_id"
    default_conn_name = "ray_default"
    conn_type = CONN_TYPE
    hook_name = HOOK_NAME

    def __init__(self, ray_conn_id: str = default_conn_name, **kwargs):
        super().__init__(**kwargs)
        self.ray_conn_id = ray_conn_id
        self._connection = None

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """The connection form (Airflow < 3.2 reads it here; 3.2+ from the provider info's
        ``ui-field-behaviour``, :data:`airflow_ray.provider_info.FIELD_BEHAVIOUR`, the same dict)."""
        return copy.deepcopy(FIELD_BEHAVIOUR)

    def _conn(self):
        """The connection, looked up once per hook (address and token come from one lookup)."""
        if self._connection is None:
            self._connection = self.get_connection(self.ray_conn_id)
        return self._connection

    def get_address(self) -> str:
        conn = self._conn()
        host = conn.host or ""
        if "://" not in host:
            scheme = conn.schema or "http"
            host = f"{scheme}://{host}"
        if conn.port and host.count(":") < 2:
            host = f"{host}:{conn.port}"
        return host.rstrip("/")

    def get_token(self) -> str | None:
        return self._conn().password or None

    def get_client(self) -> RayJobsClient:
        return RayJobsClient(self.get_address(), self.get_token())
