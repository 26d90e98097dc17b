"""Figures of a DAG run from its Airflow task logs: the run's wall time, each partition's Ray job
wall time (submitted or adopted -> succeeded), their sum, and the peak number of jobs in flight.

    python bench/topology_figures.py AIRFLOW_HOME

Reads ``AIRFLOW_HOME/logs/dag_id=multimodal_embeddings/run_id=*`` (the worker's and the
triggerer's parts of each task log), e.g. a ``tests/topology`` run's home under pytest's
temp dir. Orchestration overhead = run wall - sum of job walls / jobs in flight.
"""

import glob
import json
import os
import re
import sys
from datetime import datetime


def stamps(path):
    out = []
    with open(path, errors="replace") as fh:
        for line in fh:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            ts = r.get("timestamp")
            if ts:
                out.append((datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp(), str(r.get("event", ""))))
    return out


home = sys.argv[1]
for run in sorted(glob.glob(f"{home}/logs/dag_id=multimodal_embeddings/run_id=*")):
    allts, jobs = [], {}
    for f in glob.glob(f"{run}/task_id=*/**/*.log*", recursive=True):
        s = stamps(f)
        allts += [t for t, _ in s]
        m = re.search(r"map_index=(\d+)", f)
        if "task_id=embed" in f and m:
            k = int(m.group(1))
            for t, ev in s:
                if ev.startswith(("submitted Ray job", "adopted Ray job")):
                    jobs.setdefault(k, [t, None])[0] = min(jobs.get(k, [t])[0], t)
                if re.match(r"Ray job \S+ succeeded", ev):
                    jobs.setdefault(k, [t, t])[1] = t
    done = {k: v for k, v in jobs.items() if v[1] is not None}
    if not allts:
        continue
    wall = max(allts) - min(allts)
    total = sum(b - a for a, b in done.values())
    edges = sorted([(a, 1) for a, _ in done.values()] + [(b, -1) for _, b in done.values()])
    peak = cur = 0
    for _, d in edges:
        cur += d
        peak = max(peak, cur)
    print(
        f"{os.path.basename(run)}: partitions={len(done)} run_wall={wall:.0f}s sum_job_wall={total:.0f}s "
        f"max_job={max((b - a for a, b in done.values()), default=0):.0f}s peak_jobs_in_flight={peak}"
    )
