"""How many jobs a cluster runs at once: its nodes ÷ one job's footprint, at run time.

The footprint (:mod:`airflow_ray.footprint`, a plain dict) comes from whoever builds the jobs;
the nodes come from where the cluster's size is known (each backend's ``capacity_nodes``,
:func:`airflow_ray.backends.cluster_nodes`):

* ``local`` / ``existing``: the live cluster's alive nodes and their total resources, from the
  Ray state API on the dashboard (``/api/v0/nodes``), :func:`live_nodes`;
* ``kuberay``: the rendered ``RayCluster``'s worker groups at their *maximum* replicas (the
  autoscaler adds nodes as placement groups queue, so that is what the cluster can grow to;
  the head runs nothing with ``num-cpus: 0``), :func:`nodes_from_raycluster`.
"""

from __future__ import annotations

import re
import time
from typing import Any

from airflow_ray.errors import ClusterError
from airflow_ray.footprint import JobFootprint

_QTY = re.compile(r"^([0-9.]+)(m?)$")


def _cpu(quantity: Any) -> float:
    """A Kubernetes CPU quantity (``"8"``, ``"500m"``, ``2``) as cores."""
    m = _QTY.match(str(quantity).strip())
    if not m:
        raise ClusterError(f"unreadable CPU quantity {quantity!r} in the RayCluster")
    value = float(m.group(1))
    return value / 1000 if m.group(2) else value


def nodes_from_raycluster(raycluster: dict[str, Any]) -> list[dict[str, float]]:
    """One entry per worker pod the RayCluster (its Kubernetes object) can grow to: CPUs and GPUs
    Ray sees on it."""
    nodes: list[dict[str, float]] = []
    for group in raycluster.get("spec", {}).get("workerGroupSpecs", []):
        params = group.get("rayStartParams") or {}
        container = group["template"]["spec"]["containers"][0]
        limits = (container.get("resources") or {}).get("limits") or {}
        cpus = float(params["num-cpus"]) if "num-cpus" in params else _cpu(limits.get("cpu", 0))
        gpus = float(params["num-gpus"]) if "num-gpus" in params else float(limits.get("nvidia.com/gpu", 0))
        replicas = int(group.get("maxReplicas", group.get("replicas", 0)))
        nodes += [{"CPU": cpus, "GPU": gpus} for _ in range(replicas)]
    return nodes


def nodes_from_state_api(payload: dict[str, Any]) -> list[dict[str, float]]:
    """Alive nodes' total resources from ``GET /api/v0/nodes?detail=1``'s JSON."""
    try:
        rows = payload["data"]["result"]["result"]
    except (KeyError, TypeError) as exc:
        raise ClusterError(f"unexpected answer from the Ray state API: {str(payload)[:300]}") from exc
    return [
        {k: float(v) for k, v in (row.get("resources_total") or {}).items() if k in ("CPU", "GPU")}
        for row in rows
        if row.get("state") == "ALIVE"
    ]


def live_nodes(address: str, token: str | None, wait_s: float = 60.0, poll_s: float = 0.25) -> list[dict[str, float]]:
    """The alive nodes of the live cluster whose dashboard is at *address* (what a backend's
    ``credentials`` gives). A head that just came up answers on its dashboard a few seconds
    before its node is listed: wait (bounded) for at least one node with resources."""
    import httpx

    from airflow_ray.errors import RayJobsApiError
    from airflow_ray.hooks.ray_jobs import RayJobsClient

    deadline = time.monotonic() + wait_s
    with RayJobsClient(address, token) as client:
        while True:
            try:
                nodes = nodes_from_state_api(client.nodes())
            except (httpx.TransportError, RayJobsApiError) as exc:
                # a head that just started can drop or 5xx state-API calls while its modules load
                if isinstance(exc, RayJobsApiError) and (exc.status or 500) < 500:
                    raise ClusterError(f"the Ray state API refused the node list: {exc}") from exc
                if time.monotonic() >= deadline:
                    raise ClusterError(f"the Ray state API did not answer within {wait_s:.0f}s: {exc}") from exc
                time.sleep(poll_s)
                continue
            if any(n.get("CPU", 0) or n.get("GPU", 0) for n in nodes) or time.monotonic() >= deadline:
                return nodes
            time.sleep(poll_s)


#: What :func:`max_in_flight` suggests when not even one job fits (a caller may name its own knobs).
DEFAULT_ADVICE = (
    "shrink the job's footprint, give the cluster more resources, or (an autoscaling cluster that will grow) "
    "request a bound on the jobs in flight"
)


def max_in_flight(
    footprint: dict[str, Any],
    nodes: list[dict[str, float]],
    requested: int | None,
    *,
    advice: str = DEFAULT_ADVICE,
) -> dict[str, Any]:
    """The bound on jobs in flight, with what it was derived from (for the task log and XCom).

    *footprint*: one job's, as :meth:`airflow_ray.footprint.JobFootprint.from_dict` reads it;
    *requested*: a bound the caller asks for (None or 0: what the cluster holds).

    Raises :class:`ClusterError` when not even one job fits and no bound was requested, naming
    both sides and ending with *advice*; a requested bound is honoured even then (an
    autoscaling cluster with no workers yet grows as the jobs' reservations queue)."""
    fp = JobFootprint.from_dict(footprint)
    fits = fp.jobs_that_fit(nodes)
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    if fits == 0 and not requested:
        raise ClusterError(
            f"one partition job needs {fp.describe()}, but the cluster holds at most "
            f"CPU:{total['CPU']:g},GPU:{total['GPU']:g} over {len(nodes)} nodes (each bundle on one node): {advice}"
        )
    # A request above what fits is honoured: the extra jobs queue (holding only their drivers),
    # which is what a caller who knows the autoscaler will add nodes asks for.
    limit = int(requested) if requested else fits
    return {
        "max_in_flight": limit,
        "cluster_fits": fits,
        "requested": requested,
        "nodes": len(nodes),
        "cluster_total": total,
        "job_footprint": fp.total(),
    }
