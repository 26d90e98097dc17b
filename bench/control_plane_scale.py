#!/usr/bin/env python
"""The control plane at scale: the nightly DAG with N partitions in Airflow as deployed,
against a loopback stand-in of the Ray cluster, and what Airflow costs per partition.

    python bench/control_plane_scale.py --partitions 1000 --max-triggerer-cpu-s 0.3 --max-overhead-s 0.5
    python bench/control_plane_scale.py --partitions 20 --min-delay-s 5 --max-delay-s 15   # short

With ``--max-triggerer-cpu-s`` / ``--max-overhead-s`` (per partition) it exits 3 when a figure is
over its bound, naming it.

Airflow runs as in ``tests/topology``: PostgreSQL, then the api-server, scheduler (LocalExecutor),
dag-processor and triggerer as separate processes, the run triggered through the REST API. The
cluster is ``tests/topology/ray_cluster_standin.py`` on 127.0.0.1: the ``existing`` backend reaches
it through the Airflow connection ``ray_default`` (an ``AIRFLOW_CONN_*`` variable of the
deployment; the trigger's conf names no address), its state API lists ``--max-in-flight`` nodes
of one job's footprint each, so the ``capacity`` task computes that limit as on a real cluster,
and partition *k*'s job succeeds after a seeded random delay while streaming a few log lines.

Measured: the **embed phase** only (first embed task start to last embed task end, from the REST
task instances). The stand-in's jobs write no embeddings, so the run's ``validate``, ``catalog``
and ``report`` then fail by design and are not waited for. The ideal wall is the same delays
scheduled greedily at the same limit with no overhead (the slowest job chain); overhead per
partition = (embed wall - ideal) / N. CPU seconds per component come from ``/proc/<pid>/stat``
of its process tree, sampled before the trigger and after the last embed task.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "dags")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench.control_plane_metrics import (  # noqa: E402
    FINISHED,
    ScaleFigures,
    embed_phase,
    ideal_makespan,
    parse_ts,
    peak_concurrent,
    percentile,
    read_stats,
    seeded_delays,
    ticks_to_seconds,
    tree_cpu_ticks,
)

#: Airflow's own defaults, what a deployment that did not tune them runs.
AIRFLOW_DEFAULT_PARALLELISM = 32
AIRFLOW_DEFAULT_MAX_ACTIVE_TASKS_PER_DAG = 16
AIRFLOW_DEFAULT_POOL_SLOTS = 128
AIRFLOW_DEFAULT_TRIGGERER_CAPACITY = 1000


class BenchError(RuntimeError):
    """The run did not get to the figures (named in the message)."""


@dataclass(frozen=True)
class BenchConfig:
    partitions: int = 200
    min_delay_s: float = 10.0
    max_delay_s: float = 30.0
    max_in_flight: int = 16
    poll_interval_s: float = 5.0
    seed: int = 0
    parallelism: int = AIRFLOW_DEFAULT_PARALLELISM
    max_active_tasks_per_dag: int = AIRFLOW_DEFAULT_MAX_ACTIVE_TASKS_PER_DAG
    pool_slots: int = AIRFLOW_DEFAULT_POOL_SLOTS
    triggerer_capacity: int = AIRFLOW_DEFAULT_TRIGGERER_CAPACITY
    idle_s: float = 15.0
    watch_every_s: float = 5.0
    extrapolate_to: int = 1000
    timeout_s: float | None = None
    max_triggerer_cpu_s: float | None = None  # per partition
    max_overhead_s: float | None = None  # per partition

    def __post_init__(self) -> None:
        if not 1 <= self.partitions <= 1024:
            raise ValueError(f"--partitions must be 1..1024 (Airflow's max_map_length), got {self.partitions}")
        if not 0 <= self.min_delay_s <= self.max_delay_s:
            raise ValueError(f"need 0 <= --min-delay-s <= --max-delay-s, got {self.min_delay_s}, {self.max_delay_s}")
        for name in ("max_in_flight", "parallelism", "max_active_tasks_per_dag", "pool_slots", "triggerer_capacity"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0.1 <= self.poll_interval_s <= 600:
            raise ValueError(f"--poll-interval-s must be 0.1..600 (the DAG param's range), got {self.poll_interval_s}")
        if self.idle_s < 0 or self.watch_every_s <= 0 or self.extrapolate_to < 1:
            raise ValueError("--idle-s must be >= 0, --watch-every-s > 0, --extrapolate-to >= 1")

    def deadline_s(self, ideal_s: float) -> float:
        return self.timeout_s if self.timeout_s is not None else ideal_s + 10.0 * self.partitions + 900.0


def job_node_resources(jobs: int) -> dict[str, float]:
    """One node of exactly one job's footprint under the DAG's default stage layout (as
    ``check_inputs`` computes it), plus room for the entrypoints of all *jobs* drivers (the
    capacity rule keeps it on every node, since Ray may place every driver on one), so the
    stand-in's *jobs* nodes fit exactly *jobs* jobs."""
    from embedding_run.deployment import load_defaults
    from ray_jobs.job.footprint import job_footprint

    p = load_defaults()["params"]
    if p["stages"]:
        raise BenchError("the defaults name an explicit stage spec; the bench sizes nodes for num_stages only")
    stage_min = int(str(p["stage_pool"]).partition("-")[0])
    stages = 1 if p["num_stages"] == "auto" else int(p["num_stages"])  # auto: the demo model fits one stage
    fp = job_footprint(
        [(float(p["stage_num_cpus"]), float(p["stage_num_gpus"]), stage_min)] * stages,
        preprocess_cpus=float(p["preprocess_cpus"]),
        preprocess_min=int(str(p["preprocess_pool"]).partition("-")[0]),
    )
    node = {k: v for k, v in fp.total().items() if v}
    node["CPU"] = round(node["CPU"] + (jobs - 1) * fp.driver_cpus, 4)
    return node


