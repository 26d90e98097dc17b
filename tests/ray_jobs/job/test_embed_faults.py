"""What a production night throws at a partition job, on a real local Ray and a real S3 endpoint:
a second writer on the same partition, throttled and dropped image GETs, a stage out of memory,
and a partition whose embeddings would not fit in the driver's memory."""

import os
import re
import subprocess
import sys
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ray_jobs import storage
from ray_jobs.contract.layout import SUCCESS_FILE
from ray_jobs.demo.assets import write_demo_assets
from ray_jobs.job.datasink import EmbeddingDatasink
from ray_jobs.job.embed import prepare, run_prepared
from ray_jobs.model.staged import ModelStage
from ray_jobs.output.lease import Attempt
from ray_jobs.output.markers import committed_marker, read_marker
from tests.ray_jobs.job.test_embed import _cfg
from tests.s3_faults import FaultProxy

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEMO_REASONS = {
    "decompression bomb",
    "empty object",
    "missing object",
    "not an image",
    "truncated image",
    "undecodable image",
}


def _embed_process(ray_session, *args, **env):
    """``python -m ray_jobs embed`` as its own driver process on the test session's Ray cluster."""
    full_env = {**os.environ, **env, "PYTHONPATH": ROOT}
    full_env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "-m",
        "ray_jobs",
        "embed",
        *args,
        "--ray-address",
        ray_session.get_runtime_context().gcs_address,
        "--num-stages",
        "1",
        "--stage-num-cpus",
        "0.5",
        "--preprocess-cpus",
        "0.5",
        "--preprocess-pool",
        "1-1",
        "--batch-size",
        "16",
    ]
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _summary(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("embed: ") and "rows_in=" in line]
    assert len(lines) == 1, output[-4000:]
    return lines[0]


def _partition_of(summary: str) -> str:
    return summary.rsplit("output=", 1)[1].strip()


def _all_ids(partition_uri, marker):
    fs, _ = storage.filesystem_for(partition_uri)
    fs_arg = storage.arrow_filesystem(fs) if storage.is_remote(partition_uri) else None
    strip = (lambda u: u.split("://", 1)[1]) if fs_arg else (lambda u: u)
    data = pq.read_table([strip(u) for u in marker.data_uris(partition_uri)], filesystem=fs_arg)["id"].to_pylist()
    rejects = pq.read_table([strip(u) for u in marker.rejects_uris(partition_uri)], filesystem=fs_arg)
    return data, rejects["id"].to_pylist()


def test_two_embed_processes_on_one_partition_commit_exactly_once(ray_session, demo_assets, tmp_path):
    args = ("--manifest", demo_assets.manifest, "--output", str(tmp_path), "--model", demo_assets.model)
    procs = [_embed_process(ray_session, *args) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outputs]
    summaries = [_summary(o) for o in outputs]
    won = [s for s in summaries if s.startswith("embed: committed: ")]
    lost = [s for s in summaries if s.startswith("embed: committed by another attempt while this one ran")]
    assert len(won) == 1 and len(lost) == 1, summaries

    partition = _partition_of(won[0])
    marker = committed_marker(partition, read_marker(partition).model_id)
    assert marker is not None and f"attempt={marker.attempt} " in won[0] and f"attempt={marker.attempt} " in lost[0]
    sizes = storage.sizes_under(partition)
    for f in marker.listed:
        assert sizes[f.path] == f.bytes, f"listed file {f.path} exists with its listed size"
    assert {path.split("/")[0] for path in sizes} == {SUCCESS_FILE, f"attempt={marker.attempt}"}, (
        "the losing attempt left nothing behind"
    )
    data, rejects = _all_ids(partition, marker)
    assert sorted(data + rejects) == [f"row-{n:06d}" for n in range(120)], "each id exactly once"
    assert marker.rows_rejected == 12 and set(marker.rejects_by_reason) == DEMO_REASONS
    # start-up, as a deployed driver (its own process) records it: every actor's record read back
    t = marker.timings
    assert t["startup_driver_s"] > 0 and t["startup_actor_start_s"] > 0 and t["startup_model_load_s"] >= 0, t
    assert t["startup_admission_wait_s"] >= 0
    assert t["startup_actor_start_s"] + t["startup_model_load_s"] <= t["time_to_first_batch_s"] + 0.5, t
    assert any("embed: start-up: driver_s=" in o for o in outputs), "the committing driver prints its start-up"
    # under the reservation every pool starts at once: every actor's process has started before
    # any actor is ready (Ray Data's per-operator wait would start a pool's processes only once
    # the pool before it is ready)
    for output in outputs:
        starts = _actor_starts(output)
        assert {"preprocess", "stage0"} <= set(starts), output[-3000:]
        assert max(p for p, _ in starts.values()) < min(e for _, e in starts.values()), starts


_START = re.compile(r"start-up of (\w+) \(pid \d+\).*process (-?[\d.]+), constructor -?[\d.]+-(-?[\d.]+)")


def _actor_starts(output: str) -> dict[str, tuple[float, float]]:
    """Each actor's process start and constructor end, seconds after the pipeline's start, from
    the driver's log."""
    return {m[1]: (float(m[2]), float(m[3])) for m in _START.finditer(output)}


