"""``gc``: expire old Iceberg snapshots and remove what no retained snapshot, plan or live
attempt needs any more (:mod:`ray_jobs.output.gc`)."""

from __future__ import annotations

import argparse

from ray_jobs.errors import UsageError


def retention(text: str) -> float:
    """An argparse type for ``Nd``, ``Nh`` or ``Nm``: seconds."""
    from ray_jobs.output.gc import parse_retention

    try:
        return parse_retention(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_gc(sub) -> None:
    from ray_jobs.output.gc import DEFAULT_RETAIN, EMBEDDED_CATALOG

    p = sub.add_parser(
        "gc",
        help="expire old Iceberg snapshots; remove retired work, dead attempts, superseded markers, old runs",
        description="Expire the snapshots of the output's Iceberg tables that have not been current for the "
        "retention, then remove work directories no retained snapshot references and no kept plan lists, attempt "
        "directories no marker lists whose lease expired, superseded _history/ markers and their files, run "
        "directories no lineage needs, and (S3) incomplete multipart uploads: each only once older than the "
        "retention. Never removes a file a retained snapshot, a kept plan or a live attempt references.",
    )
    p.add_argument("--output", required=True, help="output root given to plan/the DAG")
    p.add_argument(
        "--retain",
        type=retention,
        default=retention(DEFAULT_RETAIN),
        metavar="Nd|Nh|Nm",
        help=f"keep everything younger than this (default {DEFAULT_RETAIN}, at least 1h)",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would go and remove nothing")
    p.add_argument(
        "--catalog-uri",
        help="the Iceberg catalog the output is registered in (SQLAlchemy URL or pyiceberg:<name>; default: "
        f"{EMBEDDED_CATALOG} in a local output root if present). Without one, work is kept",
    )
    p.add_argument(
        "--no-catalog",
        action="store_true",
        help="the output is registered in no catalog: remove retired work on plans and age alone",
    )


def run_gc(args) -> int:
    from ray_jobs.output.gc import collect

    if args.no_catalog and args.catalog_uri:
        raise UsageError("gc: give --catalog-uri or --no-catalog, not both")
    result = collect(
        args.output, args.retain, catalog_uri=args.catalog_uri, no_catalog=args.no_catalog, dry_run=args.dry_run
    )
    for line in result.items() if args.dry_run else [f"gc: note: {n}" for n in result.notes]:
        print(line, flush=True)
    print(result.summary(), flush=True)
    return 0
