"""An HTTP stand-in for the Kubernetes API server, on loopback, for the kuberay backend tests.

No Kubernetes API server runs here, so this serves the handful of endpoints the KubeRay hook
calls (RayCluster create/get/delete, Secret get, Service get) with real Kubernetes JSON
shapes; the provider's real ``KubernetesHook`` and the official client talk to it over HTTP.
It plays the KubeRay operator too: on create it makes the token Secret and the head Service,
and reports ``HeadPodReady`` after ``ready_after_gets`` reads (never, if None).
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CLUSTERS = re.compile(r"^/apis/ray\.io/v1/namespaces/([^/]+)/rayclusters(?:/([^/?]+))?$")
SECRET = re.compile(r"^/api/v1/namespaces/([^/]+)/secrets/([^/?]+)$")
SERVICE = re.compile(r"^/api/v1/namespaces/([^/]+)/services/([^/?]+)$")
# Any namespaced Kubernetes API path: core (/api/v1) or a group (/apis/GROUP/VERSION).
ANY = re.compile(r"^/apis?/(?:[^/]+/)?v[0-9][^/]*/namespaces/[^/]+/([^/]+)(?:/([^/]+))?")
VERBS = {"POST": "create", "DELETE": "delete", "PATCH": "patch", "PUT": "update"}


def call_of(method: str, path: str) -> tuple[str, str, str]:
    """(RBAC verb, resource, name) of any request, served by the stand-in or not."""
    m = ANY.match(path.split("?")[0])
    resource, name = (m.group(1), m.group(2) or "") if m else (path.split("?")[0], "")
    verb = ("get" if name else "list") if method == "GET" else VERBS.get(method, method.lower())
    return verb, resource, name


class K8sStandIn:
    def __init__(self, ready_after_gets: int | None = 2, token: str = "s3cr3t-token-from-kuberay"):
        self.ready_after_gets = ready_after_gets
        self.token = token
        self.clusters: dict[tuple[str, str], dict] = {}
        self.gets: dict[tuple[str, str], int] = {}
        self.calls: list[tuple[str, str, str]] = []  # (RBAC verb, resource, name) of every request
        self.lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def parse_request(self):  # every request is recorded before routing, served or not
                ok = super().parse_request()
                if ok:
                    with standin.lock:
                        standin.calls.append(call_of(self.command, self.path))
                return ok

            def do_PATCH(self):
                self._status(404, "NotFound")

            def do_PUT(self):
                self._status(404, "NotFound")

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code, reason):
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "reason": reason,
                        "code": code,
                        "message": reason,
                    },
                )

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                m = CLUSTERS.match(self.path.split("?")[0])
                if not m or m.group(2):
                    return self._status(404, "NotFound")
                ns, name = m.group(1), body["metadata"]["name"]
                with standin.lock:
                    if (ns, name) in standin.clusters:
                        return self._status(409, "AlreadyExists")
                    body["metadata"]["uid"] = f"uid-{name}"
                    body["status"] = {"state": "", "conditions": []}
                    standin.clusters[(ns, name)] = body
                    standin.gets[(ns, name)] = 0
                self._send(201, body)

            def do_GET(self):
                path = self.path.split("?")[0]
                if m := CLUSTERS.match(path):
                    ns, name = m.groups()
                    with standin.lock:
                        obj = standin.clusters.get((ns, name))
                        if obj is None:
                            return self._status(404, "NotFound")
                        standin.gets[(ns, name)] += 1
                        ready = (
                            standin.ready_after_gets is not None
                            and standin.gets[(ns, name)] >= standin.ready_after_gets
                        )
                        obj["status"] = {
                            "state": "ready" if ready else "",
                            "conditions": [{"type": "HeadPodReady", "status": "True" if ready else "False"}],
                        }
                    return self._send(200, obj)
                if m := SECRET.match(path):
                    ns, name = m.groups()
                    if (ns, name) not in standin.clusters:
                        return self._status(404, "NotFound")
                    return self._send(
                        200,
                        {
                            "kind": "Secret",
                            "apiVersion": "v1",
                            "metadata": {"name": name, "namespace": ns},
                            "data": {"auth_token": base64.b64encode(standin.token.encode()).decode()},
                        },
                    )
                if m := SERVICE.match(path):
                    ns, name = m.groups()
                    if (ns, name.removesuffix("-head-svc")) not in standin.clusters:
                        return self._status(404, "NotFound")
                    return self._send(
                        200,
                        {
                            "kind": "Service",
                            "apiVersion": "v1",
                            "metadata": {"name": name, "namespace": ns},
                            "spec": {
                                "type": "ClusterIP",
                                "ports": [{"name": "gcs-server", "port": 6379}, {"name": "dashboard", "port": 8265}],
                            },
                        },
                    )
                self._status(404, "NotFound")

            def do_DELETE(self):
                m = CLUSTERS.match(self.path.split("?")[0])
                if not m or not m.group(2):
                    return self._status(404, "NotFound")
                ns, name = m.groups()
                with standin.lock:
                    if standin.clusters.pop((ns, name), None) is None:
                        return self._status(404, "NotFound")
                self._send(200, {"kind": "Status", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path) -> str:
        import yaml

        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "airflow", "user": {"token": "kube-api-token"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "airflow"}}],
            "current-context": "standin",
        }
        with open(path, "w") as fh:
            yaml.safe_dump(cfg, fh)
        return str(path)
