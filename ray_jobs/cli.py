"""``python -m ray_jobs``: the data plane's command line (DESIGN.md, "Parts").

A bad argument or bad input exits 2 with one line naming what to fix, before any Ray work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict

from ray_jobs.errors import AdmissionTimeout, JobInputError, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line instead of usage + error
        raise UsageError(f"{self.prog}: {message}")


def min_max(text: str) -> tuple[int, int]:
    """An argparse type for ``MIN-MAX`` (or ``N``): an actor pool's bounds."""
    lo, _, hi = text.partition("-")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX (for example 1-4), got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _add_embed(sub) -> None:
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
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="stage weights and hidden states between stages (float16 needs CUDA); embeddings are stored as float32",
    )
    p.add_argument(
        "--model-id",
        help="the checkpoint's model id as computed once per run (python -m ray_jobs model-id); default: computed "
        "here from the checkpoint's metadata",
    )
    layout = p.add_argument_group("stage layout")
    layout.add_argument("--num-stages", type=_positive_int, help="split the layers into K balanced stages (default 2)")
    layout.add_argument("--stages", help="explicit spec, e.g. 'text@gpus=1|image:0-5@gpus=1|image:6-11@gpus=1'")
    layout.add_argument("--stage-num-cpus", type=float, default=1.0, help="default CPUs per stage actor")
    layout.add_argument("--stage-num-gpus", type=float, default=0.0, help="default GPUs per stage actor (fractions ok)")
    layout.add_argument("--stage-pool", type=min_max, default=(1, 1), help="default actor pool size per stage, MIN-MAX")
    tune = p.add_argument_group("tuning")
    tune.add_argument("--batch-size", type=_positive_int, default=64)
    tune.add_argument("--preprocess-cpus", type=float, default=1.0, help="CPUs per preprocessing actor")
    tune.add_argument("--preprocess-pool", type=min_max, default=(1, 2), help="preprocessing actor pool, MIN-MAX")
    tune.add_argument("--fetch-threads", type=_positive_int, default=16, help="concurrent image fetches per actor")
    tune.add_argument(
        "--fetch-timeout",
        type=float,
        default=60.0,
        help="seconds one image fetch may take before its batch fails and is retried (never a reject)",
    )
    tune.add_argument(
        "--task-retries",
        type=int,
        default=4,
        help="retries of a batch that failed transiently (throttling, timeouts, out of memory) before the job fails",
    )
    tune.add_argument("--rows-per-file", type=_positive_int, default=100_000)
    tune.add_argument("--max-image-pixels", type=_positive_int, default=None)
    tune.add_argument("--max-object-bytes", type=_positive_int, default=None)
    adm = p.add_argument_group("admission (README: Concurrency)")
    adm.add_argument(
        "--admission",
        choices=("placement-group", "none"),
        default="placement-group",
        help="placement-group: reserve the whole minimum footprint (every pool's minimum actors + read/write "
        "tasks) atomically before the pipeline starts, so concurrent jobs queue instead of deadlocking; "
        "none: Ray Data's autoscaling pools, for a cluster that runs one job at a time",
    )
    adm.add_argument(
        "--admission-timeout-s",
        type=float,
        default=1800.0,
        help="fail (exit 3, naming the missing resources) if the footprint is not granted in time",
    )
    adm.add_argument("--task-cpus", type=float, default=0.75, help="CPUs reserved for read/write tasks")
    adm.add_argument(
        "--driver-cpus",
        type=float,
        default=0.25,
        help="CPUs the submitter gives the driver (entrypoint_num_cpus); counted in the footprint",
    )
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument(
        "--force",
        action="store_true",
        help="re-embed even if the partition is committed: a new attempt, then the marker is swapped atomically "
        "(the old files stay, for snapshots that reference them)",
    )
    p.add_argument("--summary-json", help="also write the result as JSON to this local path")


