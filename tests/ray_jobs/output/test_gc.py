"""gc over three nights of a changing manifest, committed with the real sink and registered in
a SQLite Iceberg catalog (no Ray needed)."""

import json
import os
import threading
import time

import pytest

from ray_jobs import storage
from ray_jobs.cli import main
from ray_jobs.config.settings import Partitioning
from ray_jobs.contract.layout import LEASE_FILE, attempt_dir_name, join_uri, part_file_name
from ray_jobs.errors import UsageError
from ray_jobs.output import gc
from ray_jobs.output.catalog import open_catalog, register_plan
from ray_jobs.output.lease import LEASE_TTL_S
from ray_jobs.output.markers import read_marker
from ray_jobs.output.table_refs import file_key
from ray_jobs.output.validate import validate_plan
from ray_jobs.planning.plan import run_plan
from tests.ray_jobs.output.test_validate import MODEL, OUT_KEY, _commit
from tests.ray_jobs.planning.test_plan import write_manifest

SETTINGS = Partitioning(partition_rows=50)


class Nights:
    """Three nights: night 2 deletes a file and adds one (and re-commits a kept partition with
    ``--force``, leaving a superseded marker), night 3 deletes night 2's new file and adds one.
    ``cut`` is a moment between night 2 and night 3: a retention reaching back to it expires
    night 1's snapshot (replaced by night 2's before it) and keeps night 2's."""

    def __init__(self, tmp_path, catalog=None):
        self.tmp = tmp_path
        self.m = tmp_path / "m"
        self.out = str(tmp_path / "out")
        self.catalog = catalog or f"sqlite:///{tmp_path}/catalog.db"
        self.plans, self.snapshots = [], []
        write_manifest(self.m, n_files=2)
        self.night("r1")
        os.remove(self.m / "part-000-001.parquet")
        write_manifest(self.m, n_files=1, start=1000)
        self.night("r2", recommit_kept=True)
        time.sleep(0.05)
        self.cut = time.time()
        time.sleep(0.05)
        os.remove(self.m / "part-1000-000.parquet")
        write_manifest(self.m, n_files=1, start=2000)
        self.night("r3")

    def night(self, run_id, recommit_kept=False):
        plan = run_plan(str(self.m), self.out, SETTINGS, run_id=run_id).plan
        kept = [p.index for p in plan.partitions if p.kept]
        for p in plan.partitions:
            if not p.kept:
                _commit(plan, p.index)
        if recommit_kept:  # one kept partition committed again (--force): its old marker goes to _history/
            _commit(plan, kept[0])
            self.recommitted = plan.work_uri(kept[0], MODEL, OUT_KEY)
        result = register_plan(plan, MODEL, self.catalog, run_id=run_id, output_key=OUT_KEY)
        self.plans.append(plan)
        self.snapshots.append(result.snapshot_id)
        return plan

    def table(self):
        ident = f"embeddings.{os.path.basename(self.m)}"
        catalog = open_catalog(self.catalog, join_uri(self.out, "warehouse"))
        (found,) = [".".join(t) for t in catalog.list_tables("embeddings") if ".".join(t).startswith(ident)]
        return catalog.load_table(found)

    def retain_s(self):
        """A retention whose cutoff falls between night 2 and night 3."""
        return time.time() - self.cut

    def referenced(self):
        """Every file any snapshot of the table references, as storage keys."""
        table = self.table()
        return {
            file_key(e.data_file.file_path)
            for s in table.metadata.snapshots
            for m in s.manifests(table.io)
            for e in m.fetch_manifest_entry(table.io)
        }

    def work(self, night, index):
        plan = self.plans[night - 1]
        return plan.work_uri(index, MODEL, OUT_KEY)


def _attempt(work_uri, heartbeat_at, name="20990101T000000Z-00000000"):
    """An attempt directory with a lease and one part file, as a running embed writes them."""
    uri = join_uri(work_uri, attempt_dir_name(name))
    os.makedirs(uri, exist_ok=True)
    lease = {"attempt": name, "host": "h", "pid": 1, "started_at": heartbeat_at, "heartbeat_at": heartbeat_at}
    with open(os.path.join(uri, LEASE_FILE), "w") as fh:
        json.dump(lease, fh)
    with open(os.path.join(uri, part_file_name(0)), "wb") as fh:
        fh.write(b"PAR1 being written")
    return uri


@pytest.fixture
def nights(tmp_path):
    return Nights(tmp_path)


def _retired_by_night_2(nights):
    p1, p2 = nights.plans[0], nights.plans[1]
    return [nights.work(1, p.index) for p in p1.partitions if p.key in {r.key for r in p2.retired}]


