"""Admission control on a real multi-node Ray cluster on this machine.

The cluster is ``ray.cluster_utils.Cluster``: a head with 0 CPUs (like KubeRay's) and two
worker nodes, each a separate raylet, each declaring one *fake* GPU so that stages asking
for ``gpus`` are scheduled exactly as on GPU nodes (torch itself runs on the CPU: the GPU
resource is a stand-in for the card, which this machine does not have).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from ray_jobs.output.markers import committed_marker
from ray_jobs.output.validate import resolve_output_key
from ray_jobs.planning.plan import load_plan

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# Two stages of half a (fake) GPU each: one job needs 1 GPU + 3.75 CPUs, a worker node holds one
# job, the cluster two; four partitions need 4 GPUs together, twice what the cluster has.
STAGES = "text@cpus=1,gpus=0.5|image@cpus=1,gpus=0.5"


@pytest.fixture(scope="module")
def gpu_cluster():
    from ray.cluster_utils import Cluster

    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, saved) if p)  # raylets' workers import ray_jobs
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False},
    )
    workers = [cluster.add_node(num_cpus=4, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    cluster.shutdown()
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def plan4(demo_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("admission-out")
    summary = out / "plan.json.summary"
    cmd = [sys.executable, "-m", "ray_jobs", "plan", "--manifest", demo_assets.manifest, "--output", str(out)]
    cmd += ["--partition-rows", "32", "--run-id", "adm", "--summary-json", str(summary)]
    subprocess.run(
        cmd,
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    plan = load_plan(json.loads(summary.read_text())["plan_uri"])
    assert len(plan.partitions) == 4
    return plan, demo_assets


def _embed(address: str, plan_uri: str, partition: int, model: str, *extra: str, stages=STAGES) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ray_jobs", "embed", "--plan", plan_uri, "--partition", str(partition)]
    cmd += ["--model", model, "--ray-address", address, "--stages", stages, "--batch-size", "16"]
    cmd += ["--preprocess-pool", "1-1", *extra]
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stamp(line: str) -> float:
    return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000


def test_more_partitions_than_gpus_all_commit_without_deadlock(gpu_cluster, plan4):
    cluster, _ = gpu_cluster
    plan, assets = plan4
    from ray_jobs.contract.layout import plan_uri as plan_uri_of

    uri = plan_uri_of(plan.output_uri, plan.run_id)
    procs = [_embed(cluster.address, uri, k, assets.model) for k in range(4)]
    logs = []
    for p in procs:
        out, _ = p.communicate(timeout=900)
        logs.append(out)
        assert p.returncode == 0, out[-3000:]

    from ray_jobs.model.checkpoint import open_checkpoint

    model_id = open_checkpoint(assets.model).model_id
    ids = []
    for part in plan.partitions:
        pdir = plan.work_uri(part.index, model_id, resolve_output_key(plan, model_id))
        marker = committed_marker(pdir, model_id)
        assert marker is not None and marker.reconciles() and marker.rows_in == part.rows
        ids += pq.read_table(marker.data_uris(pdir))["id"].to_pylist()
        ids += pq.read_table(marker.rejects_uris(pdir))["id"].to_pylist()
    assert sorted(ids) == sorted(set(ids)) and len(ids) == assets.rows

    # At most two jobs held a reservation at once (the cluster holds two), and the others queued.
    intervals = []
    for out in logs:
        reserved = [_stamp(ln) for ln in out.splitlines() if re.search(r"admission: .* reserved after", ln)]
        released = [_stamp(ln) for ln in out.splitlines() if "admission: released" in ln]
        assert len(reserved) == 1 and len(released) == 1, out[-2000:]
        intervals.append((reserved[0], released[0]))
    peak = max(sum(1 for a, b in intervals if a <= t < b) for t, _ in intervals)
    assert peak <= 2, intervals
    assert any("queued for" in out for out in logs), "with 4 jobs on room for 2, some job must have queued"


def test_a_job_larger_than_the_cluster_fails_naming_the_missing_resources(gpu_cluster, plan4):
    cluster, _ = gpu_cluster
    plan, assets = plan4
    from ray_jobs.contract.layout import plan_uri as plan_uri_of

    uri = plan_uri_of(plan.output_uri, plan.run_id)
    # 3 GPUs for one job; the cluster has 2: it can never be admitted, and says so within the deadline
    big = _embed(cluster.address, uri, 0, assets.model, "--force", "--admission-timeout-s", "3",
                 stages="text@cpus=1,gpus=2|image@cpus=1,gpus=1")  # fmt: skip
    start = time.monotonic()
    out, _ = big.communicate(timeout=300)
    assert big.returncode == 3, out[-2000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: admission: could not reserve"), last
    assert "GPU:3" in last and "too small for one job" in last and "GPU:2" in last, last
    assert time.monotonic() - start < 120


def _in_cluster(address: str, scenario: str, *args) -> dict:
    """Run ``scenario(*args)`` (a function of this module) in a driver of its own on the
    cluster, as a job's driver runs (this test process does not join the cluster)."""
    code = (
        "import json, sys, ray\n"
        f"ray.init(address={address!r}, log_to_driver=False)\n"
        f"from tests.ray_jobs.job.test_admission import {scenario}\n"
        f"print(json.dumps({scenario}(*{list(args)!r})))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _reservations_beside_two_drivers(node_id: str) -> dict:
    """Two drivers stand on one node (where Ray's job supervisor may put both: stand-in actors
    asking what a driver's ``entrypoint_num_cpus`` asks), then both jobs reserve. Once with this
    footprint (the driver asks 0.0001 CPU, the rest of its share is reserved with the job), once
    with a driver asking its whole 0.25 CPU outside the reservation."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ray_jobs.job.footprint import job_footprint

    @ray.remote
    class Driver:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    def admitted(entrypoint_cpus: float, bundles: list[dict]) -> int:
        pin = NodeAffinitySchedulingStrategy(node_id, soft=False)
        drivers = [Driver.options(num_cpus=entrypoint_cpus, scheduling_strategy=pin).remote() for _ in range(2)]
        assert {ray.get(d.node.remote()) for d in drivers} == {node_id}
        groups = [placement_group(bundles, strategy="PACK") for _ in range(2)]
        ready = sum(bool(g.wait(timeout_seconds=5)) for g in groups)
        for g in groups:
            remove_placement_group(g)
        for d in drivers:
            ray.kill(d)
        return ready

    fp = job_footprint([(2.5, 0.0, 1)], preprocess_cpus=0.5, preprocess_min=1)  # 3.95 CPUs of 4 per node
    ours = admitted(fp.driver_cpus, [b.resources() for b in fp.bundles])
    outside = admitted(0.25, [{"CPU": 0.5}, {"CPU": 2.5}, {"CPU": 0.75}])  # same job, driver outside
    return {"ours": ours, "outside": outside, "footprint": fp.to_dict()}


def test_drivers_on_one_node_never_take_the_room_a_reservation_needs(gpu_cluster):
    """Both drivers on one of two worker nodes: with the driver's share inside the reservation,
    both jobs are admitted; with a driver holding its share outside, the second job never fits."""
    from airflow_ray.footprint import JobFootprint

    cluster, workers = gpu_cluster
    got = _in_cluster(cluster.address, "_reservations_beside_two_drivers", workers[0].node_id)
    assert got["ours"] == 2, got
    assert got["outside"] == 1, "a driver holding its CPU outside the reservation should have blocked the 2nd job"
    # and the capacity the control plane computes for these nodes is what was admitted
    nodes = [{"CPU": 0.0}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    assert JobFootprint.from_dict(got["footprint"]).jobs_that_fit(nodes) == 2


def _writes_while_reads_hold_their_slots(marks: str) -> dict:
    """Reads that never finish (stand-ins for streaming read tasks paused by backpressure)
    fill every read slot, one more waits; a write task must still run at once."""
    import pathlib
    import time

    import ray

    from ray_jobs.job.admission import reserve
    from ray_jobs.job.footprint import job_footprint

    @ray.remote
    def read(i: int) -> None:
        pathlib.Path(marks, f"read-{i}").touch()
        time.sleep(120)

    @ray.remote
    def write() -> None:
        return None

    fp = job_footprint([(1.0, 0.0, 1)], preprocess_cpus=0.5, preprocess_min=1)
    with reserve(fp, name="reads-and-writes", timeout_s=30) as res:
        reads = [read.options(**res.remote_args("read")).remote(i) for i in range(3)]
        deadline = time.monotonic() + 30
        while len(list(pathlib.Path(marks).iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        start = time.monotonic()
        ray.get(write.options(**res.remote_args("write")).remote(), timeout=30)
        wrote = time.monotonic() - start
        time.sleep(1)  # a third read would have started by now if it could take a slot
        out = {"write_s": wrote, "reads_started": len(list(pathlib.Path(marks).iterdir()))}
        out["reads_done"] = len(ray.wait(reads, timeout=0, num_returns=3)[0])
        for r in reads:
            ray.cancel(r, force=True)
    return out


def test_writes_run_while_paused_reads_hold_every_read_slot(gpu_cluster, tmp_path):
    cluster, _ = gpu_cluster
    got = _in_cluster(cluster.address, "_writes_while_reads_hold_their_slots", str(tmp_path))
    assert got["reads_started"] == 2 and got["reads_done"] == 0, got
    assert got["write_s"] < 10, got


def _placement_group_nodes(address: str) -> set[str]:
    """Node ids holding the bundles of the embed job's placement group (asked in a separate
    driver: this test process does not join the cluster)."""
    code = (
        "import json, ray\n"
        f"ray.init(address={address!r}, log_to_driver=False)\n"
        "from ray.util import placement_group_table\n"
        "out = [pg for pg in placement_group_table().values() if pg['name'].startswith('emb-') and pg['state'] == "
        "'CREATED']\n"
        "print(json.dumps([sorted(set(pg['bundles_to_node_id'].values())) for pg in out]))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    groups = json.loads(out.stdout.strip().splitlines()[-1])
    return {node for group in groups for node in group}


def test_a_worker_node_lost_mid_job_commits_the_partition_exactly_once(gpu_cluster, plan4):
    """Runs last in this module (it changes the cluster). A third worker node joins, a job
    starts, and the node holding its reservation is removed mid-job. Either Ray reschedules
    the reservation and the job finishes, or the job fails and its retry (the Airflow task's
    retry, here run by hand) commits: in both cases the partition is committed exactly once."""
    cluster, workers = gpu_cluster
    plan, assets = plan4
    from ray_jobs.contract.layout import plan_uri as plan_uri_of
    from ray_jobs.model.checkpoint import open_checkpoint
    from ray_jobs.model.model_id import compute_model_id  # noqa: F401 - the model id the job uses

    spare = cluster.add_node(num_cpus=4, num_gpus=1)
    cluster.wait_for_nodes()
    uri = plan_uri_of(plan.output_uri, plan.run_id)
    job = _embed(cluster.address, uri, 1, assets.model, "--force", "--admission-timeout-s", "300")
    lines = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = job.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "reserved after" in line:
            break
    time.sleep(3)  # actors starting / first batches in flight
    held = _placement_group_nodes(cluster.address)
    victims = [n for n in [*workers, spare] if n.node_id in held]
    assert victims, f"no node holds the job's reservation: {held}"
    cluster.remove_node(victims[0], allow_graceful=False)
    out, _ = job.communicate(timeout=900)
    out = "".join(lines) + out
    outcome = "recovered" if job.returncode == 0 else "failed"
    if job.returncode != 0:  # the task's retry: the same partition again, on what is left of the cluster
        retry = _embed(cluster.address, uri, 1, assets.model, "--force", "--admission-timeout-s", "300")
        retry_out, _ = retry.communicate(timeout=900)
        assert retry.returncode == 0, retry_out[-3000:]
    model_id = open_checkpoint(assets.model).model_id
    pdir = plan.work_uri(1, model_id, resolve_output_key(plan, model_id))
    marker = committed_marker(pdir, model_id)
    assert marker is not None and marker.reconciles() and marker.rows_in == plan.partition(1).rows, out[-3000:]
    ids = pq.read_table(marker.data_uris(pdir))["id"].to_pylist()
    assert len(ids) == len(set(ids)) == marker.rows_ok, "each embedded id exactly once"
    print(
        f"\nworker node lost mid-job: the job {outcome}" + (" and its retry committed" if outcome == "failed" else "")
    )
