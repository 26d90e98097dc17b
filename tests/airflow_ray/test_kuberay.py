"""KubeRay backend: manifests against the real CRD, lifecycle against an HTTP stand-in API."""

import functools
import os
import time

import pytest
import yaml
from airflow.sdk.exceptions import TaskDeferred

from airflow_ray.backends.kuberay import KubeRayBackend, WorkerGroup
from airflow_ray.errors import ClusterError, ClusterNotReady
from airflow_ray.naming import cluster_name
from airflow_ray.operators.ray_cluster import RayClusterSetupOperator, RayClusterTeardownOperator
from airflow_ray.triggers.ray_cluster import RayClusterReadyTrigger
from tests.airflow_ray.k8s_standin import K8sStandIn
from tests.airflow_ray.standins import StandInTaskInstance, run_trigger

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CRDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kuberay_crds")  # vendored, with their version


@functools.lru_cache(maxsize=4)
def _load_crd(path):
    with open(path) as fh:
        crd = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def _crd_schema(kind_file):
    return _load_crd(os.path.join(CRDS, kind_file))


def unknown_fields(obj, schema, path="") -> list[str]:
    """Keys the schema does not declare (the API server would silently prune them)."""
    out = []
    if isinstance(obj, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return out
        if path.endswith("metadata") and "properties" not in schema:
            return out  # ObjectMeta: declared as a bare object in CRDs, validated by the API server itself
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                out += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += unknown_fields(value, extra, f"{path}.{key}")
            elif extra is True:
                continue
            else:
                out.append(f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


def _validate(manifest):
    import jsonschema

    schema = _crd_schema("ray.io_rayclusters.yaml")
    jsonschema.validate(manifest, schema)
    assert unknown_fields(manifest, schema) == []


GPU_CONFIG = {
    "image": "registry.example.com/emb-ray:2.60.0-cuda",
    "namespace": "ml-batch",
    "service_account": "ray-embeddings",
    "gpu_workers": {
        "min_replicas": 0,
        "max_replicas": 16,
        "gpus": 1,
        "cpu": "12",
        "memory": "96Gi",
        "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "cpu_workers": {"min_replicas": 2, "max_replicas": 32, "cpu": "16", "memory": "64Gi"},
    "labels": {"team": "ml-platform"},
}


@pytest.mark.parametrize("config", [{}, GPU_CONFIG], ids=["defaults", "gpu-node-pool"])
def test_rendered_raycluster_validates_against_the_crd_with_no_unknown_fields(config):
    manifest = KubeRayBackend.from_config(config).render("emb-nightly-0123456789")
    _validate(manifest)
    spec = manifest["spec"]
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-decode", "gpu-stages"}
    gpu = groups["gpu-stages"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    if config:
        assert manifest["metadata"]["namespace"] == "ml-batch"
        assert gpu["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
        assert groups["cpu-decode"]["maxReplicas"] == 32 and groups["gpu-stages"]["maxReplicas"] == 16
        assert gpu["serviceAccountName"] == "ray-embeddings"
        assert "serviceAccountName" not in spec["headGroupSpec"]["template"]["spec"]  # KubeRay's, for the autoscaler


def test_a_misspelt_field_is_caught():
    manifest = KubeRayBackend().render("emb-x-0123456789")
    manifest["spec"]["enableInTreeAutoscalling"] = True
    schema = _crd_schema("ray.io_rayclusters.yaml")
    assert unknown_fields(manifest, schema) == [".spec.enableInTreeAutoscalling"]


def test_bad_backend_settings_are_refused():
    with pytest.raises(ValueError, match="unknown kuberay backend setting"):
        KubeRayBackend.from_config({"imagee": "x"})
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        WorkerGroup(3, 1)


def test_rbac_grants_exactly_what_the_hook_calls(tmp_path):
    with open(os.path.join(ROOT, "include", "kuberay", "rbac.yaml")) as fh:
        docs = list(yaml.safe_load_all(fh))
    role = next(d for d in docs if d["kind"] == "Role")
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    with K8sStandIn(ready_after_gets=1) as api:
        backend = KubeRayBackend.from_config(
            {"kube_config": api.kubeconfig(tmp_path / "kc"), "namespace": "ns", "poll_interval_s": 0.05}
        )
        handle = backend.up("emb-rbac-0123456789")
        backend.credentials(handle)
        backend.down(handle)
        backend.down(handle)
        used = {(res, verb) for verb, res, _ in api.calls}
    assert used == granted


def _setup(config, ti):
    op = RayClusterSetupOperator(task_id="cluster_up", backend="kuberay", backend_config=config)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    return op, deferred.value.trigger


def test_lifecycle_create_wait_ready_adopt_delete(tmp_path):
    with K8sStandIn(ready_after_gets=3) as api:
        config = {"kube_config": api.kubeconfig(tmp_path / "kc"), "namespace": "ns", "poll_interval_s": 0.05}
        ti = StandInTaskInstance()
        op, trigger = _setup(config, ti)
        assert isinstance(trigger, RayClusterReadyTrigger)
        name = cluster_name(ti.dag_id, ti.run_id)
        assert trigger.name == name and ("ns", name) in api.clusters
        rebuilt = RayClusterReadyTrigger(**trigger.serialize()[1])  # survives a triggerer restart
        event = run_trigger(rebuilt)
        assert event == {"status": "ready", "name": name, "namespace": "ns"}
        handle = op.execute_complete({"ti": ti}, event)
        assert handle["dashboard_url"] == f"http://{name}-head-svc.ns.svc.cluster.local:8265"
        assert handle == {
            "backend": "kuberay",
            "name": name,
            "dashboard_url": handle["dashboard_url"],
            "details": {"namespace": "ns"},
        }, "the handle names no Secret, connection or path"
        assert api.token not in repr(handle) and api.token not in repr(trigger.serialize())

        # a retried setup adopts the cluster: one create attempt answered 409, no second cluster
        op2 = RayClusterSetupOperator(task_id="cluster_up", backend="kuberay", backend_config=config)
        again = op2.execute({"ti": StandInTaskInstance()})  # ready now: no deferral
        assert again == handle and len(api.clusters) == 1

        from airflow_ray.cluster import ClusterHandle

        backend = KubeRayBackend.from_config(config)
        assert backend.credentials(ClusterHandle.from_dict(handle)) == (handle["dashboard_url"], api.token)
        forged = ClusterHandle.from_dict({**handle, "dashboard_url": "http://collector.example:8265"})
        with pytest.raises(ClusterError, match="no token is sent there"):
            backend.credentials(forged)

        teardown = RayClusterTeardownOperator(
            task_id="cluster_down", cluster=handle, backend="kuberay", backend_config=config
        )
        teardown.execute({"ti": ti})
        assert api.clusters == {}
        teardown.execute({"ti": ti})  # already gone: a 404 is success
        # teardown without a handle (setup failed before returning) finds the cluster by name
        _setup(config, StandInTaskInstance())
        RayClusterTeardownOperator(task_id="cluster_down", backend="kuberay", backend_config=config).execute(
            {"ti": StandInTaskInstance()}
        )
        assert api.clusters == {}
        assert ("delete", "rayclusters", name) in api.calls


def test_timeout_when_the_head_never_becomes_ready(tmp_path):
    with K8sStandIn(ready_after_gets=None) as api:
        config = {
            "kube_config": api.kubeconfig(tmp_path / "kc"),
            "namespace": "ns",
            "poll_interval_s": 0.05,
            "ready_timeout_s": 0.5,
        }
        op, trigger = _setup(config, StandInTaskInstance())
        start = time.monotonic()
        event = run_trigger(trigger)
        assert event["status"] == "timeout" and time.monotonic() - start < 5
        with pytest.raises(ClusterNotReady, match="timeout"):
            op.execute_complete({}, event)


# ---------------------------------------------------------------------------------------------- hardening
def _pods(manifest):
    spec = manifest["spec"]
    yield "head", spec["headGroupSpec"]["template"]
    for g in spec["workerGroupSpecs"]:
        yield g["groupName"], g["template"]


def _load_defaults(environ):
    """This repository's deployment (the DAG's defaults file): what its manifests must fit."""
    try:
        from embedding_run.deployment import load_defaults
    except ImportError:  # a tree where the DAG's config module still holds it
        from embedding_run.deployment import load_defaults
    return load_defaults(environ)


def _deployment_manifest():
    from airflow_ray.backends import backend_settings

    deployment = _load_defaults({})["deployment"]
    settings = backend_settings("kuberay", {}, deployment["kuberay"])
    return deployment, KubeRayBackend.from_config(settings).render("emb-x-0123456789")


def test_ray_pods_are_hardened_and_still_validate():
    deployment, manifest = _deployment_manifest()
    _validate(manifest)
    for name, template in _pods(manifest):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, name
        if name == "head":  # KubeRay's per-cluster account: the autoscaler sidecar needs the API
            assert "serviceAccountName" not in pod and "automountServiceAccountToken" not in pod
        else:  # workers never call the API: the deployment's account, no token mounted
            assert pod["automountServiceAccountToken"] is False, name
            assert pod["serviceAccountName"] == deployment["kuberay"]["service_account"], name
    autoscaler = manifest["spec"]["autoscalerOptions"]["securityContext"]
    assert autoscaler["allowPrivilegeEscalation"] is False and autoscaler["capabilities"] == {"drop": ["ALL"]}


def _docs(path):
    with open(os.path.join(ROOT, path)) as fh:
        return list(yaml.safe_load_all(fh))


def _matches(selector, labels):
    ok = all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())
    for expr in selector.get("matchExpressions") or []:
        assert expr["operator"] == "In"
        ok = ok and labels.get(expr["key"]) in expr["values"]
    return ok


def test_network_policy_admits_ray_ports_only_from_airflow_and_ray_pods():
    _, manifest = _deployment_manifest()
    (policy,) = _docs("include/kuberay/networkpolicy.yaml")
    assert policy["kind"] == "NetworkPolicy" and policy["metadata"]["namespace"] == manifest["metadata"]["namespace"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for name, template in _pods(manifest):  # every Ray pod is selected
        assert _matches(policy["spec"]["podSelector"], template["metadata"]["labels"]), name
    ray_rule, airflow_rule = policy["spec"]["ingress"]
    (ray_peer,) = ray_rule["from"]
    assert set(ray_peer) == {"podSelector"} and "ports" not in ray_rule  # Ray pods of this namespace, any port
    (airflow_peer,) = airflow_rule["from"]
    assert airflow_peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "airflow"}}
    assert airflow_rule["ports"] == [{"protocol": "TCP", "port": 8265}]  # the Jobs API only
    (task_pod,) = _docs("include/helm/ray-embeddings-task-pod.yaml")
    assert _matches(airflow_peer["podSelector"], task_pod["metadata"]["labels"]), "the embedding tasks get in"
    assert _matches(airflow_peer["podSelector"], {"component": "triggerer"})
    assert not _matches(airflow_peer["podSelector"], {"component": "api-server"})


def test_embedding_tasks_have_their_own_service_account_and_secret_access_is_namespaced():
    docs = _docs("include/kuberay/rbac.yaml")
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    binding = kinds[("RoleBinding", "airflow-ray-embeddings")]
    subjects = {s["name"] for s in binding["subjects"]}
    assert "airflow-worker" not in subjects, "the shared worker account gets no RayCluster or Secret rights"
    assert subjects == {"airflow-ray-embeddings", "airflow-triggerer"}
    (task_pod,) = _docs("include/helm/ray-embeddings-task-pod.yaml")
    assert task_pod["spec"]["serviceAccountName"] == "airflow-ray-embeddings"
    role = kinds[("Role", "airflow-ray-embeddings")]
    secrets = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]  # no list/watch
    assert role["metadata"]["namespace"] == kinds[("Namespace", "ray-embeddings")]["metadata"]["name"]
    ray_sa = kinds[("ServiceAccount", "ray-embeddings-ray")]
    assert ray_sa["automountServiceAccountToken"] is False
    assert not any(s["name"] == "ray-embeddings-ray" for d in docs if d["kind"] == "RoleBinding" for s in d["subjects"])
    kuberay = _load_defaults({})["deployment"]["kuberay"]
    assert kuberay["namespace"] == "ray-embeddings" and kuberay["service_account"] == "ray-embeddings-ray"
    cfg = _load_defaults({"EMB_DEPLOYMENT_TASK_POD_TEMPLATE_FILE": "/opt/airflow/include/helm/x.yaml"})
    assert cfg["executor_config"] == {"pod_template_file": "/opt/airflow/include/helm/x.yaml"}
