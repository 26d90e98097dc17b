"""A running partition's progress: the driver's line and the JSON the run page reads."""

from __future__ import annotations

import json

import pytest

from ray_jobs.errors import PipelineStalled
from ray_jobs.job.progress import ProgressFigures, ProgressReporter, RowCounter, progress_uri


def _read(uri: str) -> dict:
    with open(uri) as fh:
        return json.load(fh)


def test_figures_rate_and_eta_count_from_the_pipelines_start():
    f = ProgressFigures(partition=2, rows_total=100, rows_ok=30, rows_rejected=10, elapsed_s=20.0, at=0.0)
    assert (f.rows_done, f.rows_per_s, f.eta_s) == (40, 2.0, 30.0)
    assert f.line() == "progress: rows_done=40 rows_total=100 rows_ok=30 rows_rejected=10 rows_per_s=2.0 eta_s=30"
    assert ProgressFigures(2, 100, 0, 0, 5.0, 0.0).eta_s is None  # nothing done yet: no rate, no ETA
    assert ProgressFigures(2, 100, 100, 0, 5.0, 0.0).eta_s == 0.0


def test_the_reporter_prints_and_writes_each_interval_and_a_final_report(tmp_path):
    counter, printed, now = RowCounter(), [], [1000.0]
    uri = progress_uri(str(tmp_path / "runs" / "r1" / "plan.json"), 7)
    assert uri == str(tmp_path / "runs" / "r1" / "progress" / "partition=00007.json")
    reporter = ProgressReporter(
        counter.totals, partition=7, rows_total=50, uri=uri, interval_s=60, emit=printed.append, clock=lambda: now[0]
    )
    with reporter:
        counter.add(10, 0)
        now[0] += 10
        running = reporter.report()
        assert running.state == "running" and _read(uri)["rows_done"] == 10
        counter.add(38, 2)
        now[0] += 10
    final = _read(uri)
    assert final == {
        "partition": 7,
        "rows_total": 50,
        "rows_ok": 48,
        "rows_rejected": 2,
        "rows_done": 50,
        "elapsed_s": 20.0,
        "at": 1020.0,
        "state": "done",
        "rows_per_s": 2.5,
        "eta_s": 0.0,
    }
    assert printed == [
        "progress: rows_done=10 rows_total=50 rows_ok=10 rows_rejected=0 rows_per_s=1.0 eta_s=40",
        "progress: rows_done=50 rows_total=50 rows_ok=48 rows_rejected=2 rows_per_s=2.5 eta_s=0",
    ]


def test_a_failed_pipeline_reports_failed_and_an_unreadable_counter_never_raises(tmp_path):
    uri = str(tmp_path / "p.json")
    with pytest.raises(RuntimeError), ProgressReporter(lambda: (1, 0), partition=0, rows_total=5, uri=uri, emit=print):
        raise RuntimeError("pipeline failed")
    assert _read(uri)["state"] == "failed"
    with (
        pytest.raises(PipelineStalled),
        ProgressReporter(lambda: (1, 0), partition=0, rows_total=5, uri=uri, emit=print),
    ):
        raise PipelineStalled("pipeline stalled: no row moved for 900 s")
    assert _read(uri)["state"] == "stalled", "the run page tells a stall from a failure"

    def broken():
        raise ConnectionError("actor gone")

    assert ProgressReporter(broken, partition=0, rows_total=5, uri=uri, emit=print).report() is None
