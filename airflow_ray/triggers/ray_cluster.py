"""Wait for a RayCluster's ``HeadPodReady`` condition without blocking the triggerer.

The Kubernetes client is synchronous, so each poll runs in a thread. The deadline is an
absolute time in the kwargs, so a trigger rebuilt on another triggerer keeps the same one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_ray.hooks.kuberay import KubeRayHook, head_pod_ready


class RayClusterReadyTrigger(BaseTrigger):
    def __init__(
        self,
        name: str,
        namespace: str,
        deadline: float,
        kubernetes_conn_id: str | None = "kubernetes_default",
        kube_config: str | None = None,
        poll_interval: float = 10.0,
    ):
        super().__init__()
        self.name = name
        self.namespace = namespace
        self.deadline = deadline
        self.kubernetes_conn_id = kubernetes_conn_id
        self.kube_config = kube_config
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "name": self.name,
                "namespace": self.namespace,
                "deadline": self.deadline,
                "kubernetes_conn_id": self.kubernetes_conn_id,
                "kube_config": self.kube_config,
                "poll_interval": self.poll_interval,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = KubeRayHook(self.kubernetes_conn_id, self.kube_config)
        while True:
            try:
                obj = await asyncio.to_thread(hook.get_cluster, self.name, self.namespace)
            except Exception as exc:
                yield TriggerEvent({"status": "error", "name": self.name, "message": str(exc)})
                return
            if obj is None:
                yield TriggerEvent({"status": "missing", "name": self.name, "message": "RayCluster was deleted"})
                return
            if head_pod_ready(obj):
                yield TriggerEvent({"status": "ready", "name": self.name, "namespace": self.namespace})
                return
            if time.time() >= self.deadline:
                state = (obj.get("status") or {}).get("state", "unknown")
                yield TriggerEvent(
                    {"status": "timeout", "name": self.name, "message": f"head pod not ready (state {state})"}
                )
                return
            await asyncio.sleep(min(self.poll_interval, max(0.0, self.deadline - time.time()) + 0.01))