def test_three_nights_gc_removes_night_1s_retired_work_and_keeps_what_snapshots_and_plans_need(nights):
    retired_1 = _retired_by_night_2(nights)
    assert len(retired_1) == 2, "night 2 deleted a file two of night 1's partitions read"
    retired_3 = [nights.work(2, p.index) for p in nights.plans[1].partitions if not p.kept]
    kept_p0 = nights.recommitted
    history = os.path.join(kept_p0, "_history")
    (old_marker,) = os.listdir(history)
    old_attempt = os.path.join(kept_p0, attempt_dir_name(old_marker.removesuffix(".json")))
    dead = _attempt(kept_p0, time.time() - 2 * LEASE_TTL_S, "20000101T000000Z-deaddead")
    live = _attempt(kept_p0, time.time(), "20990101T000000Z-11111111")
    before = storage.sizes_under(nights.out)
    table = nights.table()
    rows_now = table.scan().to_arrow().num_rows

    dry = gc.collect(nights.out, nights.retain_s(), catalog_uri=nights.catalog, dry_run=True)
    assert storage.sizes_under(nights.out) == before, "a dry run removes nothing"
    assert len(nights.table().metadata.snapshots) == 3

    result = gc.collect(nights.out, nights.retain_s(), catalog_uri=nights.catalog)
    print(result.summary())
    for r in (dry, result):
        assert r.snapshots_expired == 1 and r.tables == [".".join(table.name())]
        assert sorted(r.work_removed) == sorted(retired_1) and r.rows_removed == 40 + 30
        assert r.attempts_removed == [dead] and len(r.history_removed) == 1
        assert r.runs_removed == [join_uri(nights.out, "runs", "r1")] and r.uploads_aborted == []
    assert dry.items() and all("would" in line for line in dry.items() if not line.startswith("gc: note"))

    assert not any(os.path.exists(w) for w in retired_1), "night 1's retired work is gone"
    assert all(os.path.exists(w) for w in retired_3), "night 2's retired work: night 2's snapshot is retained"
    assert not os.path.exists(old_attempt) and not os.path.exists(os.path.join(history, old_marker))
    assert not os.path.exists(dead) and os.listdir(live), "a live attempt stays"
    assert os.path.exists(join_uri(nights.out, "runs", "r2", "plan.json")), "the plan night 3 continues stays"

    table = nights.table()
    assert [s.snapshot_id for s in table.metadata.snapshots] == nights.snapshots[1:]
    assert table.scan().to_arrow().num_rows == rows_now == nights.plans[2].rows
    assert table.scan(snapshot_id=nights.snapshots[1]).to_arrow().num_rows == nights.plans[1].rows
    assert all(os.path.exists(k) for k in nights.referenced()), "every file a retained snapshot references stays"
    assert validate_plan(nights.plans[2], MODEL, embed_dim=4, output_key=OUT_KEY).ok

    again = gc.collect(nights.out, nights.retain_s(), catalog_uri=nights.catalog)
    assert again.snapshots_expired == 0 and not again.work_removed and not again.history_removed


def _interleave(monkeypatch, land):
    """Run *land* once, on gc's first re-check before a removal (after it listed and judged)."""
    original = gc.Collector._refresh
    calls = {"n": 0}

    def refresh(self):
        calls["n"] += 1
        if calls["n"] == 2:  # 1: the initial read; 2: the re-check before the first removal
            land()
        original(self)

    monkeypatch.setattr(gc.Collector, "_refresh", refresh)
    return calls


def test_a_catalog_commit_landing_between_listing_and_removal_protects_its_files(nights, monkeypatch):
    """Night 1's plan is registered again (a rollback) after gc judged night 1's retired work
    unreferenced and before it removes it: the new snapshot references that work, so it stays."""
    retired_1 = _retired_by_night_2(nights)
    landed = {}

    def rollback():
        landed["result"] = register_plan(nights.plans[0], MODEL, nights.catalog, run_id="rollback", output_key=OUT_KEY)

    calls = _interleave(monkeypatch, rollback)
    result = gc.collect(nights.out, nights.retain_s(), catalog_uri=nights.catalog)
    assert calls["n"] >= 2 and landed["result"].new_snapshot
    assert result.work_removed == [] and result.kept["work dirs referenced by retained snapshots"] >= 2
    assert all(os.path.exists(w) for w in retired_1)
    table = nights.table()
    assert table.current_snapshot().snapshot_id == landed["result"].snapshot_id
    assert table.scan().to_arrow().num_rows == nights.plans[0].rows
    assert all(os.path.exists(k) for k in nights.referenced())


