"""The backend interface: what differs between backends is a method, never a branch on a name.

Settings from a deployment narrowed by a run's choices (``settings_from``), the nodes a
cluster's capacity is computed from (``capacity_nodes``), and a setup operator that starts
every backend the same way. No Ray cluster runs here: a loopback stand-in of a dashboard
answers for the live ones, and the KubeRay one is read from its rendered RayCluster."""

from __future__ import annotations

import json

import pytest

from airflow_ray.backends import BACKENDS, backend_class, backend_settings, cluster_nodes, get_backend
from airflow_ray.backends.base import ClusterBackend
from airflow_ray.backends.existing import ExistingClusterBackend
from airflow_ray.backends.kuberay import KubeRayBackend
from airflow_ray.backends.local import LocalRayBackend
from airflow_ray.capacity import max_in_flight, nodes_from_raycluster
from airflow_ray.cluster import ClusterHandle
from airflow_ray.operators.ray_cluster import RayClusterSetupOperator
from tests.airflow_ray.standins import StandInTaskInstance
from tests.topology.ray_cluster_standin import RayClusterStandIn

TOKEN = "standin-token-for-this-test"

#: A deployment's kuberay section, as a DAG's configuration holds it (``images``: what a run may pick).
KUBERAY = {
    "images": ["registry.example.com/ray:2.60.0-cuda", "registry.example.com/ray:2.60.0-cpu"],
    "namespace": "ml-batch",
    "service_account": "ray-workers",
    "kubernetes_conn_id": "kubernetes_default",
    "kube_config": None,
    "cpu_workers": {"min_replicas": 2, "max_replicas": 8, "cpu": "8", "memory": "32Gi"},
    "gpu_workers": {"min_replicas": 1, "max_replicas": 4, "gpus": 1, "cpu": "12", "memory": "96Gi"},
}


def test_every_backend_implements_the_whole_interface():
    for name in BACKENDS:
        cls = backend_class(name)
        assert issubclass(cls, ClusterBackend), name
        backend = get_backend(name, {})  # an abstract method left out would refuse to instantiate
        assert backend.name == name and isinstance(backend.deletes_cluster, bool)
    assert {name for name in BACKENDS if backend_class(name).on_this_host} == {"local"}
    with pytest.raises(ValueError, match="unknown cluster backend 'nomad'"):
        get_backend("nomad")
    with pytest.raises(ValueError, match="unknown cluster backend"):
        backend_settings("nomad", {}, {})


# ---------------------------------------------------------------------------------------------- settings
def test_local_settings_take_the_chosen_cpus_within_the_deployments_maximum():
    assert backend_settings("local", {"num_cpus": 3}, {"max_num_cpus": 16}) == {"num_cpus": 3}
    assert backend_settings("local", {"num_cpus": "3"}, {}) == {"num_cpus": 3}
    assert backend_settings("local", {"num_cpus": None}, {"num_cpus": 2, "temp_root": None}) == {"num_cpus": 2}
    assert backend_settings("local", {}, {"object_store_memory": 1 << 28}) == {"object_store_memory": 1 << 28}
    with pytest.raises(ValueError, match=r"num_cpus 64 is not one the deployment allows \(1 to 16\)"):
        backend_settings("local", {"num_cpus": 64}, {"max_num_cpus": 16})
    with pytest.raises(ValueError, match="unknown local backend setting"):
        backend_settings("local", {}, {"num_cpu": 2})
    LocalRayBackend.from_config(backend_settings("local", {"num_cpus": 3}, {"max_num_cpus": 16}))


def test_existing_settings_name_only_a_connection_the_deployment_lists():
    listed = {"conn_ids": ["ray_default", "ray_shared"]}
    assert backend_settings("existing", {"conn_id": "ray_shared"}, listed) == {"conn_id": "ray_shared"}
    assert backend_settings("existing", {"conn_id": None}, listed) == {"conn_id": "ray_default"}
    assert backend_settings("existing", {"conn_id": "anything"}, {}) == {"conn_id": "anything"}
    assert backend_settings("existing", {}, {}) == {}  # the backend's own default connection
    with pytest.raises(ValueError, match="connection 'postgres_default' is not one the deployment allows"):
        backend_settings("existing", {"conn_id": "postgres_default"}, listed)
    with pytest.raises(ValueError, match="unknown existing backend setting"):
        backend_settings("existing", {}, {"conn_id": "ray_default"})
    assert ExistingClusterBackend.from_config({"conn_id": "ray_shared"}).conn_id == "ray_shared"


