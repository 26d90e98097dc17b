"""Progress lines: the job's ``progress:`` figures parsed, and the trigger's one line per poll."""

from __future__ import annotations

import logging

import pytest

from airflow_ray.progress import Progress, duration, split_progress
from airflow_ray.triggers.ray_job import RayJobTrigger
from ray_jobs.job.progress import ProgressFigures


def test_the_jobs_line_parses_into_its_figures_and_reads_in_words():
    # the data plane's own line (ray_jobs.job.progress), as the job prints it
    line = ProgressFigures(17, 1_000_000, 499_988, 12, 405.0, 0.0).line()
    p = Progress.parse("2026-01-01 02:03:04 INFO " + line)
    assert p == Progress(rows_done=500_000, rows_total=1_000_000, rows_rejected=12, rows_per_s=1234.6, eta_s=405.0)
    assert p.describe(17) == (
        "progress: partition 17: 500,000 of 1,000,000 rows (50.0%) · 1,234.6 rows/s · 12 rejected · ETA 6m45s"
    )


@pytest.mark.parametrize(
    "line",
    ["embed: committed: rows_in=10", "progress: rows_total=5", "progress: rows_done=-3", "progress: rows_done=x"],
)
def test_other_lines_are_not_progress(line):
    assert Progress.parse(line) is None


def test_only_rows_done_is_needed_and_durations_read_naturally():
    assert Progress.parse("progress: rows_done=7").describe() == "progress: 7 rows"
    assert [duration(s) for s in (0, 59.6, 61, 3599, 7500)] == ["0s", "1m00s", "1m01s", "59m59s", "2h05m"]


def test_a_poll_writes_its_other_lines_and_only_its_newest_progress(caplog):
    caplog.set_level(logging.INFO)
    trigger = RayJobTrigger("http://ray", "emb-x", partition=3)
    trigger._log = logging.getLogger("test.progress")
    lines = ["start", "progress: rows_done=10 rows_total=40", "middle", "progress: rows_done=20 rows_total=40 eta_s=5"]
    others, latest = split_progress(lines)
    assert others == ["start", "middle"] and latest.rows_done == 20
    trigger._write(lines, cut=0)
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [
        "[ray job emb-x] start",
        "[ray job emb-x] middle",
        "[ray job emb-x] progress: partition 3: 20 of 40 rows (50.0%) · ETA 5s",
    ]
