"""The partition's Datasink: a write task turns its blocks into part files, a storage hiccup into a retry."""

import pyarrow.parquet as pq
import pytest

from ray_jobs.job.datasink import EmbeddingDatasink
from ray_jobs.output.lease import Attempt
from tests.ray_jobs.output.test_commit import META, make_batch


class _Ctx:
    task_idx = 3


def _block(batch):
    import pyarrow as pa
    from ray.data._internal.tensor_extensions.arrow import ArrowTensorArray

    cols = {k: v for k, v in batch.items() if not k.endswith("_embedding")}
    table = pa.table({k: pa.array(list(v)) for k, v in cols.items()})
    for k in ("text_embedding", "image_embedding"):
        table = table.append_column(k, ArrowTensorArray.from_numpy(batch[k]))
    return table


def test_a_write_task_turns_blocks_into_files_and_a_storage_hiccup_into_a_retry(tmp_path, monkeypatch):
    from ray_jobs.errors import TransientFailure

    part = str(tmp_path / "p")
    with Attempt(part) as attempt:
        sink = EmbeddingDatasink(
            attempt, rows_in=3, text_dim=4, image_dim=4, rows_per_file=10, row_group_rows=8192, commit_meta=META
        )
        assert sink.min_rows_per_write == 10
        result = sink.write(iter([_block(make_batch(["a", "b", "c"], ok=[True, True, False]))]), _Ctx())
        assert [f.path for f in result.files] == [f"attempt={attempt.id}/part-00003-000.parquet"]
        assert result.rows_seen == 3 and result.rejects_by_reason == {"missing object": 1}

        def flaky(*args, **kwargs):
            raise OSError(5, "connection reset while uploading")

        monkeypatch.setattr(pq.ParquetWriter, "write_table", flaky)
        with pytest.raises(TransientFailure, match="connection reset"):
            sink.write(iter([_block(make_batch(["d"]))]), _Ctx())
