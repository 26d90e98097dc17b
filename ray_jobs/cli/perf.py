"""``model-id``, ``tune`` and ``capacity``: what a checkpoint is, what its layers cost, what a run needs."""

from __future__ import annotations

import json

from ray_jobs.cli.args import positive_float, positive_int
from ray_jobs.config.settings import DTYPES
from ray_jobs.errors import UsageError


def add_model_id(sub) -> None:
    p = sub.add_parser(
        "model-id",
        help="print a checkpoint's model id, format and embedding size (reads metadata only, never weights)",
        description="Open the checkpoint (any supported format), check it, and print its model id: the name plus a "
        "hash of its configs, tokenizer and processor files, safetensors headers, sizes and (on S3) ETags.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory or s3:// prefix")
    p.add_argument("--summary-json", help="also write the result as JSON to this local path")


def add_tune(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="time each layer of each tower on this machine and print the balanced stage spec for K stages",
        description="Open the checkpoint as a stage actor does, time every layer (embedding on layer 0, head on "
        "the last) over a few batches after warm-up, and split the layers into K contiguous stages minimising "
        "the slowest (exact). Prints the --stages spec and predicted rows/s per stage.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory or s3:// prefix")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--stages", type=positive_int, default=2, help="number of pipeline stages K")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (a stage actor uses its cpus)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    p.add_argument("--batches", type=positive_int, default=5, help="timed batches")
    p.add_argument(
        "--manifest",
        help="time the layers on rows sampled from this manifest (its captions and images; the sample the "
        "auto layout is balanced on), not on synthetic captions at the tokenizer's max length",
    )
    p.add_argument("--sample-rows", type=positive_int, default=32, help="rows sampled from --manifest")
    p.add_argument("--seed", type=int, default=0, help="seed of the --manifest sample")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON (what `capacity` reads)")


def add_capacity(sub) -> None:
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
        type=positive_float,
        help="rows/s of one preprocessing actor (1 CPU); needed with tune output, overrides a measured one",
    )
    size = p.add_argument_group("dataset (--rows with --bytes or --avg-image-bytes, or --manifest)")
    size.add_argument("--rows", type=positive_int)
    size.add_argument("--bytes", type=positive_int, help="total image bytes")
    size.add_argument("--manifest", help="read rows (and image_bytes hints) from the manifest's footers")
    size.add_argument("--avg-image-bytes", type=positive_int, default=256 * 1024, help="where bytes are unknown")
    hw = p.add_argument_group("hardware and window")
    hw.add_argument("--window-h", type=positive_float, default=8.0, help="hours the run may take")
    hw.add_argument("--gpus-per-node", type=int, default=8)
    hw.add_argument("--cpus-per-node", type=positive_float, default=96.0)
    hw.add_argument("--reserved-cpus", type=float, default=2.0, help="per node, for the driver and read/write tasks")
    hw.add_argument("--startup-s", type=float, default=60.0, help="start-up per partition job before its first batch")
    hw.add_argument("--partition-rows", type=positive_int, default=1_000_000)
    hw.add_argument("--max-partitions", type=positive_int, default=1024)
    hw.add_argument("--rows-per-file", type=positive_int, default=100_000)
    hw.add_argument("--embed-dim", type=positive_int, help="default: from the rates' record, else 512")
    nightly = p.add_argument_group("nightly runs (work keyed by content: only changed manifest files are embedded)")
    nightly.add_argument(
        "--daily-change",
        type=float,
        help="fraction of the rows that change per day (e.g. 0.02): also print the nightly run beside the full run",
    )
    nightly.add_argument(
        "--manifest-file-rows",
        type=positive_int,
        help="rows per manifest file (default: the manifest's mean with --manifest, else --partition-rows)",
    )
    add_price_flags(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def add_price_flags(p) -> None:
    """The prices ``capacity`` sizes a run with and a run report costs it with."""
    price = p.add_argument_group("prices (USD)")
    price.add_argument("--gpu-hour", type=float, default=2.50)
    price.add_argument("--cpu-hour", type=float, default=0.04)
    price.add_argument("--get-per-1k", type=float, default=0.0004)
    price.add_argument("--put-per-1k", type=float, default=0.005)


def prices_of(args):
    from ray_jobs.perf.capacity_model import Prices

    return Prices(args.gpu_hour, args.cpu_hour, args.get_per_1k, args.put_per_1k)


def run_model_id(args) -> int:
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


def run_tune(args) -> int:
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
    sample = None
    if args.manifest:
        from ray_jobs.perf.data_sample import manifest_fragments, sample_rows
        from ray_jobs.planning.manifest import read_manifest

        sample = sample_rows(manifest_fragments(read_manifest(args.manifest)), args.sample_rows, args.seed)
        if not sample.rows:
            raise UsageError(f"--manifest {args.manifest} has no rows to sample")
    result = tune_result(profile_layers(args.model, settings, sample), args.stages)
    print(json.dumps(result, indent=2) if args.json else "\n".join(tune_lines(result)), flush=True)
    return 0


def dataset_size(args):
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


def run_capacity(args) -> int:
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
        dataset_size(args),
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
    nightly_out, nightly_text = {}, []
    if args.daily_change is not None:
        from ray_jobs.perf.capacity_model import nightly_lines, plan_nightly

        file_rows = _manifest_file_rows(args)
        fraction, nightly = plan_nightly(
            rates, plan.dataset, args.daily_change, file_rows, plan.hardware, plan.run, plan.prices
        )
        nightly_out = {
            "nightly": {
                "daily_change": args.daily_change,
                "manifest_file_rows": file_rows,
                "work_fraction": round(fraction, 6),
                **nightly.to_dict(),
            }
        }
        nightly_text = nightly_lines(plan, nightly, args.daily_change, file_rows, fraction)
    if args.json:
        out = {"rates_source": measured.source, **plan.to_dict(), **nightly_out, "notes": notes}
        print(json.dumps(out, indent=2), flush=True)
    else:
        print("\n".join([f"rates: {measured.source} {args.rates}", *plan.lines(), *nightly_text, *notes]), flush=True)
    return 0


def _manifest_file_rows(args) -> int:
    """Rows per manifest file for the nightly model: --manifest-file-rows, else the
    manifest's mean, else one partition's worth."""
    if args.manifest_file_rows:
        return args.manifest_file_rows
    if args.manifest:
        from ray_jobs.planning.manifest import read_manifest

        files = [f for f in read_manifest(args.manifest) if f.rows]
        if files:
            return max(1, round(sum(f.rows for f in files) / len(files)))
    return args.partition_rows