def airflow_env(cfg: BenchConfig, cluster_url: str, token: str) -> dict[str, str]:
    """The deployment's settings on top of the harness's: Airflow's defaults where the harness
    tunes for fault tests, and the Ray dashboard connection."""
    conn = {"conn_type": "ray_dashboard", "host": cluster_url, "password": token}
    return {
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(cfg.max_active_tasks_per_dag),
        "AIRFLOW__CORE__DEFAULT_POOL_TASK_SLOT_COUNT": str(cfg.pool_slots),
        "AIRFLOW__TRIGGERER__CAPACITY": str(cfg.triggerer_capacity),
        "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "5",  # the default (the fault tests use 2)
        "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "300",  # the default (the fault tests use 30)
        "AIRFLOW_CONN_RAY_DEFAULT": json.dumps(conn),
        "EMB_RETRIES": "0",  # a failure here is a bench failure, not something to retry
    }


def conf(cfg: BenchConfig, assets, output: str) -> dict:
    """The trigger's conf: data and form choices only (the cluster comes from the connection)."""
    return {
        "manifest_uri": assets.manifest,
        "output_uri": output,
        "model_uri": assets.model,
        "partition_rows": 1,
        "backend": "existing",
        "poll_interval_s": cfg.poll_interval_s,
    }


# ---------------------------------------------------------------------------------------------- CPU
def _postmaster_pid(stack) -> int | None:
    try:
        with open(os.path.join(stack.pg.data, "postmaster.pid")) as fh:
            return int(fh.readline())
    except (OSError, ValueError):
        return None


def cpu_sample(stack) -> dict[str, float]:
    """CPU seconds so far of each component's process tree (the scheduler split into its own
    process and its children: the LocalExecutor's workers, which run the tasks)."""
    stats = read_stats()
    out: dict[str, float] = {}
    for name, proc in stack.procs.items():
        out[name] = ticks_to_seconds(tree_cpu_ticks(stats, proc.pid))
    sched = stack.procs.get("scheduler")
    if sched is not None and sched.pid in stats:
        own = ticks_to_seconds(stats[sched.pid].own_ticks)
        out["scheduler (own process)"] = own
        out["scheduler's children (executor workers, tasks)"] = out.pop("scheduler") - own
    pg = _postmaster_pid(stack)
    if pg is not None:
        out["postgres"] = ticks_to_seconds(tree_cpu_ticks(stats, pg))
    return out


