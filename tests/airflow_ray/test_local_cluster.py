"""The control plane against a real Ray head started by the ``local`` backend.

Operators are executed with ``StandInTaskInstance`` in place of Airflow's task runner (which
does not run here: the DAG end-to-end tests drive the real one); the Ray cluster, the Jobs
API, the embed job and the trigger are all real.
"""

import asyncio
import json
import logging
import os
import re
import shutil
import sys
import time

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_ray.backends.local import LocalRayBackend, processes_referencing
from airflow_ray.cluster import ClusterHandle
from airflow_ray.errors import RayJobError
from airflow_ray.hooks.ray_jobs import RayJobsClient
from airflow_ray.naming import cluster_name, submission_id
from airflow_ray.operators.ray_cluster import RayClusterSetupOperator, RayClusterTeardownOperator
from airflow_ray.operators.ray_job import RayJobOperator
from airflow_ray.triggers.ray_job import RayJobTrigger
from embedding_run.runtime_env import working_tree_runtime_env
from tests.airflow_ray.standins import StandInTaskInstance, first_event, run_trigger

pytestmark = pytest.mark.integration

#: What an Airflow worker's environment holds and a Ray cluster must never see (sentinel values).
WORKER_SECRETS = {
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://airflow:sentinel-db-password@db/airflow",
    "AIRFLOW__CORE__FERNET_KEY": "sentinel-fernet-key",
    "AIRFLOW__API_AUTH__JWT_SECRET": "sentinel-jwt-secret",
    "AIRFLOW_CONN_WAREHOUSE": "postgresql://u:sentinel-conn-password@h/db",
}


@pytest.fixture(scope="module")
def cluster():
    """Up through the setup operator; down through the teardown operator *by name* (no handle)."""
    config = {"num_cpus": 6}  # default temp root: Ray's socket paths must stay short
    ti = StandInTaskInstance(dag_id="pytest_local", run_id=f"manual__{os.getpid()}")
    setup = RayClusterSetupOperator(task_id="cluster_up", backend="local", backend_config=config)
    # the worker's own secrets, as an Airflow worker has them: `ray start` must not inherit them
    saved = {k: os.environ.get(k) for k in WORKER_SECRETS}
    os.environ.update(WORKER_SECRETS)
    try:
        handle = ClusterHandle.from_dict(setup.execute({"ti": ti}))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert handle.name == cluster_name(ti.dag_id, ti.run_id)
    yield LocalRayBackend(**config), handle
    RayClusterTeardownOperator(task_id="cluster_down", backend="local", backend_config=config).execute({"ti": ti})
    assert processes_referencing(handle.details["temp_dir"]) == [], "teardown left processes of ours behind"
    assert not os.path.exists(handle.details["temp_dir"])


def _token(handle):
    return LocalRayBackend().credentials(handle)[1]


def _client(handle):
    return RayJobsClient(*LocalRayBackend().credentials(handle))


def _operator(handle, entrypoint, partition, **kw):
    return RayJobOperator(
        task_id=f"job_{partition}",
        cluster=handle.to_dict(),
        entrypoint=entrypoint,
        partition=partition,
        poll_interval=0.5,
        **kw,
    )


def test_dashboard_requires_the_token_and_bind_is_loopback(cluster):
    import httpx

    _, handle = cluster
    assert handle.dashboard_url.startswith("http://127.0.0.1:")
    assert httpx.get(handle.dashboard_url + "/api/version").status_code == 401
    with _client(handle) as c:
        assert c.version()["ray_version"] == "2.60.0"


def test_setup_retry_adopts_the_running_cluster(cluster):
    backend, handle = cluster
    again = backend.up(handle.name)
    assert again == handle


def test_embed_job_submitted_and_sensed_to_success(cluster, demo_assets, tmp_path, caplog, capfd):
    _, handle = cluster
    caplog.set_level(logging.INFO)
    entry = (
        f"{sys.executable} -m ray_jobs embed --manifest {demo_assets.manifest} --output {tmp_path} "
        f"--model {demo_assets.model} --num-stages 2 --batch-size 16 --preprocess-pool 1-1"
    )
    op = _operator(handle, entry, 0, runtime_env=working_tree_runtime_env())
    ti = StandInTaskInstance()
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    trigger = deferred.value.trigger
    assert isinstance(trigger, RayJobTrigger) and trigger.submission_id == submission_id("test_dag", "manual__1", 0)
    event = run_trigger(trigger)
    assert event["status"] == "SUCCEEDED", event
    assert op.execute_complete({"ti": ti}, event)["status"] == "SUCCEEDED"
    out, err = capfd.readouterr()
    task_log = caplog.text + out + err  # Airflow's structlog writes to the process's stdout here
    assert "embed: committed: rows_in=120" in task_log, "job log lines reach the task log"
    assert ti.xcom["_link_RayJobLink"].endswith(f"/#/jobs/{trigger.submission_id}")
    token = _token(handle)
    assert token and token not in task_log and token not in repr(ti.xcom) and token not in repr(trigger.serialize())

    # a retried task adopts the succeeded job instead of running it again
    again = _operator(handle, entry, 0, runtime_env=working_tree_runtime_env()).execute({"ti": StandInTaskInstance()})
    assert again == {"submission_id": trigger.submission_id, "status": "SUCCEEDED", "adopted": True}