def _add_demo_assets(sub) -> None:
    p = sub.add_parser(
        "demo-assets",
        help="write a tiny seeded checkpoint, demo images (some broken) and a manifest",
        description="Write DIR/model (tiny ALBERT+ViT twin tower in Hugging Face format), DIR/images and "
        "DIR/manifest. DIR may be an s3:// prefix.",
    )
    p.add_argument("--out", required=True, help="output directory or s3:// prefix")
    p.add_argument("--rows", type=_positive_int, default=200)
    p.add_argument("--bad-images", type=int, default=6, help="how many rows get a broken image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--files", type=_positive_int, default=2, help="number of manifest Parquet files")


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="split a manifest into balanced partitions of row groups (reads Parquet footers only)",
        description="Read every manifest file's footer (never a data page), check the schema, pack row groups "
        "into balanced partitions and write {output}/runs/{run_id}/plan.json. Same manifest + settings = same plan.",
    )
    p.add_argument("--manifest", required=True, help="Parquet file, directory or s3:// prefix")
    p.add_argument("--output", required=True, help="output root; the plan goes to {output}/runs/{run_id}/plan.json")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--partition-rows", type=_positive_int, help="target rows per partition (default 1000000)")
    size.add_argument("--partition-bytes", type=_positive_int, help="target image bytes per partition")
    p.add_argument(
        "--max-partitions",
        type=_positive_int,
        default=1024,
        help="upper bound on partitions (Airflow's max_map_length); partitions grow to fit",
    )
    p.add_argument(
        "--avg-image-bytes",
        type=_positive_int,
        default=256 * 1024,
        help="image bytes assumed per row when the footer has no image_bytes hint",
    )
    p.add_argument("--run-id", help="run id (default: plan-{plan_id})")
    p.add_argument("--model", help="model URI to record in the plan (validate uses it)")
    p.add_argument("--force", action="store_true", help="replace a different plan already written for this run id")
    p.add_argument("--summary-json", help="also write the result as JSON to this local path")


def _add_validate(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="check that every partition of a plan is committed, reconciled and intact",
        description="Check every partition of the plan: _SUCCESS present, counts reconcile with the plan, "
        "embedding dims as recorded, listed files present with their sizes. Exits 1 if anything is wrong.",
    )
    p.add_argument("--plan", required=True, help="plan.json written by `plan`")
    p.add_argument("--model", help="model whose outputs to check (default: the plan's, or the only one present)")
    p.add_argument("--max-reject-rate", type=float, default=1.0, help="fail if rejected/rows_in exceeds this")
    p.add_argument("--summary-json", help="also write the report as JSON to this local path")
    p.add_argument(
        "--report", action="store_true", help="also write the run report (report.json, report.md) next to the plan"
    )
    p.add_argument(
        "--catalog-uri",
        help="with --report: register the committed files in this Iceberg catalog "
        "(SQLAlchemy URL, e.g. sqlite:////path/catalog.db) when validation passes",
    )
    p.add_argument(
        "--dataset",
        help="with --catalog-uri: the dataset whose table embeddings.<dataset>__<model_id> gets the files "
        "(default: derived from the plan's manifest URI)",
    )


def _add_model_id(sub) -> None:
    p = sub.add_parser(
        "model-id",
        help="print a checkpoint's model id, format and embedding size (reads metadata only, never weights)",
        description="Open the checkpoint (any supported format), check it, and print its model id: the name plus a "
        "hash of its configs, tokenizer and processor files, safetensors headers, sizes and (on S3) ETags.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory or s3:// prefix")
    p.add_argument("--summary-json", help="also write the result as JSON to this local path")


def _add_summary(sub) -> None:
    p = sub.add_parser(
        "summary",
        help="print the newest run report under an output root",
        description="Print the summary of the newest run report ({output}/runs/*/report.json) and where things are.",
    )
    p.add_argument("--output", required=True, help="output root given to plan/the DAG")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _add_tune(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="time each layer of each tower on this machine and print the balanced stage spec for K stages",
        description="Open the checkpoint as a stage actor does, time every layer (embedding on layer 0, head on "
        "the last) over a few batches after warm-up, and split the layers into K contiguous stages minimising "
        "the slowest (exact). Prints the --stages spec and predicted rows/s per stage.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory or s3:// prefix")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--stages", type=_positive_int, default=2, help="number of pipeline stages K")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads (a stage actor uses its cpus)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    p.add_argument("--batches", type=_positive_int, default=5, help="timed batches")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON (what `capacity` reads)")


