"""``demo-assets``, ``plan``, ``validate`` and ``summary``: the commands around a run's data."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from ray_jobs.cli.args import positive_int
from ray_jobs.cli.perf import add_price_flags, prices_of
from ray_jobs.config.declare import add_arguments, from_args
from ray_jobs.config.settings import Acceptance, Partitioning, Sources


def add_demo_assets(sub) -> None:
    p = sub.add_parser(
        "demo-assets",
        help="write a tiny seeded checkpoint, demo images (some broken) and a manifest",
        description="Write DIR/model (tiny ALBERT+ViT twin tower in Hugging Face format), DIR/images and "
        "DIR/manifest. DIR may be an s3:// prefix.",
    )
    p.add_argument("--out", required=True, help="output directory or s3:// prefix")
    p.add_argument("--rows", type=positive_int, default=200)
    p.add_argument("--bad-images", type=int, default=6, help="how many rows get a broken image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--files", type=positive_int, default=2, help="number of manifest Parquet files")


def add_demo_night(sub) -> None:
    p = sub.add_parser(
        "demo-night",
        help="change a local demo manifest as a night upstream would: new rows in a new file, a file deleted",
        description="Append a Parquet file of new rows (new ids, new images) to DIR/manifest and delete its last "
        "files, so the next run shows what an incremental night embeds, keeps and removes.",
    )
    p.add_argument("--out", required=True, help="the demo directory demo-assets wrote (local)")
    p.add_argument("--add-rows", type=positive_int, default=200)
    p.add_argument("--drop-files", type=int, default=1, help="how many of the manifest's last files to delete")
    p.add_argument("--seed", type=int, default=1)


def add_plan(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="split a manifest into balanced partitions of row groups (reads Parquet footers only)",
        description="Read every manifest file's footer (never a data page), check the schema, pack row groups "
        "into balanced partitions and write {output}/runs/{run_id}/plan.json. The plan continues the dataset's "
        "last plan in this output root: partitions whose files are unchanged are kept (their committed work is "
        "reused), new and rewritten row groups go into new partitions, and vanished work is listed as retired.",
    )
    p.add_argument(
        "--manifest", required=True, help="Parquet file, directory or s3:// prefix, or iceberg://<namespace>.<table>"
    )
    add_arguments(p, Sources)
    p.add_argument("--output", required=True, help="output root; the plan goes to {output}/runs/{run_id}/plan.json")
    add_arguments(p.add_argument_group("partitioning"), Partitioning)
    p.add_argument("--run-id", help="run id (default: plan-{plan_id})")
    p.add_argument("--model", help="model URI to record in the plan (validate uses it)")
    p.add_argument("--force", action="store_true", help="replace a different plan already written for this run id")
    p.add_argument(
        "--dataset", help="dataset whose last plan this one continues (default: derived from the manifest URI)"
    )
    p.add_argument("--fresh", action="store_true", help="plan from scratch instead of continuing the last plan")
    p.add_argument("--summary-json", help="also write the result as JSON to this local path")


def add_validate(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="check that every partition of a plan is committed, reconciled and intact",
        description="Check every partition of the plan: _SUCCESS present, counts reconcile with the plan, "
        "embedding dims as recorded, listed files present with their sizes. Exits 1 if anything is wrong.",
    )
    p.add_argument("--plan", required=True, help="plan.json written by `plan`")
    p.add_argument("--model", help="model whose outputs to check (default: the plan's, or the only one present)")
    p.add_argument(
        "--output-key",
        help="output identity whose work to check (printed by embed; default: the only one present for the model)",
    )
    add_arguments(p, Acceptance, max_reject_rate=1.0)
    p.add_argument("--summary-json", help="also write the report as JSON to this local path")
    p.add_argument(
        "--report", action="store_true", help="also write the run report (report.json, report.md) next to the plan"
    )
    add_price_flags(p)  # what the report's cost estimate prices
    p.add_argument(
        "--catalog-uri",
        help="with --report: register the committed files in this Iceberg catalog "
        "(SQLAlchemy URL, e.g. sqlite:////path/catalog.db) when validation passes",
    )
    p.add_argument(
        "--dataset",
        help="with --catalog-uri: the dataset whose table embeddings.<dataset>__<model_id>__<output_key> gets "
        "the files "
        "(default: derived from the plan's manifest URI)",
    )


def add_summary(sub) -> None:
    p = sub.add_parser(
        "summary",
        help="print the newest run report under an output root",
        description="Print the summary of the newest run report ({output}/runs/*/report.json) and where things are.",
    )
    p.add_argument("--output", required=True, help="output root given to plan/the DAG")
    p.add_argument("--label", help="also print LABEL: what the night embedded, kept and removed, first")


def run_demo_assets(args) -> int:
    from ray_jobs.demo.assets import write_demo_assets

    assets = write_demo_assets(args.out, rows=args.rows, bad_images=args.bad_images, seed=args.seed, files=args.files)
    broken = ", ".join(f"{k}={v}" for k, v in sorted(assets.broken.items())) or "none"
    print(
        f"demo-assets: rows={assets.rows} broken=({broken}) model={assets.model} manifest={assets.manifest}",
        flush=True,
    )
    return 0


def run_demo_night(args) -> int:
    from ray_jobs.demo.assets import change_demo_manifest

    change = change_demo_manifest(args.out, add_rows=args.add_rows, drop_files=args.drop_files, seed=args.seed)
    print(change.summary(), flush=True)
    return 0


def _manifest_catalog(args):
    """The catalog of an ``iceberg://`` manifest, from ``--manifest-catalog-uri`` / ``--manifest-catalog-name``."""
    from ray_jobs.planning.iceberg_manifest import ManifestCatalog

    if not args.manifest_catalog_uri:
        return None
    return ManifestCatalog(args.manifest_catalog_uri, args.manifest_catalog_name)


