"""Measured per-stage rates for ``capacity``, from whichever record holds them.

* a run report (``report.json``): its ``stage_balance`` (measured, or the recommended layout);
* a commit marker (``_SUCCESS``): its ``stage_stats``;
* ``python -m ray_jobs tune --json`` output: its balanced ``stages``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ray_jobs import storage
from ray_jobs.contract.marker import COMMIT_FORMAT, COMMIT_FORMAT_V1, CommitMarker
from ray_jobs.errors import UsageError
from ray_jobs.perf.stage_balance import StageRate, rates_from_stats
from ray_jobs.perf.tune import TUNE_FORMAT


@dataclass(frozen=True)
class MeasuredRates:
    source: str  # what kind of record: report, marker, tune
    rates: tuple[StageRate, ...]
    embed_dim: int | None = None


def rates_from_json(text: str, source: str, recommended: bool = False) -> MeasuredRates:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source}: not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a JSON object")
    fmt = data.get("format")
    if fmt == TUNE_FORMAT:
        return MeasuredRates(
            "tune", tuple(StageRate.from_dict(s) for s in data["stages"]), int(data.get("embed_dim") or 0) or None
        )
    if fmt in (COMMIT_FORMAT, COMMIT_FORMAT_V1):
        marker = CommitMarker.from_json(text, source)
        if not marker.stage_stats:
            raise UsageError(f"{source}: this commit marker has no stage_stats (written before they were recorded)")
        return MeasuredRates("marker", rates_from_stats(marker.stage_stats), marker.text_dim)
    if "stage_balance" in data and "partitions" in data:
        balance = data["stage_balance"] or {}
        if "measured" not in balance:
            why = balance.get("error", "its partitions' markers have no stage statistics")
            raise UsageError(f"{source}: the report has no stage balance ({why})")
        stages = balance["recommended"]["stages"] if recommended else balance["measured"]
        return MeasuredRates("report", tuple(StageRate.from_dict(s) for s in stages))
    raise UsageError(f"{source}: not a run report, commit marker or `tune --json` output")


def load_rates(uri: str, recommended: bool = False) -> MeasuredRates:
    """Read *uri* (local path or s3://) and return its stage rates."""
    try:
        text = storage.read_text(uri)
    except FileNotFoundError as exc:
        raise UsageError(f"--rates {uri}: not found") from exc
    return rates_from_json(text, uri, recommended)