def _add_capacity(sub) -> None:
    p = sub.add_parser(
        "capacity",
        help="from measured stage rates and a dataset size: nodes, GPUs/CPUs per stage, partitions, wall time, cost",
        description="Size a run from measured per-stage rates (a run report.json, a commit marker _SUCCESS, or "
        "`tune --json` output): one partition job per node with its pools balanced for the node, the fewest "
        "nodes whose waves of partitions fit the window, and the object-store requests it makes.",
    )
    p.add_argument("--rates", required=True, help="report.json, _SUCCESS or tune --json output (path or s3://)")
    p.add_argument(
        "--recommended", action="store_true", help="with a report: use its recommended layout, not the measured one"
    )
    p.add_argument(
        "--preprocess-rows-per-s",
        type=_positive_float,
        help="rows/s of one preprocessing actor (1 CPU); needed with tune output, overrides a measured one",
    )
    size = p.add_argument_group("dataset (--rows with --bytes or --avg-image-bytes, or --manifest)")
    size.add_argument("--rows", type=_positive_int)
    size.add_argument("--bytes", type=_positive_int, help="total image bytes")
    size.add_argument("--manifest", help="read rows (and image_bytes hints) from the manifest's footers")
    size.add_argument("--avg-image-bytes", type=_positive_int, default=256 * 1024, help="where bytes are unknown")
    hw = p.add_argument_group("hardware and window")
    hw.add_argument("--window-h", type=_positive_float, default=8.0, help="hours the run may take")
    hw.add_argument("--gpus-per-node", type=int, default=8)
    hw.add_argument("--cpus-per-node", type=_positive_float, default=96.0)
    hw.add_argument("--reserved-cpus", type=float, default=2.0, help="per node, for the driver and read/write tasks")
    hw.add_argument("--startup-s", type=float, default=60.0, help="start-up per partition job before its first batch")
    hw.add_argument("--partition-rows", type=_positive_int, default=1_000_000)
    hw.add_argument("--max-partitions", type=_positive_int, default=1024)
    hw.add_argument("--rows-per-file", type=_positive_int, default=100_000)
    hw.add_argument("--embed-dim", type=_positive_int, help="default: from the rates' record, else 512")
    price = p.add_argument_group("prices (USD)")
    price.add_argument("--gpu-hour", type=float, default=2.50)
    price.add_argument("--cpu-hour", type=float, default=0.04)
    price.add_argument("--get-per-1k", type=float, default=0.0004)
    price.add_argument("--put-per-1k", type=float, default=0.005)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m ray_jobs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_plan(sub)
    _add_embed(sub)
    _add_validate(sub)
    _add_demo_assets(sub)
    _add_summary(sub)
    _add_model_id(sub)
    _add_tune(sub)
    _add_capacity(sub)
    return parser


def _cmd_embed(args) -> int:
    from ray_jobs.job.embed import EmbedConfig, run_embed
    from ray_jobs.job.preprocess import DEFAULT_MAX_OBJECT_BYTES, DEFAULT_MAX_PIXELS, ImageLimits
    from ray_jobs.model.stage_spec import StageResources

    cfg = EmbedConfig(
        output_uri=args.output,
        model_uri=args.model,
        manifest_uri=args.manifest,
        plan_uri=args.plan,
        partition=args.partition,
        num_stages=args.num_stages if (args.num_stages or args.stages) else 2,
        stages=args.stages,
        stage_defaults=StageResources(args.stage_num_cpus, args.stage_num_gpus, *args.stage_pool),
        batch_size=args.batch_size,
        preprocess_cpus=args.preprocess_cpus,
        preprocess_pool=args.preprocess_pool,
        fetch_threads=args.fetch_threads,
        fetch_timeout_s=args.fetch_timeout,
        task_retries=args.task_retries,
        rows_per_file=args.rows_per_file,
        limits=ImageLimits(
            args.max_image_pixels or DEFAULT_MAX_PIXELS, args.max_object_bytes or DEFAULT_MAX_OBJECT_BYTES
        ),
        ray_address=args.ray_address,
        force=args.force,
        admission=args.admission,
        admission_timeout_s=args.admission_timeout_s,
        task_cpus=args.task_cpus,
        driver_cpus=args.driver_cpus,
        dtype=args.dtype,
        model_id=args.model_id,
    )
    result = run_embed(cfg)
    print(result.summary(), flush=True)
    if args.summary_json:
        with open(args.summary_json, "w") as fh:
            json.dump(asdict(result), fh, indent=2)
    return 0


def _cmd_demo_assets(args) -> int:
    from ray_jobs.demo.assets import write_demo_assets

    assets = write_demo_assets(args.out, rows=args.rows, bad_images=args.bad_images, seed=args.seed, files=args.files)
    broken = ", ".join(f"{k}={v}" for k, v in sorted(assets.broken.items())) or "none"
    print(
        f"demo-assets: rows={assets.rows} broken=({broken}) model={assets.model} manifest={assets.manifest}",
        flush=True,
    )
    return 0