def test_failed_job_surfaces_failed_with_its_last_log_lines(cluster):
    _, handle = cluster
    entry = f"{sys.executable} -c \"import sys; print('partition exploded: bad things'); sys.exit(3)\""
    op = _operator(handle, entry, "fail", deferrable=False)
    with pytest.raises(RayJobError) as exc:
        op.execute({"ti": StandInTaskInstance()})
    assert "ended FAILED" in str(exc.value) and "partition exploded: bad things" in str(exc.value)
    # a retry does not adopt the failed job: it resubmits under the next deterministic id
    op2 = _operator(handle, entry, "fail", deferrable=True)
    ti = StandInTaskInstance()
    with pytest.raises(TaskDeferred):
        op2.execute({"ti": ti})
    assert ti.xcom["submission_id"] == submission_id("test_dag", "manual__1", "fail", attempt=1)


def test_retry_while_running_adopts_and_killing_the_task_stops_the_job(cluster):
    _, handle = cluster
    entry = f"{sys.executable} -c \"import time; print('working', flush=True); time.sleep(600)\""
    ti1, ti2 = StandInTaskInstance(), StandInTaskInstance()
    with pytest.raises(TaskDeferred) as first:
        _operator(handle, entry, "long").execute({"ti": ti1})
    with pytest.raises(TaskDeferred):
        _operator(handle, entry, "long").execute({"ti": ti2})
    assert ti1.xcom["submission_id"] == ti2.xcom["submission_id"], "retry adopted instead of duplicating"
    trigger = first.value.trigger

    async def cancel_mid_way_then_kill():
        task = asyncio.create_task(first_event(trigger))
        await asyncio.sleep(3)
        task.cancel()  # triggerer restart: the trigger is cancelled and later rebuilt
        rebuilt = RayJobTrigger(**trigger.serialize()[1])
        await rebuilt.on_kill()  # the user marks the task failed
        return await first_event(rebuilt)

    event = asyncio.run(cancel_mid_way_then_kill())
    assert event["status"] == "STOPPED"
    with pytest.raises(RayJobError, match="ended STOPPED"):
        _operator(handle, entry, "long").execute_complete(None, event)


def test_a_rebuilt_trigger_ends_with_the_same_event(cluster):
    _, handle = cluster
    entry = f"{sys.executable} -c \"print('line one'); print('line two')\""
    ti = StandInTaskInstance()
    with pytest.raises(TaskDeferred) as deferred:
        _operator(handle, entry, "same").execute({"ti": ti})
    trigger = deferred.value.trigger
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_ray.triggers.ray_job.RayJobTrigger"
    first = run_trigger(trigger)
    second = run_trigger(RayJobTrigger(**kwargs))
    assert first == second and first["status"] == "SUCCEEDED" and "line two" in first["log_tail"]


def test_non_deferrable_on_kill_stops_the_job(cluster):
    """The blocking path: execute() senses the job in the worker; killing the task stops the job."""
    import threading

    _, handle = cluster
    entry = f'{sys.executable} -c "import time; time.sleep(600)"'
    op = _operator(handle, entry, "kill", deferrable=False)
    ti = StandInTaskInstance()
    outcome = {}

    def run():
        try:
            outcome["result"] = op.execute({"ti": ti})
        except Exception as exc:  # the task fails: the job ended STOPPED
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    while "submission_id" not in ti.xcom and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "submission_id" in ti.xcom, "the job was never submitted"
    op.on_kill()  # Airflow calls this from another thread when the task is killed
    worker.join(60)
    assert not worker.is_alive(), "on_kill did not stop the job: execute() is still waiting on it"
    assert isinstance(outcome.get("error"), RayJobError) and "ended STOPPED" in str(outcome["error"])