def test_an_attempt_starting_between_listing_and_removal_keeps_its_work(nights, monkeypatch):
    """An embed attempt starts writing in retired work after gc listed it: its lease is live,
    so the directory and the attempt's files stay; the other retired directory goes."""
    retired_1 = _retired_by_night_2(nights)
    started = {}

    def attempt():
        started["uri"] = _attempt(retired_1[0], time.time())

    _interleave(monkeypatch, attempt)
    result = gc.collect(nights.out, nights.retain_s(), catalog_uri=nights.catalog)
    assert result.work_removed == [retired_1[1]]
    assert os.path.exists(os.path.join(started["uri"], part_file_name(0)))
    assert read_marker(retired_1[0]) is not None, "the committed marker beside the live attempt stays too"
    assert result.kept["work dirs with a live attempt"] == 1


def test_gc_while_a_night_runs_and_registers_never_loses_a_referenced_file(nights):
    """gc in a thread while night 4 plans, embeds (a live lease in its attempt) and registers."""
    os.remove(nights.m / "part-2000-000.parquet")
    write_manifest(nights.m, n_files=1, start=3000)
    errors = []

    def collect():
        try:
            for _ in range(3):
                gc.collect(nights.out, nights.retain_s(), catalog_uri=nights.catalog)
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)

    worker = threading.Thread(target=collect)
    worker.start()
    plan = nights.night("r4")
    worker.join(timeout=120)
    assert not worker.is_alive() and errors == []
    gc.collect(nights.out, nights.retain_s(), catalog_uri=nights.catalog)
    assert validate_plan(plan, MODEL, embed_dim=4, output_key=OUT_KEY).ok
    assert all(os.path.exists(k) for k in nights.referenced())
    assert nights.table().scan().to_arrow().num_rows == plan.rows


def test_without_a_catalog_work_is_kept_and_with_no_catalog_plans_decide(nights):
    retired_1 = _retired_by_night_2(nights)
    kept = gc.collect(nights.out, nights.retain_s())
    assert kept.work_removed == [] and kept.history_removed == [] and kept.snapshots_expired == 0
    assert any("no catalog" in n for n in kept.notes)
    assert all(os.path.exists(w) for w in retired_1)
    # registered nowhere: night 2's retired work goes too (no snapshot keeps it), night 3's plan's work stays
    bare = gc.collect(nights.out, nights.retain_s(), no_catalog=True)
    assert set(retired_1) <= set(bare.work_removed)
    assert validate_plan(nights.plans[2], MODEL, embed_dim=4, output_key=OUT_KEY).ok


def test_an_unreadable_marker_or_plan_keeps_work(nights):
    retired_1 = _retired_by_night_2(nights)
    with open(os.path.join(retired_1[0], "_SUCCESS"), "w") as fh:
        fh.write("{not json")
    with open(join_uri(nights.out, "runs", "r3", "plan.json"), "a") as fh:
        fh.write("garbage")
    result = gc.collect(nights.out, nights.retain_s(), catalog_uri=nights.catalog, dry_run=True)
    assert result.work_removed == []
    assert result.kept["work dirs with an unreadable marker"] == 1
    assert any("unreadable plan" in n for n in result.notes)