def _cmd_plan(args) -> int:
    from ray_jobs.planning.plan import PlanSettings, run_plan

    settings = PlanSettings(args.partition_rows, args.partition_bytes, args.max_partitions, args.avg_image_bytes)
    result = run_plan(args.manifest, args.output, settings, run_id=args.run_id, model_uri=args.model, force=args.force)
    print(result.summary(), flush=True)
    if args.summary_json:
        p = result.plan
        with open(args.summary_json, "w") as fh:
            json.dump(
                {
                    "plan_uri": result.uri,
                    "plan_id": p.plan_id,
                    "run_id": p.run_id,
                    "rows": p.rows,
                    "partitions": [x.index for x in p.partitions],
                    "seconds": result.seconds,
                },
                fh,
                indent=2,
            )
    return 0


def _cmd_validate(args) -> int:
    from ray_jobs.output.validate import resolve_model_id, validate_plan
    from ray_jobs.planning.plan import load_plan

    if not 0 <= args.max_reject_rate <= 1:
        raise UsageError(f"--max-reject-rate must be between 0 and 1, got {args.max_reject_rate}")
    plan = load_plan(args.plan)
    model_id, dim = resolve_model_id(plan, args.model)
    report = validate_plan(plan, model_id, dim, args.max_reject_rate)
    print(report.table(), flush=True)
    for problem in report.problems():
        print(f"validate: {problem}", file=sys.stderr, flush=True)
    if args.summary_json:
        with open(args.summary_json, "w") as fh:
            json.dump(asdict(report) | {"ok": report.ok, "problems": report.problems()}, fh, indent=2)
    if args.report:
        from ray_jobs.output.report import build_report, write_report

        catalog = None
        if args.catalog_uri and report.ok:
            from ray_jobs.output.catalog import register_plan

            result = register_plan(plan, model_id, args.catalog_uri, run_id=plan.run_id, dataset=args.dataset)
            print(result.summary(), flush=True)
            catalog = {"table": result.table, "snapshot_id": result.snapshot_id}
        run_report = build_report(plan, report, catalog=catalog)
        _, md_uri = write_report(run_report)
        print(f"report: {run_report.summary()} -> {md_uri}", flush=True)
    return 0 if report.ok else 1


def _cmd_model_id(args) -> int:
    from ray_jobs.model.checkpoint import describe_checkpoint

    info = describe_checkpoint(args.model)
    print(
        f"model-id: {info['model_id']} format={info['format']} embed_dim={info['embed_dim']} "
        f"layers=text:{info['layers']['text']},image:{info['layers']['image']}",
        flush=True,
    )
    if args.summary_json:
        with open(args.summary_json, "w") as fh:
            json.dump(info, fh, indent=2)
    return 0


def _cmd_summary(args) -> int:
    from ray_jobs import storage
    from ray_jobs.contract import join_uri
    from ray_jobs.errors import OutputError

    fs, root = storage.filesystem_for(join_uri(args.output, "runs"))
    reports = []
    for path in fs.glob(f"{root}/*/report.json"):
        reports.append((fs.info(path).get("mtime") or fs.info(path).get("LastModified") or 0, path))
    if not reports:
        raise OutputError(f"no run report under {args.output}/runs/; has a run finished?")
    _, newest = max(reports, key=lambda r: (str(r[0]), r[1]))
    with fs.open(newest, "rb") as fh:
        data = json.loads(fh.read())
    parts = data["partitions"]
    print(f"run:        {data['run_id']}")
    print(f"result:     {data['summary']}")
    print(f"partitions: {len(parts)} ({sum(1 for p in parts if p['status'] == 'ok')} ok)")
    print(
        f"rows:       in={data['rows_in']} ok={data['rows_ok']} rejected={data['rows_rejected']}"
        + (f" rows/s={data['rows_per_s']:.1f}" if data.get("rows_per_s") else "")
    )
    if data.get("rejects_by_reason"):
        print("rejects:    " + ", ".join(f"{k}={v}" for k, v in data["rejects_by_reason"].items()))
    if data.get("startup_median"):
        from ray_jobs.output.report import STARTUP_LABELS

        medians = data["startup_median"]
        figures = ", ".join(f"{label} {medians[k]:.1f}s" for k, label in STARTUP_LABELS.items() if k in medians)
        print(f"start-up:   median per partition: {figures}")
    if data.get("catalog"):
        print(
            f"iceberg:    table {data['catalog']['table']} snapshot {data['catalog']['snapshot_id']}"
            + (f" ({data['catalog']['catalog_uri']})" if data["catalog"].get("catalog_uri") else "")
        )
    slot = join_uri(data["output_uri"], "embeddings", "model=" + data["model_id"], "plan=" + data["plan_id"])
    print(f"embeddings: {slot}")
    print(f"report:     {storage.to_uri(fs, newest).removesuffix('.json')}.md")
    return 0


