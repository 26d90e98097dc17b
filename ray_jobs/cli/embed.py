"""``embed``: one partition (or a whole manifest) through the staged model.

Its settings options come from the declared groups (:mod:`ray_jobs.config.settings`): the
same declarations that give the trigger form its fields and the job its argv."""

from __future__ import annotations

import json
from dataclasses import asdict

from ray_jobs.config.declare import add_arguments, from_args
from ray_jobs.config.settings import JobSettings, StageSettings


def add_embed(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="embed one partition (or a whole manifest) with the staged twin-tower model",
        description="Embed rows with the twin-tower model split into pipeline stages, write embeddings and "
        "rejects, and commit the partition with _SUCCESS. A committed partition is skipped.",
    )
    src = p.add_argument_group("input (one of)")
    src.add_argument(
        "--manifest", help="Parquet manifest file, directory or s3:// prefix (whole manifest = one partition)"
    )
    src.add_argument("--plan", help="plan.json written by `plan`")
    src.add_argument("--partition", type=int, help="partition index in --plan")
    p.add_argument("--output", help="output root (local path, file:// or s3://); with --plan, the plan's")
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint directory or s3:// prefix: a Hugging Face CLIPModel, SiglipModel, ChineseCLIPModel or "
        "VisionTextDualEncoderModel saved with save_pretrained (tokenizer and image processor beside it), "
        "or a twin-tower checkpoint",
    )
    p.add_argument(
        "--model-id",
        help="the checkpoint's model id as computed once per run (python -m ray_jobs model-id); default: computed "
        "here from the checkpoint's metadata",
    )
    add_arguments(p.add_argument_group("stage layout"), StageSettings)
    add_arguments(p.add_argument_group("job"), JobSettings)
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument(
        "--force",
        action="store_true",
        help="re-embed even if the partition is committed: a new attempt, then the marker is swapped atomically "
        "(the old files stay, for snapshots that reference them)",
    )
    p.add_argument("--summary-json", help="also write the result as JSON to this local path")


def embed_config(args):
    """The job's :class:`~ray_jobs.job.config.EmbedConfig` from the parsed arguments."""
    from ray_jobs.job.config import EmbedConfig

    return EmbedConfig(
        output_uri=args.output,
        model_uri=args.model,
        manifest_uri=args.manifest,
        plan_uri=args.plan,
        partition=args.partition,
        stage=from_args(StageSettings, args),
        job=from_args(JobSettings, args),
        ray_address=args.ray_address,
        force=args.force,
        model_id=args.model_id,
    )


def run_embed(args) -> int:
    from ray_jobs.job.embed import run_embed as run

    result = run(embed_config(args))
    print(result.summary(), flush=True)
    if args.summary_json:
        with open(args.summary_json, "w") as fh:
            json.dump(asdict(result), fh, indent=2)
    return 0
