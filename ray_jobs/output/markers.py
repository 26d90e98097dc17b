"""Reading a partition's commit marker and deciding whether the partition is committed.

A partition is committed when its ``_SUCCESS`` marker parses, reconciles, names what the
caller expects and every file it lists is in storage with the recorded size
(:func:`ray_jobs.contract.marker.marker_problems` judges).
"""

from __future__ import annotations

import logging
import posixpath

from ray_jobs import storage
from ray_jobs.contract.layout import SUCCESS_FILE, join_uri
from ray_jobs.contract.marker import CommitMarker, marker_problems
from ray_jobs.contract.plan import Plan
from ray_jobs.errors import OutputError

log = logging.getLogger(__name__)


def read_marker(partition_uri: str) -> CommitMarker | None:
    uri = join_uri(partition_uri, SUCCESS_FILE)
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        return None
    return CommitMarker.from_json(text, uri)


def read_marker_or_refuse(partition_uri: str) -> CommitMarker | None:
    """The marker for a writer: an unreadable one stops it (it may list files that must stay)."""
    try:
        return read_marker(partition_uri)
    except OutputError as exc:
        raise OutputError(
            f"{exc}; not replacing a marker this version cannot read (the files it lists must stay): "
            "inspect it, and remove it to re-embed the partition"
        ) from exc


def listed_sizes(partition_uri: str, marker: CommitMarker) -> dict[str, int]:
    """Sizes in storage of the files *marker* lists (one listing per directory they are in)."""
    fs, path = storage.filesystem_for(partition_uri)
    out: dict[str, int] = {}
    for parent in sorted({posixpath.dirname(f.path) for f in marker.listed}):
        where = f"{path}/{parent}" if parent else path
        storage.invalidate(fs, where)
        try:
            entries = fs.ls(where, detail=True)
        except FileNotFoundError:
            continue
        for e in entries:
            if e["type"] == "file":
                out[posixpath.join(parent, e["name"].rstrip("/").rsplit("/", 1)[-1])] = e["size"]
    return out


def check_commit(partition_uri: str, **expect) -> tuple[CommitMarker | None, list[str]]:
    """The partition's marker and why it cannot be trusted (no problems: it is committed).

    *expect* goes to :func:`ray_jobs.contract.marker.marker_problems` (model_id, plan_id, partition,
    rows_planned, embed_dim)."""
    try:
        marker = read_marker(partition_uri)
    except OutputError as exc:
        return None, [str(exc)]
    if marker is None:
        return None, [f"missing: no {SUCCESS_FILE}"]
    return marker, marker_problems(marker, listed_sizes(partition_uri, marker), **expect)


def committed_marker(partition_uri: str, model_id: str, **expect) -> CommitMarker | None:
    """The marker if the partition is committed, reconciles, names *expect* (work_key,
    output_key, ...) and all its files are intact."""
    marker, problems = check_commit(partition_uri, model_id=model_id, **expect)
    if problems:
        if marker is not None or not problems[0].startswith("missing:"):
            log.warning("partition %s is not validly committed (%s); it will be redone", partition_uri, problems[0])
        return None
    return marker


def check_planned(
    plan: Plan, index: int, model_id: str, output_key: str, embed_dim: int | None = None
) -> tuple[str, CommitMarker | None, list[str]]:
    """Where partition *index* of *plan* is committed, its marker, and why it cannot be
    trusted: by content key and output identity for a keyed plan (the work may have been
    committed by an earlier night's plan), by plan id and index for a format 1 plan."""
    planned = plan.partition(index)
    uri = plan.work_uri(index, model_id, output_key)
    if plan.keyed:
        expect = {"work_key": planned.key, "output_key": output_key}
    else:
        expect = {"plan_id": plan.plan_id, "partition": index}
    marker, problems = check_commit(uri, model_id=model_id, rows_planned=planned.rows, embed_dim=embed_dim, **expect)
    return uri, marker, problems
