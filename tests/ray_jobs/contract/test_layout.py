import pytest

from ray_jobs.contract import layout


def test_layout_is_deterministic_and_zero_padded():
    d = layout.partition_dir("s3://b/out/", "tiny-abc", "p123", 7)
    assert d == "s3://b/out/embeddings/model=tiny-abc/plan=p123/partition=00007"
    assert layout.part_file_name(3) == "part-00003-000.parquet"
    assert layout.part_file_name(3, 12) == "part-00003-012.parquet"
    assert layout.rejects_file_name(7) == "rejects-00007.parquet"
    assert layout.attempt_dir_name("20261129T082300Z-1a2b3c4d") == "attempt=20261129T082300Z-1a2b3c4d"
    assert layout.new_attempt_id() != layout.new_attempt_id()
    with pytest.raises(ValueError):
        layout.attempt_dir_name("a/../b")
    assert layout.plan_uri("/o", "run1") == "/o/runs/run1/plan.json"
    with pytest.raises(ValueError):
        layout.partition_dir("/o", "m", "p", -1)
