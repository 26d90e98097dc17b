"""Ids that appear in more than one manifest row: the same id twice in one file, or in two files.

A table keyed by id must hold each id once, so ``validate`` fails on a duplicate and names
the files it is in. Only the ``id`` column of the planned row groups is read (no image
column, no other column); the ids and a file index per row are held while they are counted,
about 40 bytes a row (10^8 rows: ~4 GB on the validating worker).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_jobs import storage
from ray_jobs.contract.plan import Plan

#: Examples named in a problem; the count says how many there are in all.
_EXAMPLES = 5


def _ids(plan: Plan, file_index: int, row_groups: list[int]) -> pa.Table:
    f = plan.files[file_index]
    fs, path = storage.filesystem_for(f.uri)
    with fs.open(path, "rb") as fh:
        ids = pq.ParquetFile(fh).read_row_groups(row_groups, columns=["id"]).column("id")
    return pa.table({"id": ids.cast(pa.string()), "file": pa.array([file_index] * len(ids), pa.int32())})


def duplicate_ids(plan: Plan, threads: int = 16) -> list[str]:
    """One line per duplicate found (up to a few examples, then a count); empty when every
    planned row has its own id."""
    groups: dict[int, set[int]] = {}
    for p in plan.partitions:
        for fr in p.fragments:
            groups.setdefault(fr.file, set()).update(fr.row_groups)
    if not groups:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(groups)))) as pool:
        tables = list(pool.map(lambda kv: _ids(plan, kv[0], sorted(kv[1])), sorted(groups.items())))
    table = pa.concat_tables(tables)
    counted = table.group_by("id").aggregate([("file", "count"), ("file", "min"), ("file", "max")])
    dup = counted.filter(pc.greater(counted["file_count"], 1))
    if not dup.num_rows:
        return []
    lines = []
    for row in dup.slice(0, _EXAMPLES).to_pylist():
        first, last = plan.files[row["file_min"]].uri, plan.files[row["file_max"]].uri
        where = f"{row['file_count']} times in {first}" if first == last else f"in {first} and in {last}"
        lines.append(f"duplicate id {row['id']!r}: {where}")
    if dup.num_rows > _EXAMPLES:
        lines.append(f"{dup.num_rows} ids appear more than once in the manifest in all; each id must be unique")
    return lines