def run_plan(args) -> int:
    from ray_jobs.planning.plan import run_plan

    settings = from_args(Partitioning, args)
    result = run_plan(
        args.manifest,
        args.output,
        settings,
        run_id=args.run_id,
        model_uri=args.model,
        force=args.force,
        dataset=args.dataset,
        fresh=args.fresh,
        manifest_catalog=_manifest_catalog(args),
    )
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
                    "new_partitions": [x.index for x in p.partitions if not x.kept],
                    "kept_rows": p.kept_rows,
                    "retired_rows": p.retired_rows,
                    "previous_run_id": p.previous_run_id,
                    "seconds": result.seconds,
                },
                fh,
                indent=2,
            )
    return 0


def run_validate(args) -> int:
    from ray_jobs.output.validate import resolve_model_id, validate_plan
    from ray_jobs.planning.plan import load_plan

    max_reject_rate = from_args(Acceptance, args, max_reject_rate=1.0).max_reject_rate
    plan = load_plan(args.plan)
    model_id, dim = resolve_model_id(plan, args.model)
    report = validate_plan(plan, model_id, dim, max_reject_rate, output_key=args.output_key)
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

            result = register_plan(
                plan, model_id, args.catalog_uri, run_id=plan.run_id, dataset=args.dataset, output_key=report.output_key
            )
            print(result.summary(), flush=True)
            catalog = result.as_dict()
        run_report = build_report(plan, report, catalog=catalog, prices=prices_of(args))
        _, md_uri = write_report(run_report)
        print(f"report: {run_report.summary()} -> {md_uri}", flush=True)
    return 0 if report.ok else 1


def run_summary(args) -> int:
    from ray_jobs import storage
    from ray_jobs.contract.layout import join_uri
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
    if args.label and data.get("night_line"):
        print(f"{args.label}: {data['night_line']}")
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
        from ray_jobs.contract.marker import STARTUP_LABELS

        medians = data["startup_median"]
        figures = ", ".join(f"{label} {medians[k]:.1f}s" for k, label in STARTUP_LABELS.items() if k in medians)
        print(f"start-up:   median per partition: {figures}")
    if data.get("catalog"):
        print(
            f"iceberg:    table {data['catalog']['table']} snapshot {data['catalog']['snapshot_id']}"
            + (f" ({data['catalog']['catalog_uri']})" if data["catalog"].get("catalog_uri") else "")
        )
    if data.get("night_line"):
        print(f"night:      {data['night_line']}")
    slot = join_uri(data["output_uri"], "embeddings", "model=" + data["model_id"])
    if data.get("output_key"):
        slot = join_uri(slot, "out=" + data["output_key"])
    else:  # a format 1 plan's partitions
        slot = join_uri(slot, "plan=" + data["plan_id"])
    print(f"embeddings: {slot}")
    print(f"report:     {storage.to_uri(fs, newest).removesuffix('.json')}.md")
    return 0