# ---------------------------------------------------------------------------------------------- run
@dataclass
class Watch:
    peak_deferred: int = 0
    peak_running: int = 0
    peak_queued: int = 0
    polls: int = 0

    def see(self, tis: list[dict]) -> None:
        states = [t.get("state") for t in tis if t.get("task_id") == "embed"]
        self.peak_deferred = max(self.peak_deferred, states.count("deferred"))
        self.peak_running = max(self.peak_running, states.count("running"))
        self.peak_queued = max(self.peak_queued, states.count("queued"))
        self.polls += 1


def wait_embed_phase(stack, run_id: str, cfg: BenchConfig, deadline: float, watch: Watch) -> list[dict]:
    while time.monotonic() < deadline:
        tis = stack.task_instances(run_id)
        watch.see(tis)
        embeds = [t for t in tis if t["task_id"] == "embed"]
        if len(embeds) == cfg.partitions and all(t.get("state") in FINISHED for t in embeds):
            return tis
        if stack.run_state(run_id) in ("success", "failed"):
            states = {(t["task_id"], t["map_index"]): t["state"] for t in tis}
            raise BenchError(f"the run ended before its embed phase did: {states}\n" + stack.log_tail("scheduler"))
        time.sleep(cfg.watch_every_s)
    raise BenchError(f"the embed phase did not finish in time\n{stack.log_tail('scheduler')}")


def latencies(tis: list[dict], jobs: dict, limit: int) -> tuple[list[float], list[float]]:
    """Per partition: job end -> its task's end (the trigger notices, the task resumes and
    finishes), and for gated partitions, the moment the gate could open (enough earlier tasks
    finished) -> the job's submission."""
    by_index = {t["map_index"]: t for t in tis if t["task_id"] == "embed"}
    job_of = {j.partition: j for j in jobs.values()}
    detect, admit = [], []
    for k, ti in sorted(by_index.items()):
        job, end = job_of.get(k), parse_ts(ti.get("end_date"))
        if job is None or end is None:
            continue
        detect.append(end - job.ends_at)
        if k >= limit:
            earlier = sorted(e for i, t in by_index.items() if i < k and (e := parse_ts(t.get("end_date"))) is not None)
            if len(earlier) > k - limit:
                admit.append(job.submitted_at - earlier[k - limit])
    return detect, admit


def run(cfg: BenchConfig, workdir: str) -> dict:
    from ray_jobs.demo.assets import write_demo_assets
    from tests.topology.airflow_stack import AirflowStack
    from tests.topology.ray_cluster_standin import RayClusterStandIn

    delays = seeded_delays(cfg.partitions, cfg.min_delay_s, cfg.max_delay_s, cfg.seed)
    ideal = ideal_makespan(delays, cfg.max_in_flight)
    node = job_node_resources(cfg.max_in_flight)
    t0 = time.monotonic()
    assets = write_demo_assets(
        os.path.join(workdir, "assets"), rows=cfg.partitions, bad_images=0, files=1, row_group_rows=1
    )
    print(f"assets: {cfg.partitions} rows, one row group each, in {time.monotonic() - t0:.1f}s", flush=True)
    token = secrets.token_urlsafe(24)
    with RayClusterStandIn(delays, nodes=cfg.max_in_flight, node_resources=node, token=token) as cluster:
        home = os.path.join(workdir, "airflow")
        t0 = time.monotonic()
        with AirflowStack(home, airflow_env(cfg, cluster.url, token), parallelism=cfg.parallelism) as stack:
            stack.wait_for_dag()
            print(f"airflow: up and the DAG parsed in {time.monotonic() - t0:.0f}s (home {home})", flush=True)
            idle0, ti0 = cpu_sample(stack), time.monotonic()
            time.sleep(cfg.idle_s)
            before, tb = cpu_sample(stack), time.monotonic()
            idle_rate = {k: (before[k] - idle0.get(k, 0.0)) / max(1e-9, tb - ti0) for k in before}
            r = stack.trigger(conf(cfg, assets, os.path.join(workdir, "output")))
            if r.status_code != 200:
                raise BenchError(f"trigger refused: HTTP {r.status_code}: {r.text[:2000]}")
            run_id = r.json()["dag_run_id"]
            print(f"triggered {run_id}; ideal embed wall {ideal:.0f}s", flush=True)
            watch = Watch()
            tis = wait_embed_phase(stack, run_id, cfg, time.monotonic() + cfg.deadline_s(ideal), watch)
            after, ta = cpu_sample(stack), time.monotonic()
            computed = stack.xcom(run_id, "capacity", "max_in_flight")
    window = ta - tb
    phase = embed_phase(tis)
    if phase.succeeded != cfg.partitions:
        failed = sorted(t["map_index"] for t in tis if t["task_id"] == "embed" and t["state"] != "success")
        raise BenchError(f"{cfg.partitions - phase.succeeded} embed tasks did not succeed: {failed[:20]}")
    if computed != cfg.max_in_flight:
        raise BenchError(f"the capacity task computed max_in_flight={computed}, expected {cfg.max_in_flight}")
    jobs = cluster.jobs
    resubmitted = len(jobs) - len({j.partition for j in jobs.values()})
    cpu = {k: after[k] - before.get(k, 0.0) for k in after}
    figures = ScaleFigures(
        cfg.partitions,
        cfg.max_in_flight,
        phase.wall_s,
        ideal,
        cpu.get("triggerer", 0.0),
        cpu.get("scheduler (own process)", 0.0),
    )
    ext_ideal = ideal_makespan(
        seeded_delays(cfg.extrapolate_to, cfg.min_delay_s, cfg.max_delay_s, cfg.seed), cfg.max_in_flight
    )
    detect, admit = latencies(tis, jobs, cfg.max_in_flight)
    return {
        "config": asdict(cfg),
        "node": node,
        "figures": figures,
        "extrapolated": figures.extrapolate(cfg.extrapolate_to, ext_ideal),
        "window_s": window,
        "cpu": cpu,
        "idle_rate": idle_rate,
        "watch": watch,
        "peak_jobs": peak_concurrent([(j.submitted_at, j.ends_at) for j in jobs.values()]),
        "jobs": len(jobs),
        "resubmitted": resubmitted,
        "detect": detect,
        "admit": admit,
        "delay_sum": sum(delays),
    }


