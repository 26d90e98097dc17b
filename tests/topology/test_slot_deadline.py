"""The job deadline counts from the slot, in the topology users deploy (the session's shared
stack, see conftest.py): 6 partitions, 1 in flight, each job 25 s, ``embed_timeout_s`` 60 s:
longer than any one job, shorter than the queue (6 x 25 s). The cluster is the deployment's
``ray_default`` stand-in of a Ray dashboard (the ``existing`` backend): its jobs run for
``delays`` seconds and write nothing, so the run's ``validate`` fails afterwards by design and
only the embed phase is checked."""

from __future__ import annotations

import time

import pytest

from bench.control_plane_metrics import peak_concurrent
from tests.topology.airflow_stack import FINISHED

pytestmark = pytest.mark.integration

JOB_S, TIMEOUT_S, PARTITIONS = 25.0, 60, 6


def test_every_partition_of_a_queue_longer_than_the_deadline_succeeds_on_its_first_try(
    stack, ray_standin, demo_assets, tmp_path
):
    ray_standin.delays = [JOB_S] * PARTITIONS
    before = set(ray_standin.jobs)
    conf = {
        "manifest_uri": demo_assets.manifest,
        "output_uri": str(tmp_path),
        "model_uri": demo_assets.model,
        "backend": "existing",
        "partition_rows": 16,
        "max_partitions": PARTITIONS,
        "max_partitions_in_flight": 1,
        "embed_timeout_s": TIMEOUT_S,
        "poll_interval_s": 2,
    }
    r = stack.trigger(conf)
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    deadline = time.monotonic() + 420  # the queue needs about 6 x 25 s; well inside pytest's timeout
    while time.monotonic() < deadline:
        embeds = [t for t in stack.task_instances(run_id) if t["task_id"] == "embed"]
        if len(embeds) == PARTITIONS and all(t["state"] in FINISHED for t in embeds):
            break
        time.sleep(3)
    else:
        states = {t["task_id"]: t["state"] for t in stack.task_instances(run_id) if t["task_id"] != "embed"}
        raise AssertionError(
            f"the embed phase did not end: {embeds}\nother tasks: {states}\n{stack.log_tail('scheduler')}\n"
            f"{stack.log_tail('triggerer')}"
        )
    stack.wait_run(run_id, timeout=300)  # validate and the teardowns run after (validate fails by design)

    tries = {t["map_index"]: (t["state"], t["try_number"]) for t in embeds}
    assert tries == {k: ("success", 1) for k in range(PARTITIONS)}, tries
    jobs = [j for sid, j in ray_standin.jobs.items() if sid not in before]
    assert sorted(j.partition for j in jobs) == list(range(PARTITIONS)), "one submission per partition"
    assert all(j.stopped_at is None for j in jobs), "no job was stopped by a deadline"
    assert peak_concurrent([(j.submitted_at, j.ends_at) for j in jobs]) == 1
    first, last = min(jobs, key=lambda j: j.partition), max(jobs, key=lambda j: j.partition)
    waited = last.submitted_at - first.submitted_at
    assert waited > TIMEOUT_S, f"the last partition waited {waited:.0f}s for its slot, longer than embed_timeout_s"
    log = stack.task_log(run_id, "embed", PARTITIONS - 1)
    assert "waits for a slot until" in log and "got a slot after" in log, log[-3000:]
    # a waiting partition deferred once: its trigger submitted the job when the slot opened and
    # wrote the job's id and dashboard link to the task's XCom through the triggerer's channel
    assert "submitted Ray job" in log and log.count("Pausing task as DEFERRED") <= 1, log[-3000:]
    sid = stack.xcom(run_id, "embed", "submission_id", map_index=PARTITIONS - 1)
    assert sid and sid in {j.submission_id for j in jobs}
    assert (stack.xcom(run_id, "embed", "_link_RayJobLink", map_index=PARTITIONS - 1) or "").endswith(sid)
