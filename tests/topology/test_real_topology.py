"""The nightly DAG in the topology users deploy: PostgreSQL, api-server, scheduler,
dag-processor and triggerer as separate processes, LocalExecutor, runs triggered through the
REST API; partitions run concurrently on one local Ray cluster that fits fewer jobs than
there are partitions. Faults: the triggerer and the scheduler SIGKILLed mid-run; a running
partition marked failed by hand; bad conf."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.topology.airflow_stack import DAG_ID, assert_no_ray_left

pytestmark = pytest.mark.integration


def _conf(assets, output, **over):
    return {
        "manifest_uri": assets.manifest,
        "output_uri": str(output),
        "model_uri": assets.model,
        "batch_size": 16,
        "poll_interval_s": 2,
        "local_num_cpus": 8,  # one job's footprint is 4 CPUs: the cluster fits 2 jobs at once
        "max_reject_rate": 0.2,
        **over,
    }


def _report(output, run_id):
    from embedding_run.steps import plan_run_id

    with open(os.path.join(output, "runs", plan_run_id(run_id), "report.json")) as fh:
        return json.load(fh)


def test_bad_conf_is_refused_through_the_rest_api_naming_the_field(stack, demo_assets, tmp_path):
    runs_before = stack.run_count()
    r = stack.trigger({"output_uri": str(tmp_path), "model_uri": demo_assets.model})
    assert r.status_code == 400 and "manifest_uri" in r.text, r.text
    r = stack.trigger(_conf(demo_assets, tmp_path, batch_size=-5))
    assert r.status_code == 400 and "batch_size" in r.text, r.text
    r = stack.trigger(_conf(demo_assets, tmp_path, backend="kubernetes-of-my-choice"))
    assert r.status_code == 400 and "backend" in r.text, r.text
    assert stack.run_count() == runs_before, "no run was created"


def test_a_uri_the_deployment_does_not_list_is_refused_through_the_rest_api(stack, demo_assets, tmp_path):
    """The deployment's allowed prefixes (``s3://``, ``gs://`` and the stack's local root) are
    each URI param's pattern: a metadata address or a path outside the root is a 400 naming it."""
    runs_before = stack.run_count()
    for name, value in (
        ("model_uri", "http://169.254.169.254/latest/meta-data/"),
        ("manifest_uri", "/etc/passwd"),
        ("output_uri", "file:///var/tmp/out"),
    ):
        r = stack.trigger(_conf(demo_assets, tmp_path, **{name: value}))
        assert r.status_code == 400 and f"Invalid input for param {name}" in r.text, (name, r.text)
    assert stack.run_count() == runs_before, "no run was created"


def test_an_unknown_conf_key_fails_the_run_naming_it_before_any_cluster(stack, demo_assets, tmp_path):
    """Airflow 3.3 creates the run (its params merge adds a key no param declares, without a
    schema: the REST API and the form's request both answer 200); check_inputs, the first
    task, refuses it naming the key and the closest param, and no cluster starts. Sent once as
    the REST API's client sends it and once as the trigger form does (with its Referer)."""
    for headers in ({}, {"Referer": f"{stack.url}/dags/{DAG_ID}"}):
        body = {"logical_date": None, "conf": {**_conf(demo_assets, tmp_path), "batchsize": 8}}
        r = stack.api("POST", f"/dags/{DAG_ID}/dagRuns", headers=headers, json=body)
        assert r.status_code == 200, r.text
        run_id = r.json()["dag_run_id"]
        assert stack.wait_run(run_id, timeout=300) == "failed"
        tis = {t["task_id"]: t["state"] for t in stack.task_instances(run_id) if t["map_index"] == -1}
        assert tis["check_inputs"] == "failed" and tis["cluster_up"] in ("upstream_failed", None), tis
        log = stack.task_log(run_id, "check_inputs")
        assert "unknown param 'batchsize' (did you mean 'batch_size'?)" in log, log[-3000:]
    assert_no_ray_left()


