#!/usr/bin/env python
"""Where the demo's DAG wall time goes, from the log `make demo` leaves (``.demo/dags-test.log``).

Prints the run's duration as Airflow recorded it (``run_duration`` of "DagRun Finished"), each
task's wall time in run order, and the per-partition start-up breakdown of the newest run
report (driver start, admission wait, actor start, model load, first batch).

    make demo && python bench/demo_wall.py                 # this checkout
    python bench/demo_wall.py --log other/.demo/dags-test.log --output other/.demo/output

To compare two checkouts, run their ``make demo`` alternately on a quiet machine and compare
the ``run_duration`` lines; one run of each is noise-prone on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import re
import sys

_STAMP = r"^(\S+Z) "
_START = re.compile(_STAMP + r".*\[DAG TEST\] starting task_id=(\S+) map_index=(-?\d+)")
_END = re.compile(_STAMP + r".*\[DAG TEST\] end task task_id=(\S+) map_index=(-?\d+)")
_DONE = re.compile(r"DagRun Finished: .*run_duration=([\d.]+), state=(\w+)")


def _ts(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def task_walls(lines) -> list[tuple[str, float]]:
    """``[(task[map_index], seconds)]`` in the order the tasks ended."""
    started, out = {}, []
    for line in lines:
        if m := _START.search(line):
            started[(m[2], m[3])] = _ts(m[1])
        elif (m := _END.search(line)) and (m[2], m[3]) in started:
            name = m[2] if m[3] == "-1" else f"{m[2]}[{m[3]}]"
            out.append((name, (_ts(m[1]) - started.pop((m[2], m[3]))).total_seconds()))
    return out


def run_duration(lines) -> tuple[float, str] | None:
    for line in lines:
        if m := _DONE.search(line):
            return float(m[1]), m[2]
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", default=".demo/dags-test.log")
    ap.add_argument("--output", default=".demo/output", help="the demo's output root (for the run report)")
    args = ap.parse_args(argv)
    with open(args.log, errors="replace") as fh:
        lines = fh.readlines()
    done = run_duration(lines)
    if done is None:
        print(f"no finished DAG run in {args.log}", file=sys.stderr)
        return 1
    for name, secs in task_walls(lines):
        print(f"  {name:<16} {secs:6.1f}s")
    reports = sorted(glob.glob(os.path.join(args.output, "runs", "*", "report.json")), key=os.path.getmtime)
    if reports:
        with open(reports[-1]) as fh:
            report = json.load(fh)
        for p in report["partitions"]:
            if p.get("startup"):
                figures = " ".join(f"{k.removeprefix('startup_')}={v:.1f}" for k, v in p["startup"].items())
                print(f"  partition {p['index']} start-up: {figures}")
    print(f"run_duration={done[0]:.1f}s state={done[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
