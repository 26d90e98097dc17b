"""RayCluster lifecycle through the cncf-kubernetes provider's ``KubernetesHook``.

Only the calls ``include/kuberay/rbac.yaml`` grants: create/get/delete ``rayclusters``,
get ``secrets`` (the token KubeRay generates) and get ``services`` (the head service).
"""

from __future__ import annotations

import base64
from typing import Any

from airflow_ray.errors import ClusterError

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayclusters"


def _status(exc: Exception) -> int | None:
    return getattr(exc, "status", None)


class KubeRayHook:
    """Thin, typed wrapper; the Kubernetes client is imported only when a method runs."""

    def __init__(self, kubernetes_conn_id: str | None = "kubernetes_default", config_file: str | None = None):
        self.kubernetes_conn_id = kubernetes_conn_id or "kubernetes_default"
        self.config_file = config_file

    def _hook(self):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        return KubernetesHook(conn_id=self.kubernetes_conn_id, config_file=self.config_file)

    def create_cluster(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create the RayCluster; if it already exists, return it. ``(object, created)``."""
        from kubernetes.client.exceptions import ApiException

        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        hook = self._hook()
        try:
            obj = hook.custom_object_client.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
            return obj, True
        except ApiException as exc:
            if exc.status == 409:
                existing = self.get_cluster(name, ns)
                if existing is not None:
                    return existing, False
            raise ClusterError(f"creating RayCluster {ns}/{name} failed: HTTP {exc.status} {exc.reason}") from None

    def get_cluster(self, name: str, namespace: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._hook().custom_object_client.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise ClusterError(
                f"reading RayCluster {namespace}/{name} failed: HTTP {exc.status} {exc.reason}"
            ) from None

    def delete_cluster(self, name: str, namespace: str) -> bool:
        """Delete; ``False`` when it was already gone (a 404 is success)."""
        from kubernetes.client.exceptions import ApiException

        try:
            self._hook().custom_object_client.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise ClusterError(
                f"deleting RayCluster {namespace}/{name} failed: HTTP {exc.status} {exc.reason}"
            ) from None

    def read_secret_value(self, namespace: str, name: str, key: str) -> str:
        from kubernetes.client.exceptions import ApiException

        try:
            secret = self._hook().core_v1_client.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            raise ClusterError(f"reading Secret {namespace}/{name} failed: HTTP {exc.status} {exc.reason}") from None
        data = secret.data or {}
        if key not in data:
            raise ClusterError(f"Secret {namespace}/{name} has no key {key!r}")
        return base64.b64decode(data[key]).decode().strip()

    def dashboard_address(self, cluster: str, namespace: str) -> str:
        """``http://{head service}.{namespace}.svc.cluster.local:{dashboard port}``."""
        from kubernetes.client.exceptions import ApiException

        svc_name = f"{cluster}-head-svc"
        try:
            svc = self._hook().core_v1_client.read_namespaced_service(svc_name, namespace)
        except ApiException as exc:
            raise ClusterError(
                f"reading Service {namespace}/{svc_name} failed: HTTP {exc.status} {exc.reason}"
            ) from None
        port = next((p.port for p in (svc.spec.ports or []) if p.name == "dashboard"), 8265)
        return f"http://{svc_name}.{namespace}.svc.cluster.local:{port}"


def head_pod_ready(obj: dict[str, Any] | None) -> bool:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "HeadPodReady" and str(cond.get("status")) == "True":
            return True
    return False
