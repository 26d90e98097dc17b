"""Reading commit markers: a partition is committed only while its marker and every listed file hold."""

import json
import os

from ray_jobs.contract.layout import SUCCESS_FILE
from ray_jobs.contract.marker import CommitMarker
from ray_jobs.output.markers import committed_marker
from tests.ray_jobs.output.test_commit import META, commit_batches, make_batch


def test_a_deleted_or_changed_file_uncommits(tmp_path):
    part = str(tmp_path / "p")
    marker = commit_batches(part, [[make_batch(["a", "b"])]], 2)
    with open(os.path.join(part, marker.files[0].path), "ab") as fh:
        fh.write(b"x")
    assert committed_marker(part, "m") is None
    os.remove(os.path.join(part, marker.files[0].path))
    assert committed_marker(part, "m") is None
    with open(os.path.join(part, SUCCESS_FILE), "w") as fh:
        fh.write("garbage")
    assert committed_marker(part, "m") is None


def test_version_1_markers_stay_readable():
    v1 = {
        "format": "multimodal-embeddings-commit/1",
        **META,
        "rows_in": 3,
        "rows_ok": 2,
        "rows_rejected": 1,
        "text_dim": 4,
        "image_dim": 4,
        "files": [{"path": "part-00000.parquet", "rows": 2, "bytes": 10}],
        "rejects": {"path": "rejects.parquet", "rows": 1, "bytes": 5},
    }
    marker = CommitMarker.from_json(json.dumps(v1))
    assert marker.reconciles() and marker.attempt == "" and [f.path for f in marker.rejects] == ["rejects.parquet"]
