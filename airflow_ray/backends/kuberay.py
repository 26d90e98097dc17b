"""``kuberay``: a ``RayCluster`` per DAG run on Kubernetes, created through the KubernetesHook.

The RayCluster object is rendered from the provider's ``backends/raycluster.yaml`` with the settings below:
a head (ClusterIP service, token auth), a CPU worker group (``cpu_workers``) and a GPU worker
group (``gpu_workers``), both autoscaled in-tree between min and max replicas. The settings
are the deployment's (:meth:`KubeRayBackend.settings_from`); a run only picks an image the
deployment lists and lowers the worker maxima.

``service_account`` is the *workers'* account (no API access, no token mounted): the head
keeps the account KubeRay creates for the in-tree autoscaler, which needs the API.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from airflow_ray.backends.base import ClusterBackend, check_dashboard_url, narrowed
from airflow_ray.cluster import ClusterHandle
from airflow_ray.errors import ClusterError, ClusterNotReady
from airflow_ray.hooks.kuberay import KubeRayHook, head_pod_ready

TEMPLATE = os.path.join(os.path.dirname(__file__), "raycluster.yaml")
#: The worker groups a run may shrink: setting name -> the template's ``groupName``.
WORKER_GROUPS = {"cpu_workers": "cpu-decode", "gpu_workers": "gpu-stages"}
#: Labels of the RayCluster and of every Ray pod unless the deployment sets ``pod_labels``
#: (the value this repository's include/kuberay/networkpolicy.yaml selects the Ray pods by).
DEFAULT_POD_LABELS = {"app.kubernetes.io/name": "multimodal-embeddings"}


@dataclass(frozen=True)
class WorkerGroup:
    min_replicas: int
    max_replicas: int
    cpu: str = "8"
    memory: str = "32Gi"
    gpus: int = 0
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"worker group needs 0 <= min_replicas <= max_replicas, got {self.min_replicas}-{self.max_replicas}"
            )
        if self.gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {self.gpus}")


@dataclass(frozen=True)
class KubeRayBackend(ClusterBackend):
    """Settings of the kuberay backend; validated on construction."""

    image: str = "rayproject/ray:2.60.0-py311"
    namespace: str = "default"
    service_account: str | None = None
    kubernetes_conn_id: str = "kubernetes_default"
    kube_config: str | None = None
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    cpu_workers: WorkerGroup = field(default_factory=lambda: WorkerGroup(1, 8))
    gpu_workers: WorkerGroup = field(
        default_factory=lambda: WorkerGroup(
            0,
            8,
            cpu="8",
            memory="64Gi",
            gpus=1,
            tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
        )
    )
    idle_timeout_s: int = 120
    ready_timeout_s: float = 900.0
    poll_interval_s: float = 10.0
    #: extra labels of the RayCluster object
    labels: dict[str, str] = field(default_factory=dict)
    #: labels of the RayCluster and of every Ray pod (what a NetworkPolicy selects the pods by)
    pod_labels: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_POD_LABELS))
    #: the label of the RayCluster whose value is the cluster's name
    cluster_label: str = "ray-embeddings/cluster"
    name: str = "kuberay"
    deletes_cluster: ClassVar[bool] = True

    @classmethod
    def settings_from(cls, choices: Mapping[str, Any], deployment: Mapping[str, Any]) -> dict[str, Any]:
        """*deployment*: this class's settings (``None`` values are left to the defaults), and
        ``images``, the images a run may pick (the first is the default); *choices*: ``image``,
        ``cpu_workers_max`` and ``gpu_workers_max`` (each lowers that group's ``max_replicas``,
        and its ``min_replicas`` with it, never raises them)."""
        cfg = {k: v for k, v in deployment.items() if k != "images" and v is not None}
        image = narrowed(choices.get("image") or None, deployment.get("images"), "image")
        if image:
            cfg["image"] = image
        for group in WORKER_GROUPS:
            g = dict(deployment.get(group) or {})
            chosen = choices.get(f"{group}_max")
            if chosen is not None:
                g = g or dataclasses.asdict(getattr(cls(), group))
                g["max_replicas"] = min(int(chosen), int(g["max_replicas"]))
                g["min_replicas"] = min(int(g.get("min_replicas", 0)), g["max_replicas"])
            if g:
                cfg[group] = g
        return cfg

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KubeRayBackend:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown kuberay backend setting(s) {unknown}; known: {sorted(known)}")
        cfg = dict(config)
        for group in ("cpu_workers", "gpu_workers"):
            if isinstance(cfg.get(group), dict):
                g = dict(cfg[group])
                g["tolerations"] = tuple(g.get("tolerations", ()))
                cfg[group] = WorkerGroup(**g)
        return cls(**cfg)

    # ------------------------------------------------------------------ render
    def render(self, cluster_name: str) -> dict[str, Any]:
        import yaml

        with open(TEMPLATE) as fh:
            body = yaml.safe_load(fh)
        body = copy.deepcopy(body)
        body["metadata"] = {
            "name": cluster_name,
            "namespace": self.namespace,
            "labels": {
                **body["metadata"].get("labels", {}),
                **self.pod_labels,
                **self.labels,
                self.cluster_label: cluster_name,
            },
        }
        head_template = body["spec"]["headGroupSpec"]["template"]
        head_template["metadata"]["labels"] = {**head_template["metadata"]["labels"], **self.pod_labels}
        head = head_template["spec"]
        head["containers"][0]["image"] = self.image
        head["containers"][0]["resources"] = {
            "requests": {"cpu": self.head_cpu, "memory": self.head_memory},
            "limits": {"cpu": self.head_cpu, "memory": self.head_memory},
        }
        body["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] = self.idle_timeout_s
        groups = {g["groupName"]: g for g in body["spec"]["workerGroupSpecs"]}
        for setting, group_name in WORKER_GROUPS.items():
            cfg, g = getattr(self, setting), groups[group_name]
            g["template"]["metadata"]["labels"] = {**g["template"]["metadata"]["labels"], **self.pod_labels}
            g["minReplicas"], g["maxReplicas"], g["replicas"] = cfg.min_replicas, cfg.max_replicas, cfg.min_replicas
            pod = g["template"]["spec"]
            pod["containers"][0]["image"] = self.image
            res = {"cpu": cfg.cpu, "memory": cfg.memory}
            if cfg.gpus:
                res["nvidia.com/gpu"] = str(cfg.gpus)
            pod["containers"][0]["resources"] = {"requests": dict(res), "limits": dict(res)}
            if cfg.node_selector:
                pod["nodeSelector"] = dict(cfg.node_selector)
            if cfg.tolerations:
                pod["tolerations"] = [dict(t) for t in cfg.tolerations]
            if self.service_account:
                pod["serviceAccountName"] = self.service_account
        return body

    # ------------------------------------------------------------------ lifecycle
    def _hook(self) -> KubeRayHook:
        return KubeRayHook(self.kubernetes_conn_id, self.kube_config)

    def _secret_name(self, obj: dict[str, Any] | None, cluster_name: str) -> str:
        auth = ((obj or {}).get("spec") or {}).get("authOptions") or {}
        return auth.get("secretName") or cluster_name

    def handle_for(self, cluster_name: str) -> ClusterHandle:
        return ClusterHandle(
            backend=self.name, name=cluster_name, dashboard_url="", details={"namespace": self.namespace}
        )

    def _ready_handle(self, cluster_name: str, obj: dict[str, Any] | None) -> ClusterHandle:
        address = self._hook().dashboard_address(cluster_name, self.namespace)
        return ClusterHandle(self.name, cluster_name, address, {"namespace": self.namespace})

    def credentials(self, handle: ClusterHandle) -> tuple[str, str | None]:
        """The cluster's head service in the deployment's namespace (the handle must name its
        address), and the Secret KubeRay made for this RayCluster (its ``authOptions``), read
        through the deployment's Kubernetes connection."""
        hook = self._hook()
        address = check_dashboard_url(handle, hook.dashboard_address(handle.name, self.namespace))
        obj = hook.get_cluster(handle.name, self.namespace)
        return address, hook.read_secret_value(self.namespace, self._secret_name(obj, handle.name), "auth_token")

    def create(self, cluster_name: str) -> tuple[dict[str, Any], bool]:
        return self._hook().create_cluster(self.render(cluster_name))

    def up(self, cluster_name: str) -> ClusterHandle:
        """Blocking variant: create (or adopt) and poll until the head pod is ready."""
        obj, _ = self.create(cluster_name)
        deadline = time.monotonic() + self.ready_timeout_s
        while not head_pod_ready(obj):
            if time.monotonic() > deadline:
                raise ClusterNotReady(
                    f"RayCluster {self.namespace}/{cluster_name}: head pod not ready after {self.ready_timeout_s:.0f}s"
                )
            time.sleep(self.poll_interval_s)
            obj = self._hook().get_cluster(cluster_name, self.namespace)
            if obj is None:
                raise ClusterError(f"RayCluster {self.namespace}/{cluster_name} disappeared while starting")
        return self._ready_handle(cluster_name, obj)

    def up_deferrable(self, operator, cluster_name: str) -> dict[str, Any]:
        """From a setup operator: create (or adopt); defer the wait for HeadPodReady."""
        from airflow_ray.triggers.ray_cluster import RayClusterReadyTrigger

        obj, created = self.create(cluster_name)
        operator.log.info("%s RayCluster %s/%s", "created" if created else "adopted", self.namespace, cluster_name)
        if head_pod_ready(obj):
            return self._ready_handle(cluster_name, obj).to_dict()
        operator.defer(
            trigger=RayClusterReadyTrigger(
                name=cluster_name,
                namespace=self.namespace,
                deadline=time.time() + self.ready_timeout_s,
                kubernetes_conn_id=self.kubernetes_conn_id,
                kube_config=self.kube_config,
                poll_interval=self.poll_interval_s,
            ),
            method_name="execute_complete",
        )
        raise AssertionError("defer() returned")  # pragma: no cover - defer always raises

    def complete(self, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("status") != "ready":
            raise ClusterNotReady(
                f"RayCluster {self.namespace}/{event.get('name')} {event.get('status')}: {event.get('message', '')}"
            )
        obj = self._hook().get_cluster(event["name"], self.namespace)
        return self._ready_handle(event["name"], obj).to_dict()

    def down(self, handle: ClusterHandle) -> None:
        namespace = handle.details.get("namespace", self.namespace)
        self._hook().delete_cluster(handle.name, namespace)

    # ------------------------------------------------------------------ capacity
    def capacity_nodes(self, handle: ClusterHandle) -> list[dict[str, float]]:
        """The worker pods the RayCluster can grow to (its groups at ``max_replicas``), from the
        RayCluster these settings render: the autoscaler adds nodes as jobs queue."""
        from airflow_ray.capacity import nodes_from_raycluster

        return nodes_from_raycluster(self.render(handle.name))
