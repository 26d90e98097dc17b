"""bench/incremental.py at a small size: night 2 embeds exactly the changed files, reads each
of their images once, and its table equals a from-scratch run's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_night_two_embeds_only_the_change_and_matches_a_full_rerun(tmp_path):
    figures = tmp_path / "figures.json"
    argv = ["--rows", "1000", "--files", "5", "--append", "0.1", "--images", "40", "--batch-size", "256"]
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parents[2] / "bench" / "incremental.py"), *argv, "--json", str(figures)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(figures.read_text())
    night1, night2, full = out["nights"]
    change = out["change"]
    assert change["appended_rows"] == 100 and change["rewritten_rows"] == 200 and change["deleted_rows"] == 200
    assert night1["rows_embedded"] == night1["image_reads"] == 1000, "every image read once on night 1"
    # one file per partition: no unchanged neighbour is re-embedded
    assert night2["rows_embedded"] == night2["image_reads"] == 300
    assert night2["kept_rows"] == 600 and night2["retired_rows"] == 400 and night2["jobs_run"] == 2
    assert full["rows_embedded"] == full["image_reads"] == 900
    assert out["work_ok"] and out["tables_equal"] and out["max_embedding_diff"] <= 1e-5
    assert "night 2's table equals the full re-run's: yes" in done.stdout