def test_existing_backend_from_an_airflow_connection(cluster, monkeypatch):
    """The same cluster reached as `existing`: address and token from a connection (env-defined)."""
    import json

    from airflow_ray.backends.existing import ExistingClusterBackend

    _, handle = cluster
    token = _token(handle)
    monkeypatch.setenv(
        "AIRFLOW_CONN_RAY_TEST",
        json.dumps({"conn_type": "ray_dashboard", "host": handle.dashboard_url, "password": token}),
    )
    existing = ExistingClusterBackend(conn_id="ray_test").up("whatever")
    assert existing.dashboard_url == handle.dashboard_url
    with RayJobsClient(*ExistingClusterBackend(conn_id="ray_test").credentials(existing)) as c:
        assert c.version()["ray_version"] == "2.60.0"
    ExistingClusterBackend(conn_id="ray_test").down(existing)  # not ours: nothing happens
    with _client(handle) as c:
        c.version()


def test_trigger_polling_never_blocks_the_event_loop(cluster):
    _, handle = cluster
    entry = f"{sys.executable} -c \"import time; time.sleep(4); print('done')\""
    ti = StandInTaskInstance()
    with pytest.raises(TaskDeferred) as deferred:
        _operator(handle, entry, "loop").execute({"ti": ti})
    trigger = deferred.value.trigger
    gaps = []

    async def ticker(stop):
        last = asyncio.get_running_loop().time()
        while not stop.is_set():
            await asyncio.sleep(0.02)
            now = asyncio.get_running_loop().time()
            gaps.append(now - last)
            last = now

    async def main():
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        event = await first_event(trigger)
        stop.set()
        await tick
        return event

    assert asyncio.run(main())["status"] == "SUCCEEDED"
    assert max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.2f}s"


def test_handle_round_trips_without_the_token(cluster):
    _, handle = cluster
    data = handle.to_dict()
    assert ClusterHandle.from_dict(data) == handle
    assert _token(handle) not in repr(data) and "auth_token" not in repr(data)


# ---------------------------------------------------------------------------------------------- loopback
def _listening_sockets():
    """{socket inode: (ip, port)} of every listening TCP socket on the machine."""
    import ipaddress

    out = {}
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        with open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                local, state, inode = fields[1], fields[3], int(fields[9])
                if state != "0A":  # LISTEN
                    continue
                hex_ip, hex_port = local.split(":")
                raw = bytes.fromhex(hex_ip)
                # the kernel prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
                ip = ipaddress.ip_address(raw)
                ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is 127.0.0.1
                out[inode] = (str(ip), int(hex_port, 16))
    return out


def _socket_inodes(pid):
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def _cluster_pids(handle):
    """The head's descendants and session (ray start and all it spawned, setproctitle'd
    workers included) plus anything naming its temp dir."""
    head = handle.details["pid"]
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat_line = fh.read()
                parents[int(entry)] = (int(stat_line.rsplit(")", 1)[1].split()[1]), os.getsid(int(entry)))
            except (OSError, ValueError, IndexError):
                continue
    pids = set(processes_referencing(handle.details["temp_dir"])) | {head}
    pids |= {pid for pid, (_, sid) in parents.items() if sid == head}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in parents.items() if ppid in pids} - pids
        pids |= more
        grew = bool(more)
    return pids


def _kind(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        name = os.path.basename(fh.read().split(b"\0")[0].decode(errors="replace"))
    if name in ("gcs_server", "raylet"):
        return name
    with open(f"/proc/{pid}/comm") as fh:
        return fh.read().strip()


PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)


def _configured_ports(handle):
    with open(f"/proc/{handle.details['pid']}/cmdline", "rb") as fh:
        argv = [a.decode() for a in fh.read().split(b"\0")]
    return {flag: int(argv[argv.index(flag) + 1]) for flag in PORT_FLAGS}


def test_every_listening_socket_is_loopback(cluster):
    """Integration: with a job's driver and an actor running, and every port the backend
    gives ``ray start`` listening, each TCP socket any of the cluster's processes (GCS,
    raylet, object manager, dashboard and its agents, client server, metrics, drivers,
    workers) listens on is on 127.0.0.1."""
    import time

    _, handle = cluster
    wanted = _configured_ports(handle)
    actor = (
        f'{sys.executable} -c "import ray, time; ray.init(); '
        "A = ray.remote(type('A', (), {'ping': lambda self: 1})); a = A.remote(); ray.get(a.ping.remote()); "
        "print('actor up', flush=True); time.sleep(300)\""
    )
    with _client(handle) as c:
        sid = c.submit(f"loopback-{os.getpid()}", actor)
        deadline = time.monotonic() + 120
        while "actor up" not in c.logs(sid) and time.monotonic() < deadline:
            time.sleep(1)
        assert "actor up" in c.logs(sid), c.logs(sid)[-2000:]
    deadline = time.monotonic() + 120
    while True:
        listening = _listening_sockets()
        seen = {}
        for pid in sorted(_cluster_pids(handle)):
            for inode in _socket_inodes(pid) & set(listening):
                seen[listening[inode]] = _kind(pid)
        missing = {flag: port for flag, port in wanted.items() if port not in {p for _, p in seen}}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert missing == {}, f"ports not listening after 120 s: {missing}; listening: {seen}"
    with _client(handle) as c:
        c.stop(sid)
    kinds = set(seen.values())
    assert {"gcs_server", "raylet"} <= kinds and any(k.startswith("ray::") for k in kinds), seen  # workers too
    exposed = sorted((kind, ip, port) for (ip, port), kind in seen.items() if ip not in ("127.0.0.1", "::1"))
    assert exposed == [], f"listening beyond loopback: {exposed}"
    with open(os.path.join(handle.details["temp_dir"], "ray-start.log"), errors="replace") as fh:
        started = re.sub(r"\x1b\[[0-9;]*m", "", fh.read())
    assert "Local node IP: 127.0.0.1" in started, started[-2000:]