def _cmd_tune(args) -> int:
    from ray_jobs.perf.layer_profile import ProfileSettings, profile_layers
    from ray_jobs.perf.tune import tune_lines, tune_result

    settings = ProfileSettings(
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        warmup=args.warmup,
        batches=args.batches,
        threads=args.threads,
    )
    result = tune_result(profile_layers(args.model, settings), args.stages)
    print(json.dumps(result, indent=2) if args.json else "\n".join(tune_lines(result)), flush=True)
    return 0


def _dataset_size(args):
    from ray_jobs.perf.capacity_model import DatasetSize

    if args.manifest:
        if args.rows or args.bytes:
            raise UsageError("give --manifest or --rows/--bytes, not both")
        from ray_jobs.planning.manifest import read_manifest

        files = read_manifest(args.manifest)
        rows = sum(f.rows for f in files)
        known = [(n, b) for f in files for n, b in zip(f.row_group_rows, f.row_group_bytes or (), strict=False)]
        hinted_rows = sum(n for n, b in known if b is not None)
        image_bytes = sum(b for _, b in known if b is not None) + (rows - hinted_rows) * args.avg_image_bytes
        return DatasetSize(rows, image_bytes)
    if not args.rows:
        raise UsageError("give --rows (with --bytes or --avg-image-bytes) or --manifest")
    return DatasetSize(args.rows, args.bytes or args.rows * args.avg_image_bytes)


def _cmd_capacity(args) -> int:
    from dataclasses import replace

    from ray_jobs.perf.capacity_model import Hardware, Prices, RunShape, plan_capacity
    from ray_jobs.perf.rate_sources import load_rates
    from ray_jobs.perf.stage_balance import StageRate

    measured = load_rates(args.rates, recommended=args.recommended)
    rates = list(measured.rates)
    notes = []
    if args.preprocess_rows_per_s:
        pre = StageRate("preprocess", args.preprocess_rows_per_s, 1.0, 0.0)
        rates = [pre, *(r for r in rates if r.name != "preprocess")]
    elif not any(r.name == "preprocess" for r in rates):
        notes.append("note: no preprocessing rate (tune measures the model only): give --preprocess-rows-per-s")
    rates = [replace(r, actors=1) for r in rates]
    plan = plan_capacity(
        rates,
        _dataset_size(args),
        Hardware(args.cpus_per_node, args.gpus_per_node, args.reserved_cpus),
        RunShape(
            window_h=args.window_h,
            partition_rows=args.partition_rows,
            max_partitions=args.max_partitions,
            startup_s=args.startup_s,
            rows_per_file=args.rows_per_file,
            embed_dim=args.embed_dim or measured.embed_dim or 512,
        ),
        Prices(args.gpu_hour, args.cpu_hour, args.get_per_1k, args.put_per_1k),
    )
    if args.json:
        print(json.dumps({"rates_source": measured.source, **plan.to_dict(), "notes": notes}, indent=2), flush=True)
    else:
        print("\n".join([f"rates: {measured.source} {args.rates}", *plan.lines(), *notes]), flush=True)
    return 0


COMMANDS = {
    "plan": _cmd_plan,
    "embed": _cmd_embed,
    "validate": _cmd_validate,
    "demo-assets": _cmd_demo_assets,
    "summary": _cmd_summary,
    "model-id": _cmd_model_id,
    "tune": _cmd_tune,
    "capacity": _cmd_capacity,
}


def main(argv: list[str] | None = None) -> int:
    for key, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ray_was_connected = _ray_connected()
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except JobInputError as exc:
        _fail(exc, ray_was_connected)
        return 2
    except AdmissionTimeout as exc:
        _fail(exc, ray_was_connected)
        return 3


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")  # never imported here: `plan` and bad arguments stay Ray-free
    return ray is not None and ray.is_initialized()


def _fail(exc: Exception, ray_was_connected: bool) -> None:
    """Print *exc* as the command's last line. A driver connected to Ray prints the cluster's
    log lines and autoscaler events from a thread (an unschedulable request shows up seconds
    later as "(autoscaler +3s) Error: ..."), which could land after the error: a connection
    this command made is shut down first, which stops and joins that thread. A connection the
    caller made before calling :func:`main` in-process is left alone."""
    if not ray_was_connected and _ray_connected():
        sys.modules["ray"].shutdown()
    print(f"error: {exc}", file=sys.stderr, flush=True)