def test_throttled_and_dropped_image_gets_never_become_rejects(ray_session, s3_server, s3_bucket, tmp_path):
    """30-50 % of image GETs answered 503 SlowDown, dropped or cut mid-body: 0 extra rejects."""
    assets = write_demo_assets(f"{s3_bucket}/faults", rows=40, bad_images=6, files=2, row_group_rows=8)
    args = ("--manifest", assets.manifest, "--output", f"{s3_bucket}/faults-out", "--model", assets.model)
    with FaultProxy(s3_server, fault_rate=0.4, match="/faults/images/", seed=3) as proxy:
        proc = _embed_process(
            ray_session, *args, AWS_ENDPOINT_URL=proxy.endpoint, RAY_JOBS_CACHE_DIR=str(tmp_path / "cache")
        )
        output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-4000:]
    counts = proxy.counts
    assert counts["matched_gets"] >= 34 and proxy.faults >= 0.25 * counts["matched_gets"], counts
    summary = _summary(output)
    partition = _partition_of(summary)
    marker = read_marker(partition)
    assert (marker.rows_in, marker.rows_ok, marker.rows_rejected) == (40, 34, 6), summary
    assert marker.rejects_by_reason == dict.fromkeys(sorted(DEMO_REASONS), 1), "a corrupt image is still one reject"
    data, rejects = _all_ids(partition, marker)
    assert sorted(data + rejects) == [f"row-{n:06d}" for n in range(40)]


def test_a_store_that_never_recovers_fails_the_job_and_commits_nothing(ray_session, s3_server, s3_bucket, tmp_path):
    assets = write_demo_assets(f"{s3_bucket}/outage", rows=16, bad_images=0, files=1, row_group_rows=16)
    out = f"{s3_bucket}/outage-out"
    with FaultProxy(s3_server, fault_rate=1.0, match="/outage/images/", seed=5) as proxy:
        proc = _embed_process(
            ray_session,
            *("--manifest", assets.manifest, "--output", out, "--model", assets.model, "--task-retries", "1"),
            AWS_ENDPOINT_URL=proxy.endpoint,
            RAY_JOBS_CACHE_DIR=str(tmp_path / "cache"),
        )
        output = proc.communicate(timeout=600)[0]
    assert proc.returncode != 0 and "transient failure: fetching s3://" in output, output[-3000:]
    assert proxy.counts["matched_gets"] >= 2 * 6, "each fetch tried 6 times, the batch twice"
    fs, path = storage.filesystem_for(out)
    fs.invalidate_cache()
    leftovers = [p for p in fs.find(path) if "/partition=" in p]
    assert leftovers == [], "no marker, no rejects, no attempt left behind"


class OutOfMemoryFirstBatches(ModelStage):
    """The real stage on a stand-in for a GPU that is short of memory: its module raises CUDA's
    out-of-memory error for the first FAIL_FIRST calls of every actor (more than halving can
    absorb inside one batch, so Ray Data's task retry is exercised too)."""

    FAIL_FIRST = 8

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        real, calls = self.module.run, [0]

        def run(cols):
            calls[0] += 1
            if calls[0] <= self.FAIL_FIRST:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(cols)

        self.module.run = run


def test_a_stage_out_of_memory_for_its_first_batches_rejects_nothing(ray_session, demo_assets, tmp_path, monkeypatch):
    monkeypatch.setattr("ray_jobs.model.staged.ModelStage", OutOfMemoryFirstBatches)
    result = run_prepared(prepare(_cfg(demo_assets, tmp_path, num_stages=2)))
    assert (result.rows_ok, result.rows_rejected) == (108, 12)
    assert set(result.rejects_by_reason) == DEMO_REASONS, "no 'model error' reject"


class _PeakRss:
    """Samples this process's resident memory (the Ray Data driver's) every 20 ms."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.baseline = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_driver_memory_does_not_grow_with_the_partition(ray_session, tmp_path):
    """512 MiB of embeddings go through the sink; the driver stays within 128 MiB of where it started."""
    import ray

    dim, rows, limit = 1024, 65_536, 128 * 2**20

    def last_stage_output(batch):  # what the last model stage hands to the sink
        n = len(batch["id"])
        emb = np.full((n, dim), 1 / np.sqrt(dim), dtype=np.float32)
        return {
            "id": np.array([f"row-{i:06d}" for i in batch["id"]], dtype=object),
            "ok": np.ones(n, dtype=bool),
            "reject_stage": np.full(n, "", dtype=object),
            "reject_reason": np.full(n, "", dtype=object),
            "text_embedding": emb,
            "image_embedding": emb,
        }

    ds = ray.data.range(rows, override_num_blocks=64).map_batches(last_stage_output, batch_size=1024)
    part = str(tmp_path / "partition=00000")
    with Attempt(part) as attempt:
        sink = EmbeddingDatasink(
            attempt,
            rows_in=rows,
            text_dim=dim,
            image_dim=dim,
            rows_per_file=100_000,
            row_group_rows=8192,
            commit_meta={"model_id": "m", "plan_id": "p", "partition": 0},
        )
        with _PeakRss() as rss:
            ds.write_datasink(sink)
    assert rows * 2 * dim * 4 >= 4 * limit
    assert sink.marker is not None and sink.marker.rows_ok == rows and committed_marker(part, "m") == sink.marker
    assert rss.peak - rss.baseline < limit, f"driver grew by {(rss.peak - rss.baseline) / 2**20:.0f} MiB"