def test_kuberay_settings_are_the_deployments_narrowed_by_the_choices():
    cfg = backend_settings("kuberay", {}, KUBERAY)
    assert cfg["image"] == KUBERAY["images"][0], "no choice: the deployment's first image"
    assert "images" not in cfg and "kube_config" not in cfg, "the list and unset (None) settings are not settings"
    assert cfg["cpu_workers"] == KUBERAY["cpu_workers"] and cfg["gpu_workers"] == KUBERAY["gpu_workers"]

    chosen = {"image": KUBERAY["images"][1], "cpu_workers_max": 1, "gpu_workers_max": 2}
    cfg = backend_settings("kuberay", chosen, KUBERAY)
    assert cfg["image"] == KUBERAY["images"][1]
    assert cfg["cpu_workers"] == {**KUBERAY["cpu_workers"], "max_replicas": 1, "min_replicas": 1}, "min follows"
    assert cfg["gpu_workers"] == {**KUBERAY["gpu_workers"], "max_replicas": 2}
    assert KUBERAY["cpu_workers"]["max_replicas"] == 8, "the deployment's own section is left as it was"

    raised = backend_settings("kuberay", {"cpu_workers_max": 100, "gpu_workers_max": None}, KUBERAY)
    assert raised["cpu_workers"]["max_replicas"] == 8, "a choice lowers a maximum, never raises it"
    with pytest.raises(ValueError, match=r"image 'evil\.example/ray:latest' is not one the deployment allows"):
        backend_settings("kuberay", {"image": "evil.example/ray:latest"}, KUBERAY)

    manifest = KubeRayBackend.from_config(cfg).render("emb-x-0123456789")  # a valid backend config
    groups = {g["groupName"]: g for g in manifest["spec"]["workerGroupSpecs"]}
    assert (groups["cpu-decode"]["minReplicas"], groups["cpu-decode"]["maxReplicas"]) == (1, 1)
    assert groups["gpu-stages"]["maxReplicas"] == 2
    assert manifest["metadata"]["namespace"] == "ml-batch"


def test_kuberay_choices_without_a_deployment_group_shrink_the_backends_default():
    cfg = backend_settings("kuberay", {"gpu_workers_max": 3}, {"namespace": "ns"})
    default = KubeRayBackend().gpu_workers
    assert cfg["gpu_workers"]["max_replicas"] == 3 and cfg["gpu_workers"]["gpus"] == default.gpus
    assert "cpu_workers" not in cfg and "image" not in cfg
    assert KubeRayBackend.from_config(cfg).gpu_workers.max_replicas == 3


def test_kuberay_pod_labels_and_the_cluster_label_are_settings():
    backend = KubeRayBackend.from_config(
        {
            "pod_labels": {"app.kubernetes.io/name": "batch"},
            "cluster_label": "example.com/cluster",
            "labels": {"t": "x"},
        }
    )
    manifest = backend.render("c-0123456789")
    assert manifest["metadata"]["labels"] == {
        "app.kubernetes.io/name": "batch",
        "app.kubernetes.io/component": "ray",
        "t": "x",
        "example.com/cluster": "c-0123456789",
    }
    spec = manifest["spec"]
    for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        assert template["metadata"]["labels"] == {
            "app.kubernetes.io/name": "batch",
            "app.kubernetes.io/component": "ray",
        }


# ---------------------------------------------------------------------------------------------- capacity
def test_kuberay_capacity_is_its_rendered_raycluster_at_maximum_replicas():
    """No cluster is contacted: the nodes are what the settings render."""
    settings = backend_settings("kuberay", {"cpu_workers_max": 2, "gpu_workers_max": 3}, KUBERAY)
    handle = ClusterHandle(backend="kuberay", name="emb-x-0123456789", dashboard_url="http://127.0.0.1:9")
    nodes = cluster_nodes(handle.to_dict(), settings)
    assert nodes == [{"CPU": 8.0, "GPU": 0.0}] * 2 + [{"CPU": 12.0, "GPU": 1.0}] * 3
    backend = get_backend("kuberay", settings)
    assert backend.capacity_nodes(handle) == nodes_from_raycluster(backend.render(handle.name))