def test_concurrent_partitions_survive_a_triggerer_and_a_scheduler_crash(stack, demo_assets, tmp_path):
    """6 partitions, room for 2 at a time; the triggerer is SIGKILLed while embed tasks are
    deferred and restarted 20 s later, the scheduler SIGKILLed mid-run and restarted."""
    r = stack.trigger(_conf(demo_assets, tmp_path, partition_rows=16, max_partitions=6))
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    seen = {"peak_deferred": 0, "triggerer_killed": None, "triggerer_back": None, "scheduler_cycled": False}
    start = time.monotonic()

    def watch():
        states = stack.embed_states(run_id)
        deferred = sum(1 for s in states.values() if s == "deferred")
        seen["peak_deferred"] = max(seen["peak_deferred"], deferred)
        now = time.monotonic()
        if seen["triggerer_killed"] is None and deferred >= 2:
            stack.kill("triggerer")
            seen["triggerer_killed"] = now
        elif seen["triggerer_back"] is None and seen["triggerer_killed"] and now - seen["triggerer_killed"] >= 20:
            stack.start("triggerer")
            seen["triggerer_back"] = now
        elif (
            seen["triggerer_back"]
            and not seen["scheduler_cycled"]
            and sum(1 for s in states.values() if s == "success") >= 3
        ):
            stack.kill("scheduler")
            time.sleep(5)
            stack.start("scheduler")
            seen["scheduler_cycled"] = True

    state = stack.wait_run(run_id, timeout=1500, on_poll=watch)
    wall = time.monotonic() - start
    tis = stack.task_instances(run_id)
    assert state == "success", (tis, stack.log_tail("scheduler"))
    assert seen["peak_deferred"] >= 2 and seen["triggerer_back"] and seen["scheduler_cycled"], seen

    embeds = sorted((t for t in tis if t["task_id"] == "embed"), key=lambda t: t["map_index"])
    assert len(embeds) == 6
    capacity = stack.xcom(run_id, "capacity", "max_in_flight")
    assert capacity == 2, capacity
    report = _report(str(tmp_path), run_id)
    assert report["valid"] and report["rows_in"] == 120 and report["rows_ok"] + report["rows_rejected"] == 120
    assert len(report["partitions"]) == 6 and all(p["status"] == "ok" for p in report["partitions"])

    job_wall = 0.0
    for ti in embeds:
        k = ti["map_index"]
        sid = stack.xcom(run_id, "embed", "submission_id", k)
        assert sid and re.search(r"-p\d+$", sid), f"partition {k} was submitted more than once: {sid}"
        log = "".join(stack.task_log(run_id, "embed", k, n) for n in range(1, ti["try_number"] + 1))
        ray_lines = re.findall(r"\[ray job emb-[^\]]+\] (.*)", log)
        # lines the job's driver writes exactly once: a replayed log would repeat them (Ray Data's
        # own progress lines may legitimately repeat, e.g. one per stage in the same millisecond)
        for once in ("admission: waiting for", "reserved after", "admission: released", "embed: committed:"):
            seen_n = sum(once in line for line in ray_lines)
            assert seen_n == 1, f"partition {k}: {once!r} logged {seen_n} times (replayed?):\n{log[-3000:]}"
        job_wall += ti["duration"] or 0.0
    assert_no_ray_left()
    print(
        f"\ntopology run: wall={wall:.0f}s for 6 partitions, sum of embed task durations={job_wall:.0f}s, "
        f"peak deferred={seen['peak_deferred']}, max in flight={capacity}"
    )


def test_a_partition_marked_failed_stops_its_job_and_fails_the_run_with_a_report(stack, demo_assets, tmp_path):
    r = stack.trigger(_conf(demo_assets, tmp_path, partition_rows=64))
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    marked = {}

    def mark_when_running():
        if marked:
            return
        states = stack.embed_states(run_id)
        # once the triggerer runs the job's trigger (it has streamed a job log line): marked in
        # the ~1 s between deferral and the triggerer loading the trigger, Airflow never runs
        # the trigger, so nothing stops the job (docs/operations.md, "Stopping a partition")
        if (
            states.get(0) == "deferred"
            and stack.xcom(run_id, "embed", "submission_id", 0)
            and "[ray job " in stack.task_log(run_id, "embed", 0)
        ):
            resp = stack.api(
                "PATCH",
                f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/embed/0",
                json={"new_state": "failed"},
            )
            assert resp.status_code == 200, resp.text
            marked["sid"] = stack.xcom(run_id, "embed", "submission_id", 0)

    state = stack.wait_run(run_id, timeout=900, on_poll=mark_when_running)
    assert marked, "partition 0 was never seen running"
    assert state == "failed"
    tis = {(t["task_id"], t["map_index"]): t["state"] for t in stack.task_instances(run_id)}
    assert tis[("embed", 0)] == "failed" and tis[("embed", 1)] == "success"
    assert tis[("report", -1)] == "failed" and tis[("cluster_down", -1)] == "success"
    report = _report(str(tmp_path), run_id)
    statuses = {p["index"]: p["status"] for p in report["partitions"]}
    assert statuses[1] == "ok" and statuses[0] != "ok", statuses
    log = stack.task_log(run_id, "embed", 0)
    assert f"stop requested for Ray job {marked['sid']} (partition 0)" in log, log[-3000:]
    assert "on_kill() raised" not in log
    assert_no_ray_left()