# ---------------------------------------------------------------------------------------------- private dir
def test_the_temp_dir_is_private_and_ours(cluster):
    """mkdtemp's dir (0700, this user's, a random suffix) proves ownership; Ray's own temp dir,
    which Ray makes world-writable, sits inside it and proves nothing."""
    import stat

    from airflow_ray.backends.local import RAY_SUBDIR, STATE_FILE

    backend, handle = cluster
    tdir = handle.details["temp_dir"]
    st = os.lstat(tdir)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
    prefix = backend._prefix(handle.name)
    assert os.path.basename(tdir).startswith(prefix) and len(os.path.basename(tdir)) == len(prefix) + 8
    assert stat.S_IMODE(os.lstat(os.path.join(tdir, RAY_SUBDIR)).st_mode) & 0o077, "Ray shares its own dir"
    state = os.lstat(os.path.join(tdir, STATE_FILE))
    assert stat.S_IMODE(state.st_mode) == 0o600 and state.st_uid == os.getuid()
    assert backend.handle_for(handle.name) == handle


def test_a_handle_naming_a_dir_that_is_not_ours_is_not_acted_on(cluster, tmp_path):
    """A forged handle (XCom is not proof) or a planted cluster.json: teardown touches nothing."""
    import subprocess

    backend, handle = cluster
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    planted = tmp_path / "victim"
    planted.mkdir()
    (planted / "keep").write_text("x")
    try:
        for details in (
            {"temp_dir": str(planted), "pid": victim.pid},  # a dir outside the temp root
            {"temp_dir": "/", "pid": victim.pid},
            {"temp_dir": handle.details["temp_dir"], "pid": victim.pid},  # our dir, someone else's pid
        ):
            forged = ClusterHandle(backend="local", name=handle.name, dashboard_url="", details=details)
            backend.down(forged)
            assert victim.poll() is None and (planted / "keep").exists()
        with _client(handle) as c:
            c.version()  # the real cluster is untouched too
        # a world-writable dir with our prefix (as another user could plant in /tmp) is never adopted
        fake = os.path.join(backend._root(), backend._prefix("emb-planted-0123456789") + "zzzzzzzz")
        os.makedirs(fake, mode=0o777)
        os.chmod(fake, 0o777)
        try:
            with open(os.path.join(fake, "cluster.json"), "w") as fh:
                json.dump({**handle.to_dict(), "name": "emb-planted-0123456789"}, fh)
            assert backend._ours("emb-planted-0123456789") == []
            assert backend.handle_for("emb-planted-0123456789").details == {}
        finally:
            shutil.rmtree(fake)
    finally:
        victim.kill()
        victim.wait()


def test_ray_start_gets_an_allow_listed_environment_without_the_workers_secrets(cluster):
    """Every process of the cluster (``ray start``, GCS, raylet, dashboard, its agents and the
    workers) was started from a worker whose environment held Airflow's database URL, Fernet
    key, JWT secret and a connection: none of them reached any of those processes."""
    _, handle = cluster
    pids = processes_referencing(handle.details["temp_dir"])
    assert len(pids) >= 3, pids
    seen = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(e.split(b"=", 1) for e in fh.read().split(b"\0") if b"=" in e)
        except OSError:
            continue  # exited meanwhile
        seen += 1
        leaked = sorted(k.decode() for k in env if k.startswith(b"AIRFLOW"))
        assert not leaked, f"pid {pid} ({_cmd(pid)}) got {leaked}"
        assert not any(b"sentinel" in v for v in env.values()), f"pid {pid} got a worker secret"
        assert env.get(b"RAY_AUTH_MODE") == b"token" and b"PATH" in env
    assert seen >= 3


def _cmd(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode(errors="replace")[:120]
