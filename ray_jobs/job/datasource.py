"""A Ray Data datasource that reads exactly the named row groups of Parquet files.

A partition of a plan is a list of (file, row groups); reading only those row groups is what
keeps a partition job from touching the rest of the manifest. Blocks come out one row group
at a time, in the listed order, with the contract's columns cast to ``string`` so files
written as ``large_string`` mix with the rest.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from ray_jobs import storage

COLUMNS = ("id", "text", "image_uri")


@dataclass(frozen=True)
class FragmentRef:
    uri: str
    row_groups: tuple[int, ...]
    rows: int


def read_fragment(ref: FragmentRef, columns: Sequence[str] = COLUMNS) -> Iterator[pa.Table]:
    fs, path = storage.filesystem_for(ref.uri)
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        for rg in ref.row_groups:
            table = pf.read_row_group(rg, columns=list(columns))
            yield table.cast(pa.schema([(c, pa.string()) for c in columns]))


def _read_task_fn(ref: FragmentRef, columns: tuple[str, ...]) -> Iterator[pa.Table]:
    yield from read_fragment(ref, columns)


def make_datasource(refs: Sequence[FragmentRef], columns: Sequence[str] = COLUMNS):
    """Build the datasource lazily so importing this module does not import Ray."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class RowGroupDatasource(Datasource):
        def __init__(self):
            super().__init__()
            self.refs = list(refs)
            self.columns = tuple(columns)

        def estimate_inmemory_data_size(self):
            return None

        def get_name(self) -> str:
            return "ReadRowGroups"

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [
                ReadTask(
                    functools.partial(_read_task_fn, ref, self.columns),
                    BlockMetadata(num_rows=ref.rows, size_bytes=None, input_files=(ref.uri,), exec_stats=None),
                )
                for ref in self.refs
            ]

    return RowGroupDatasource()
