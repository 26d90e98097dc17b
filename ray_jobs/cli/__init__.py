"""``python -m ray_jobs``: the data plane's command line.

A bad argument or bad input exits 2 with one line naming what to fix, before any Ray work. A
job that waited too long for its footprint exits 3; one whose pipeline stalled exits 4.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ray_jobs.cli import data, embed, gc, perf
from ray_jobs.cli.args import Parser, min_max
from ray_jobs.errors import STALL_EXIT_CODE, AdmissionTimeout, JobInputError, PipelineStalled

__all__ = ["build_parser", "main", "min_max"]

#: command -> (add its parser, run it); the order is the help's
COMMANDS = {
    "plan": (data.add_plan, data.run_plan),
    "embed": (embed.add_embed, embed.run_embed),
    "validate": (data.add_validate, data.run_validate),
    "demo-assets": (data.add_demo_assets, data.run_demo_assets),
    "demo-night": (data.add_demo_night, data.run_demo_night),
    "summary": (data.add_summary, data.run_summary),
    "gc": (gc.add_gc, gc.run_gc),
    "model-id": (perf.add_model_id, perf.run_model_id),
    "tune": (perf.add_tune, perf.run_tune),
    "capacity": (perf.add_capacity, perf.run_capacity),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m ray_jobs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


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
        return COMMANDS[args.command][1](args)
    except JobInputError as exc:
        _fail(exc, ray_was_connected)
        return 2
    except AdmissionTimeout as exc:
        _fail(exc, ray_was_connected)
        return 3
    except PipelineStalled as exc:
        _fail(exc, ray_was_connected)
        return STALL_EXIT_CODE


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
