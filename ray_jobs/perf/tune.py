"""``python -m ray_jobs tune``: a measured layer profile -> the balanced stage spec for K stages.

The output (``--json``) is what ``python -m ray_jobs capacity`` reads: per-stage rows/s of one
actor with the resources it was measured on.
"""

from __future__ import annotations

from typing import Any

from ray_jobs.perf.layer_profile import LayerProfile
from ray_jobs.perf.stage_balance import StageRate, balanced_split, pipeline_rate, spec_string

TUNE_FORMAT = "ray-jobs-tune/1"


def tune_result(profile: LayerProfile, num_stages: int) -> dict[str, Any]:
    """The balanced split of *profile*'s layers into *num_stages*, with predicted rates."""
    s = profile.settings
    gpus = 1.0 if s.device == "cuda" else 0.0
    split = balanced_split(profile.layer_costs(), num_stages)
    stages = [
        StageRate(f"stage{i + 1}", st.rows_per_s, float(s.threads), gpus, 1, st.layers) for i, st in enumerate(split)
    ]
    return {
        "format": TUNE_FORMAT,
        "model_uri": profile.model_uri,
        "model_id": profile.model_id,
        "embed_dim": profile.embed_dim,
        "device": s.device,
        "dtype": s.dtype,
        "batch_size": s.batch_size,
        "threads": s.threads,
        "batches": s.batches,
        "data": profile.data,
        "seconds_per_row": {
            "layers": {t: [round(c, 7) for c in v] for t, v in profile.layers.items()},
            "embed": {t: round(v, 7) for t, v in profile.embed.items()},
            "head": {t: round(v, 7) for t, v in profile.head.items()},
            "other": round(profile.other, 7),
            "whole_model": round(profile.seconds_per_row, 7),
        },
        "stages": [r.to_dict() for r in stages],
        "spec": spec_string(stages, [1] * len(stages)),
        "rows_per_s": round(pipeline_rate(stages, [1] * len(stages)), 3),
        "unsplit_rows_per_s": round(1.0 / profile.seconds_per_row, 3) if profile.seconds_per_row else None,
    }


def tune_lines(result: dict[str, Any]) -> list[str]:
    sec = result["seconds_per_row"]
    out = [
        f"tune: {result['model_id']} on {result['device']} ({result['dtype']}, batch {result['batch_size']}, "
        f"{result['threads']} thread(s), {result['batches']} timed batches)",
        f"data: {result.get('data', 'synthetic')}"
        + ("" if result.get("data", "synthetic") != "synthetic" else " (captions at the tokenizer's max length)"),
        "layer cost, ms per row (embedding on layer 0, head on the last):",
    ]
    for tower, costs in sec["layers"].items():
        out.append(
            f"  {tower:5s} embed={sec['embed'][tower] * 1e3:.3f} "
            + " ".join(f"{i}:{c * 1e3:.3f}" for i, c in enumerate(costs))
            + f" head={sec['head'][tower] * 1e3:.3f}"
        )
    out.append(f"  other (conversion, normalisation, pooling) {sec['other'] * 1e3:.3f}")
    for st in result["stages"]:
        out.append(f"{st['name']}: {st['layers']}  predicted {st['rows_per_s']:.1f} rows/s per actor")
    out.append(f"spec: --stages '{result['spec']}'")
    out.append(
        f"predicted pipeline: {result['rows_per_s']:.1f} rows/s with one actor per stage "
        f"(unsplit model on one actor: {result['unsplit_rows_per_s']:.1f} rows/s)"
    )
    return out
