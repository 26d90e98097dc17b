"""The Ray Jobs REST API (the dashboard's ``/api/jobs/``), sync and async, token-aware.

The sync client serves operators (submit, adopt, stop); the async client serves triggers,
so polling never blocks the triggerer's event loop. The token goes in the ``Authorization``
header and nowhere else: not in URLs, logs, exceptions or XCom.
"""

from __future__ import annotations

from typing import Any

import httpx

from airflow_ray.errors import RayJobsApiError

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
ACTIVE = frozenset({"PENDING", "RUNNING"})
FAILED = frozenset({"FAILED", "STOPPED"})


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _check(resp: httpx.Response, what: str) -> None:
    if resp.status_code >= 400:
        body = resp.text[:500]
        hint = " (is the cluster's auth token right?)" if resp.status_code in (401, 403) else ""
        raise RayJobsApiError(f"Ray Jobs API: {what} failed: HTTP {resp.status_code}{hint}: {body}", resp.status_code)


class RayJobsClient:
    """Blocking client for one cluster's dashboard address."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 30.0):
        self.address = address.rstrip("/")
        self._client = httpx.Client(base_url=self.address, headers=_headers(token), timeout=timeout)

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

    def upload_working_dir(self, runtime_env: dict[str, Any]) -> dict[str, Any]:
        """Replace a local ``working_dir`` by a content-addressed package uploaded to the cluster,
        as Ray's own job client does (the REST API accepts only package URIs)."""
        wd = runtime_env.get("working_dir")
        if not wd or "://" in wd:
            return runtime_env
        import tempfile
        from pathlib import Path

        from ray._private.runtime_env.packaging import create_package, get_uri_for_directory

        excludes = list(runtime_env.get("excludes") or [])
        uri = get_uri_for_directory(wd, include_gitignore=True, excludes=excludes)
        protocol, name = uri.split("://", 1)
        path = f"/api/packages/{protocol}/{name}"
        resp = self._client.get(path)
        if resp.status_code == 404:
            with tempfile.TemporaryDirectory() as tmp:
                package = Path(tmp) / name
                create_package(wd, package, include_gitignore=True, excludes=excludes)
                resp = self._client.put(path, content=package.read_bytes())
        _check(resp, f"upload working_dir {wd}")
        out = {k: v for k, v in runtime_env.items() if k != "excludes"}
        out["working_dir"] = uri
        return out

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
        Ray places it on a node that has them (never a KubeRay head with ``num-cpus: 0``)."""
        body: dict[str, Any] = {"entrypoint": entrypoint, "submission_id": submission_id}
        if runtime_env:
            body["runtime_env"] = self.upload_working_dir(runtime_env)
        if metadata:
            body["metadata"] = metadata
        if entrypoint_num_cpus is not None:
            body["entrypoint_num_cpus"] = entrypoint_num_cpus
        if entrypoint_memory is not None:
            body["entrypoint_memory"] = int(entrypoint_memory)
        resp = self._client.post("/api/jobs/", json=body)
        _check(resp, f"submit job {submission_id}")
        return resp.json().get("submission_id", submission_id)

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
        self._client = httpx.AsyncClient(base_url=self.address, headers=_headers(token), timeout=timeout)

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
    conn_type = "ray_dashboard"
    hook_name = "Ray cluster (dashboard address + auth token)"

    def __init__(self, ray_conn_id: str = default_conn_name, **kwargs):
        super().__init__(**kwargs)
        self.ray_conn_id = ray_conn_id

    def _conn(self):
        return self.get_connection(self.ray_conn_id)

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