def test_live_backends_capacity_is_the_clusters_alive_nodes(monkeypatch, tmp_path):
    with RayClusterStandIn(delays=[], nodes=3, node_resources={"CPU": 8.0, "GPU": 1.0}, token=TOKEN) as cluster:
        monkeypatch.setenv(
            "AIRFLOW_CONN_RAY_TEST", json.dumps({"conn_type": "ray_dashboard", "host": cluster.url, "password": TOKEN})
        )
        borrowed = ClusterHandle(backend="existing", name="emb-x", dashboard_url=cluster.url)
        expected = [{"CPU": 8.0, "GPU": 1.0}] * 3
        assert cluster_nodes(borrowed, {"conn_id": "ray_test"}) == expected
        assert cluster_nodes(borrowed.to_dict(), {"conn_id": "ray_test"}) == expected
        result = max_in_flight(_footprint(cpus=4.0, gpus=1.0), expected, None)
        assert result["max_in_flight"] == 3 and result["nodes"] == 3


def _footprint(cpus: float, gpus: float = 0.0, driver_cpus: float = 0.25) -> dict:
    return {"bundles": [{"name": "work", "cpus": cpus, "gpus": gpus, "count": 1}], "driver_cpus": driver_cpus}


# ---------------------------------------------------------------------------------------------- operator
def test_setup_operator_starts_a_backend_that_does_not_defer_without_naming_it(monkeypatch):
    """``existing`` (like ``local``) comes up at once: the same call as ``kuberay``'s, no branch."""
    with RayClusterStandIn(delays=[], token=TOKEN) as cluster:
        monkeypatch.setenv(
            "AIRFLOW_CONN_RAY_TEST", json.dumps({"conn_type": "ray_dashboard", "host": cluster.url, "password": TOKEN})
        )
        op = RayClusterSetupOperator(task_id="cluster_up", backend="existing", backend_config={"conn_id": "ray_test"})
        handle = op.execute({"ti": StandInTaskInstance(dag_id="nightly", run_id="scheduled__1")})
    assert handle["backend"] == "existing" and handle["dashboard_url"] == cluster.url
    assert "token" not in handle, "the handle names no token source"
    assert TOKEN not in json.dumps(handle)
    with pytest.raises(NotImplementedError, match="never defers"):
        op.execute_complete({}, {"status": "ready"})


def test_the_local_heads_environment_is_allow_listed():
    from airflow_ray.backends.local import head_environment

    worker = {
        "PATH": "/usr/bin",
        "HOME": "/home/a",
        "LC_ALL": "C.UTF-8",
        "AWS_REGION": "eu-west-1",
        "RAY_DEDUP_LOGS": "0",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://u:pw@db/airflow",
        "AIRFLOW__CORE__FERNET_KEY": "k",
        "AIRFLOW__API_AUTH__JWT_SECRET": "j",
        "AIRFLOW_CONN_WAREHOUSE": "postgresql://u:pw@h/db",
        "AIRFLOW_VAR_X": "v",
        "RAY_AUTH_TOKEN": "someone else's",
        "RAY_ADDRESS": "ray://elsewhere:10001",
        "SOME_APP_PASSWORD": "p",
        "MY_SETTING": "m",
    }
    assert head_environment(worker) == {
        "PATH": "/usr/bin",
        "HOME": "/home/a",
        "LC_ALL": "C.UTF-8",
        "AWS_REGION": "eu-west-1",
        "RAY_DEDUP_LOGS": "0",
    }
    assert head_environment(worker, ("MY_SETTING",))["MY_SETTING"] == "m"
    assert "AIRFLOW_CONN_WAREHOUSE" not in head_environment(worker, ("AIRFLOW_CONN_WAREHOUSE",))