def test_retention_parsing_and_the_cli(nights, capsys):
    assert gc.parse_retention("7d") == 7 * 86400 and gc.parse_retention("36h") == 36 * 3600
    assert gc.parse_retention("90m") == 5400
    for bad in ("7", "1w", "-1d", "30m", "d"):
        with pytest.raises(UsageError):
            gc.parse_retention(bad)
    assert main(["gc", "--output", nights.out, "--retain", "1w"]) == 2
    assert main(["gc", "--output", nights.out, "--catalog-uri", nights.catalog, "--no-catalog"]) == 2
    before = storage.sizes_under(nights.out)
    assert main(["gc", "--output", nights.out, "--catalog-uri", nights.catalog, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("gc: would expire 0 snapshots in 1 tables; would remove 0 work")
    assert storage.sizes_under(nights.out) == before
    assert main(["gc", "--output", nights.out, "--catalog-uri", nights.catalog, "--retain", "1h"]) == 0
    assert "gc: expired 0 snapshots" in capsys.readouterr().out


def test_legacy_partition_directories_go_when_no_plan_lists_them(nights):
    legacy = join_uri(nights.out, "embeddings", f"model={MODEL}", "plan=oldplan", "partition=00000")
    os.makedirs(legacy)
    with open(os.path.join(legacy, "_SUCCESS"), "w") as fh:
        fh.write("{}")  # unreadable for today's reader: kept
    old = time.time() - 10 * 86400
    os.utime(os.path.join(legacy, "_SUCCESS"), (old, old))
    assert gc.collect(nights.out, 86400, catalog_uri=nights.catalog).kept["work dirs with an unreadable marker"] == 1
    os.remove(os.path.join(legacy, "_SUCCESS"))
    stale = _attempt(legacy, old, "20000101T000000Z-0000aaaa")
    for name in os.listdir(stale):
        os.utime(os.path.join(stale, name), (old, old))
    result = gc.collect(nights.out, 86400, catalog_uri=nights.catalog)
    assert result.work_removed == [legacy] and not os.path.exists(legacy)


@pytest.mark.integration
def test_incomplete_multipart_uploads_under_the_output_are_aborted(s3_bucket, s3_server, monkeypatch):
    """Against a real S3 server (moto). moto reports every upload as initiated in 2010, so the
    first collection sees the server's answer with the initiation time set to now (an upload
    in progress) to show young uploads stay; the rest use the server's answer as it is."""
    import datetime as dt

    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    bucket = s3_bucket.removeprefix("s3://")
    output = f"{s3_bucket}/gc/out"
    storage.write_text(f"{output}/runs/_lineage/x.json", json.dumps({"run_id": "none"}))
    mine = s3.create_multipart_upload(Bucket=bucket, Key="gc/out/embeddings/x/part-00000-000.parquet")
    other = s3.create_multipart_upload(Bucket=bucket, Key="gc/elsewhere/part.parquet")
    fs, _ = storage.filesystem_for(output)
    real_call = fs.call_s3

    def initiated_now(method, *args, **kwargs):
        answer = real_call(method, *args, **kwargs)
        for upload in answer.get("Uploads", []) if method == "list_multipart_uploads" else []:
            upload["Initiated"] = dt.datetime.now(dt.UTC)
        return answer

    with monkeypatch.context() as m:
        m.setattr(fs, "call_s3", initiated_now)
        young = gc.collect(output, 3600, no_catalog=True)
    assert young.uploads_aborted == [] and young.kept["multipart uploads in progress"] == 1
    dry = gc.collect(output, 3600, no_catalog=True, dry_run=True)
    assert len(dry.uploads_aborted) == 1 and mine["UploadId"] in dry.uploads_aborted[0]
    assert len(s3.list_multipart_uploads(Bucket=bucket)["Uploads"]) == 2, "a dry run aborts nothing"
    result = gc.collect(output, 3600, no_catalog=True)
    assert result.uploads_aborted == dry.uploads_aborted
    left = {u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    assert mine["UploadId"] not in left and other["UploadId"] in left, "only uploads under the output prefix"
    s3.abort_multipart_upload(Bucket=bucket, Key="gc/elsewhere/part.parquet", UploadId=other["UploadId"])


@pytest.mark.integration
def test_retired_work_on_s3_goes_and_the_table_still_scans(s3_bucket, tmp_path):
    """Two nights with the output and warehouse on S3 (moto): night 1's retired work goes."""
    m = tmp_path / "m"
    out = f"{s3_bucket}/gc-nights/out"
    catalog = f"sqlite:///{tmp_path}/catalog.db"
    plans = []
    write_manifest(m, n_files=2)
    for run_id in ("s1", "s2"):
        if run_id == "s2":
            os.remove(m / "part-000-001.parquet")
            write_manifest(m, n_files=1, start=1000)
        plan = run_plan(str(m), out, SETTINGS, run_id=run_id).plan
        for p in plan.partitions:
            if not p.kept:
                _commit(plan, p.index)
        register_plan(plan, MODEL, catalog, run_id=run_id, output_key=OUT_KEY)
        plans.append(plan)
    time.sleep(1.5)  # S3 times are whole seconds
    tonight = {q.key for q in plans[1].partitions}
    retired = [plans[0].work_uri(p.index, MODEL, OUT_KEY) for p in plans[0].partitions if p.key not in tonight]
    result = gc.collect(out, 1.0, catalog_uri=catalog)
    print(result.summary())
    assert result.snapshots_expired == 1 and sorted(result.work_removed) == sorted(retired) and len(retired) == 2
    assert not any(storage.exists(w) for w in retired)
    table = open_catalog(catalog, join_uri(out, "warehouse")).load_table(result.tables[0])
    assert table.scan().to_arrow().num_rows == plans[1].rows
    assert validate_plan(plans[1], MODEL, embed_dim=4, output_key=OUT_KEY).ok


def test_a_table_in_another_namespace_protects_the_files_it_registered(nights):
    """Someone registered night 1's part files in their own table: gc keeps the work they read."""
    retired_1 = _retired_by_night_2(nights)
    catalog = open_catalog(nights.catalog, join_uri(nights.out, "warehouse"))
    catalog.create_namespace_if_not_exists("analytics")
    theirs = catalog.create_table("analytics.copied", schema=nights.table().schema())
    files = [
        join_uri(w, f.path)
        for w in retired_1
        for f in read_marker(w).files  # the embedding files the marker lists
    ]
    theirs.add_files(files)
    result = gc.collect(nights.out, nights.retain_s(), catalog_uri=nights.catalog)
    assert "analytics.copied" in result.tables
    assert not result.work_removed and all(os.path.exists(f) for f in files)
    assert catalog.load_table("analytics.copied").scan().to_arrow().num_rows == sum(
        read_marker(w).rows_ok for w in retired_1
    )