def _dist(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"median {percentile(values, 50):.1f}s, p95 {percentile(values, 95):.1f}s, max {max(values):.1f}s"


def report(res: dict) -> str:
    cfg, f, x, w = res["config"], res["figures"], res["extrapolated"], res["watch"]
    node = ",".join(f"{k}:{v:g}" for k, v in sorted(res["node"].items()))
    lines = [
        f"control plane at scale: {f.partitions} partitions (1 row each), in-flight limit {f.limit} "
        f"(computed by the capacity task from the stand-in's {f.limit} nodes of {node}, one job's footprint), "
        f"job delays {cfg['min_delay_s']:g}-{cfg['max_delay_s']:g} s "
        f"(seed {cfg['seed']}, sum {res['delay_sum']:.0f}s), "
        f"poll_interval_s {cfg['poll_interval_s']:g}",
        f"harness: LocalExecutor parallelism {cfg['parallelism']}, max_active_tasks_per_dag "
        f"{cfg['max_active_tasks_per_dag']}, default_pool {cfg['pool_slots']} slots (deferred tasks not counted), "
        f"one triggerer of capacity {cfg['triggerer_capacity']}, embed max_active_tis_per_dagrun 512; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
        f"embed phase wall: {f.wall_s:.1f}s (first embed task start -> last embed task end; validate/catalog/"
        "report fail afterwards by design: the stand-in's jobs write no embeddings)",
        f"ideal wall (delays greedily at the limit, no overhead): {f.ideal_s:.1f}s",
        f"overhead: {f.overhead_s:.1f}s = {f.overhead_per_partition_s:.2f}s per partition",
        f"job end -> task end: {_dist(res['detect'])}",
        f"gate could open -> job submitted (partitions >= limit): {_dist(res['admit'])}",
        f"peak embed tasks deferred (triggers in flight) {w.peak_deferred}, running on workers {w.peak_running}, "
        f"queued {w.peak_queued} (polled every {cfg['watch_every_s']:g}s); peak Ray jobs in flight "
        f"{res['peak_jobs']} (limit {f.limit}); {res['jobs']} submissions, {res['resubmitted']} resubmitted",
        f"CPU seconds from trigger to the last embed end ({res['window_s']:.0f}s), and idle rate before:",
    ]
    for name in sorted(res["cpu"]):
        lines.append(
            f"  {name:<50} {res['cpu'][name]:8.1f} s  ({res['cpu'][name] / f.partitions:.2f} s/partition; "
            f"idle {res['idle_rate'].get(name, 0.0):.3f} CPU)"
        )
    lines += [
        f"extrapolated to {x['partitions']} partitions at limit {f.limit} (assumes overhead and CPU grow "
        f"linearly with partitions; ideal from the same seeded delays): ideal {x['ideal_s']:.0f}s, "
        f"wall ~{x['wall_s']:.0f}s, overhead ~{x['overhead_s']:.0f}s, triggerer CPU ~{x['triggerer_cpu_s']:.0f}s, "
        f"scheduler CPU ~{x['scheduler_cpu_s']:.0f}s",
        f"figures partitions={f.partitions} limit={f.limit} wall_s={f.wall_s:.1f} ideal_s={f.ideal_s:.1f} "
        f"overhead_per_partition_s={f.overhead_per_partition_s:.3f} triggerer_cpu_s={f.triggerer_cpu_s:.1f} "
        f"triggerer_cpu_per_partition_s={f.triggerer_cpu_s / f.partitions:.3f} "
        f"scheduler_cpu_s={f.scheduler_cpu_s:.1f} peak_deferred={w.peak_deferred}",
    ]
    return "\n".join(lines)


def over_bounds(res: dict) -> list[str]:
    """The per-partition figures above the bounds the run was given (none given: none)."""
    cfg, f = res["config"], res["figures"]
    out = []
    cpu = f.triggerer_cpu_s / f.partitions
    if cfg["max_triggerer_cpu_s"] is not None and cpu > cfg["max_triggerer_cpu_s"]:
        out.append(f"triggerer CPU {cpu:.3f} s per partition > {cfg['max_triggerer_cpu_s']:g}")
    if cfg["max_overhead_s"] is not None and f.overhead_per_partition_s > cfg["max_overhead_s"]:
        out.append(f"wall overhead {f.overhead_per_partition_s:.3f} s per partition > {cfg['max_overhead_s']:g}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = BenchConfig()
    parser.add_argument("--partitions", type=int, default=d.partitions)
    parser.add_argument("--min-delay-s", type=float, default=d.min_delay_s)
    parser.add_argument("--max-delay-s", type=float, default=d.max_delay_s)
    parser.add_argument(
        "--max-in-flight", type=int, default=d.max_in_flight, help="the stand-in cluster's size, in jobs"
    )
    parser.add_argument("--poll-interval-s", type=float, default=d.poll_interval_s, help="the DAG param (default 5)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--parallelism", type=int, default=d.parallelism)
    parser.add_argument("--max-active-tasks-per-dag", type=int, default=d.max_active_tasks_per_dag)
    parser.add_argument("--pool-slots", type=int, default=d.pool_slots)
    parser.add_argument("--triggerer-capacity", type=int, default=d.triggerer_capacity)
    parser.add_argument("--idle-s", type=float, default=d.idle_s, help="idle CPU baseline before the trigger")
    parser.add_argument("--watch-every-s", type=float, default=d.watch_every_s)
    parser.add_argument("--extrapolate-to", type=int, default=d.extrapolate_to)
    parser.add_argument("--timeout-s", type=float, default=None)
    parser.add_argument("--max-triggerer-cpu-s", type=float, default=None, help="bound per partition (exit 3 above)")
    parser.add_argument("--max-overhead-s", type=float, default=None, help="bound per partition (exit 3 above)")
    parser.add_argument("--keep", help="work in this directory and keep it (Airflow home, logs, assets)")
    args = parser.parse_args(argv)
    try:
        cfg = BenchConfig(**{k: v for k, v in vars(args).items() if k != "keep"})
    except ValueError as exc:
        parser.error(str(exc))
    from tests import postgres_server

    if not postgres_server.available():
        print("PostgreSQL binaries are missing: `make system-deps` installs them", file=sys.stderr)
        return 2
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the Airflow processes and PostgreSQL
    # this run started are stopped by their context managers instead of outliving it
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workdir = args.keep or tempfile.mkdtemp(prefix="cp-scale-")
    os.makedirs(workdir, exist_ok=True)
    try:
        res = run(cfg, workdir)
        print(report(res), flush=True)
        over = over_bounds(res)
        if over:
            print("control_plane_scale: over its bounds: " + "; ".join(over), file=sys.stderr)
            return 3
    except BenchError as exc:
        print(f"control_plane_scale: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