def test_a_job_left_running_on_a_borrowed_cluster_is_stopped_at_run_end(stack, ray_standin, demo_assets, tmp_path):
    """The window "Stopping a partition" names, made certain. In it, the triggerer's loop runs
    ``Trigger.clean_unused()`` after the mark and before its next ``load_triggers()``: the
    trigger row is deleted unloaded, and nothing calls on_kill. Here the triggerer is down while
    partition 0 defers and is marked failed, the test calls that same ``clean_unused()`` against
    the deployment's database, then restarts the triggerer (restarted without it, the triggerer
    would load the trigger and cancel it, calling on_kill). On a cluster the run borrows
    (``existing``: the stand-in dashboard of the deployment's ``ray_default`` connection, whose
    jobs run for ``delays`` seconds and write nothing) the job would run on after the run; the
    run's teardown stops it."""
    ray_standin.delays = [600.0, 1.0]
    stack.kill("triggerer")
    try:
        r = stack.trigger(_conf(demo_assets, tmp_path, partition_rows=64, backend="existing"))
        assert r.status_code == 200, r.text
        run_id = r.json()["dag_run_id"]
        marked = {}

        def mark_once_deferred():
            if marked or stack.embed_states(run_id).get(0) != "deferred":
                return
            sid = stack.xcom(run_id, "embed", "submission_id", 0)
            assert sid in ray_standin.jobs, (sid, list(ray_standin.jobs))
            resp = stack.api(
                "PATCH", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/embed/0", json={"new_state": "failed"}
            )
            assert resp.status_code == 200, resp.text
            marked["sid"] = sid
            clean = subprocess.run(
                [sys.executable, "-c", "from airflow.models.trigger import Trigger; Trigger.clean_unused()"],
                env=stack.env(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert clean.returncode == 0, clean.stderr[-3000:]
            stack.start("triggerer")

        state = stack.wait_run(run_id, timeout=600, on_poll=mark_once_deferred)
    finally:
        if "triggerer" not in stack.procs:
            stack.start("triggerer")
    assert marked, "partition 0 was never seen deferred"
    assert state == "failed"
    tis = {(t["task_id"], t["map_index"]): t["state"] for t in stack.task_instances(run_id)}
    assert tis[("embed", 0)] == "failed" and tis[("embed", 1)] == "success", tis
    assert tis[("cluster_down", -1)] == "success", tis
    orphan = ray_standin.jobs[marked["sid"]]
    assert orphan.stopped_at is not None, "the job of the partition marked failed still runs after its run"
    assert "stop requested" not in stack.task_log(run_id, "embed", 0), "its trigger ran: not the window"
    log = stack.task_log(run_id, "cluster_down")
    assert f"stopped Ray job {marked['sid']} (partition 0): still RUNNING after its task ended" in log, log[-3000:]
    assert "1 job(s) of this run were left running" in log, log[-3000:]


@pytest.mark.parametrize("while_running", ["check_inputs", "cluster_up"])
def test_a_run_marked_failed_early_ends_failed_and_leaves_no_cluster(stack, demo_assets, tmp_path, while_running):
    """The whole run marked failed (PATCH dagRuns, as the UI's "Mark as failed") while
    check_inputs runs, or while cluster_up is starting the cluster. Airflow skips the pending
    tasks and leaves teardowns to run, then decides the state from the leaves: before the
    run_started setup, both teardowns were skipped too and the run ended **success**; marked
    during cluster_up, the half-started local cluster was left running."""
    r = stack.trigger(_conf(demo_assets, tmp_path))
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    marked = {}

    def mark_while_running():
        if marked:
            return
        states = {t["task_id"]: t["state"] for t in stack.task_instances(run_id) if t["map_index"] == -1}
        if states.get(while_running) == "running":
            resp = stack.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{run_id}", json={"state": "failed"})
            assert resp.status_code == 200, resp.text
            marked.update(states)

    state = stack.wait_run(run_id, timeout=300, on_poll=mark_while_running, every=0.3)
    assert marked, f"{while_running} was never seen running"
    assert state == "failed"
    tis = {t["task_id"]: t["state"] for t in stack.task_instances(run_id) if t["map_index"] == -1}
    assert tis["run_started"] == "success" and tis[while_running] == "failed", tis
    assert tis["report"] == "failed" and tis["cluster_down"] == "success", tis
    verdict = stack.task_log(run_id, "report")
    if while_running == "check_inputs":
        # check_inputs' own work takes ~0.2 s of its ~2 s as a running task (most is the task
        # process's start): the mark may land after it returned its result, before plan ran
        assert re.search(
            r"run incomplete: it ended before its (inputs were checked|partitions were planned)", verdict
        ), verdict[-2000:]
    else:
        assert "run incomplete" in verdict and _report(str(tmp_path), run_id)["valid"] is False
    assert_no_ray_left(within_s=30)
