"""``gc``: remove what no reader can reach any more, once it is older than the retention.

In this order, for one output root:

1. **Snapshots.** Every table of the output (its location or its files are under the output)
   expires the snapshots that have not been current for the retention
   (:func:`ray_jobs.output.table_refs.expiring_snapshots`); the current one never expires.
2. **Retired work.** A ``work=`` directory (or a ``plan=/partition=`` one of format 1 plans) is
   removed when all of these hold: no retained snapshot of any table in the catalog references
   a file in it; neither the last plan of a dataset lineage nor a plan younger than the
   retention lists it (so the work of a night whose catalog step has not landed yet stays);
   its newest file is older than the retention; no attempt in it holds a live lease; and its
   marker is readable.
3. **Dead attempts.** An ``attempt=`` directory that no marker lists (the current one or one in
   ``_history/``) and whose lease expired (:func:`ray_jobs.output.lease.last_heartbeat`; one with
   no lease counts from its newest file), by the same rule a new attempt cleans up with.
4. **Superseded markers.** A ``_history/<attempt>.json`` older than the retention whose files
   no retained snapshot references, with those files (never one the current marker lists).
5. **Run directories.** ``runs/<run_id>/`` older than the retention, except the runs a
   lineage pointer names and the runs their plans continue.
6. **Multipart uploads** (S3) under the output prefix started before the retention.

Before each removal gc reads the catalog, the lineage pointers and any new plan again and
checks the directory once more, so a snapshot committed or a plan written while gc runs
protects what it names. Without a catalog (none given, none embedded next to a local output)
work and superseded markers are kept, since a catalog gc cannot see may reference them; say
``no_catalog=True`` when the output is registered nowhere.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
import re
import time
from dataclasses import dataclass, field

from ray_jobs import storage
from ray_jobs.contract.layout import ATTEMPT_PREFIX, HISTORY_DIR, LINEAGE_DIR, SUCCESS_FILE, join_uri, plan_uri
from ray_jobs.contract.marker import CommitMarker
from ray_jobs.errors import OutputError, PlanError, UsageError
from ray_jobs.output.lease import LEASE_TTL_S, last_heartbeat
from ray_jobs.output.table_refs import TableFiles, belongs_to, expire, expiring_snapshots, under

log = logging.getLogger(__name__)

DEFAULT_RETAIN = "7d"
#: The shortest retention the command line accepts (the DAG's is a day): a guard against a typo
#: such as ``7m`` for ``7d``, which would expire every snapshot but the current one at once.
MIN_RETAIN_S = 3600.0
_UNITS = {"d": 86400, "h": 3600, "m": 60}
#: The embedded catalog next to a local output (what the DAG uses without a catalog connection).
EMBEDDED_CATALOG = "iceberg_catalog.db"


def parse_retention(text: str, minimum_s: float = MIN_RETAIN_S) -> float:
    """Seconds in ``Nd``, ``Nh`` or ``Nm`` (at least *minimum_s*)."""
    match = re.fullmatch(r"\s*(\d+)\s*([dhm])\s*", str(text))
    if not match:
        raise UsageError(f"retention {text!r}: give a whole number of days, hours or minutes, e.g. 7d, 36h, 90m")
    seconds = float(int(match.group(1)) * _UNITS[match.group(2)])
    if seconds < minimum_s:
        raise UsageError(
            f"retention {text!r} is shorter than {minimum_s / 3600:g}h: gc would expire every snapshot but the "
            "current one and remove the runs of the last hours"
        )
    return seconds


def _mtime(info: dict) -> float:
    value = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return float(value) if value is not None else 0.0


def _files_under(fs, path: str) -> dict[str, tuple[int, float]]:
    """Every file below *path*: relative path -> (size, mtime). Fresh, never cached."""
    storage.invalidate(fs, path)
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return {}
    prefix = path.rstrip("/") + "/"
    return {
        name[len(prefix) :]: (int(info.get("size") or 0), _mtime(info))
        for name, info in found.items()
        if name.startswith(prefix) and info.get("type", "file") == "file"
    }


@dataclass
class WorkDir:
    """One unit of committed (or attempted) work: ``model=/out=/work=`` or ``model=/plan=/partition=``."""

    path: str  # relative to {output}/embeddings
    ident: tuple  # ("work", key) or ("legacy", plan_id, index)
    files: dict[str, tuple[int, float]] = field(default_factory=dict)  # relative to the work dir

    @property
    def newest(self) -> float:
        return max((m for _, m in self.files.values()), default=0.0)

    def attempts(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for rel in self.files:
            head, sep, _ = rel.partition("/")
            if sep and head.startswith(ATTEMPT_PREFIX):
                out.setdefault(head.removeprefix(ATTEMPT_PREFIX), []).append(rel)
        return out

    def history(self) -> list[str]:
        return sorted(r for r in self.files if r.startswith(f"{HISTORY_DIR}/") and r.endswith(".json"))


def _work_ident(parts: list[str]) -> tuple | None:
    if len(parts) < 3 or not parts[0].startswith("model="):
        return None
    if parts[1].startswith("out=") and parts[2].startswith("work="):
        return ("work", parts[2].removeprefix("work="))
    if parts[1].startswith("plan=") and parts[2].startswith("partition="):
        try:
            return ("legacy", parts[1].removeprefix("plan="), int(parts[2].removeprefix("partition=")))
        except ValueError:
            return None
    return None


def _planned_idents(plan) -> set[tuple]:
    if plan.keyed:
        return {("work", p.key) for p in plan.partitions}
    return {("legacy", plan.plan_id, p.index) for p in plan.partitions}


@dataclass
class GcResult:
    dry_run: bool
    retain_s: float
    snapshots_expired: int = 0
    tables: list[str] = field(default_factory=list)
    work_removed: list[str] = field(default_factory=list)
    rows_removed: int = 0
    attempts_removed: list[str] = field(default_factory=list)
    history_removed: list[str] = field(default_factory=list)
    uploads_aborted: list[str] = field(default_factory=list)
    runs_removed: list[str] = field(default_factory=list)
    kept: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def keep(self, why: str) -> None:
        self.kept[why] = self.kept.get(why, 0) + 1

    def summary(self) -> str:
        verb, gone = ("would expire", "would remove") if self.dry_run else ("expired", "removed")
        kept = ", ".join(f"{n} {why}" for why, n in sorted(self.kept.items())) or "nothing"
        return (
            f"gc: {verb} {self.snapshots_expired} snapshots in {len(self.tables)} tables; {gone} "
            f"{len(self.work_removed)} work dirs ({self.rows_removed} rows), "
            f"{len(self.attempts_removed)} attempt dirs, "
            f"{len(self.history_removed)} history markers, {len(self.uploads_aborted)} multipart uploads, "
            f"{len(self.runs_removed)} run dirs; kept {kept}"
        )

    def items(self) -> list[str]:
        """One line per thing removed (or that would be)."""
        verb = "would remove" if self.dry_run else "removed"
        out = [f"gc: {verb} work {u}" for u in self.work_removed]
        out += [f"gc: {verb} attempt {u}" for u in self.attempts_removed]
        out += [f"gc: {verb} history marker {u}" for u in self.history_removed]
        out += [
            f"gc: {'would abort' if self.dry_run else 'aborted'} multipart upload {u}" for u in self.uploads_aborted
        ]
        out += [f"gc: {verb} run {u}" for u in self.runs_removed]
        return out + [f"gc: note: {n}" for n in self.notes]


class Collector:
    """One collection of one output root (see the module's docstring)."""

    def __init__(
        self,
        output: str,
        retain_s: float,
        *,
        catalog_uri: str | None = None,
        no_catalog: bool = False,
        dry_run: bool = False,
        warehouse: str | None = None,
    ):
        if retain_s <= 0:
            raise UsageError(f"retention must be > 0 seconds, got {retain_s}")
        self.output = output.rstrip("/")
        self.fs, self.root = storage.filesystem_for(self.output)
        self.root = self.root.rstrip("/")
        self.emb = f"{self.root}/embeddings"
        self.runs = f"{self.root}/runs"
        self.retain_s = retain_s
        self.cutoff = time.time() - retain_s
        self.dry_run = dry_run
        self.result = GcResult(dry_run=dry_run, retain_s=retain_s)
        self.catalog_uri = catalog_uri or (None if no_catalog else self._embedded_catalog())
        self.no_catalog = no_catalog and not catalog_uri
        self.warehouse = warehouse or join_uri(self.output, "warehouse")
        self.tables: TableFiles | None = None
        self.expired: dict[str, set[int]] = {}
        self.referenced: set[str] = set()
        self.planned: set[tuple] = set()
        self.kept_runs: set[str] = set()
        self.known_runs: set[str] | None = None  # run directories listed so far
        self.young_runs: set[str] = set()
        self.plans: dict[str, str] = {}  # run id -> the run its plan continues, for plans read
        self.plans_unreadable: set[str] = set()

    def _embedded_catalog(self) -> str | None:
        if storage.is_remote(self.output):
            return None
        path = posixpath.join(storage.filesystem_for(self.output)[1], EMBEDDED_CATALOG)
        return f"sqlite:///{path}" if storage.exists(path) else None

    def _uri(self, path: str) -> str:
        return storage.to_uri(self.fs, path)

    # -- what is protected -------------------------------------------------------------------

    def _expire_snapshots(self) -> None:
        if self.catalog_uri is None:
            why = "no catalog (--no-catalog)" if self.no_catalog else "no catalog given: work and history kept"
            self.result.notes.append(why)
            return
        from ray_jobs.output.catalog import open_catalog

        self.tables = TableFiles(open_catalog(self.catalog_uri, self.warehouse))
        cutoff_ms = int(self.cutoff * 1000)
        for ident in self.tables.tables():
            table = self.tables.load(ident)
            if table is None or not belongs_to(table, self.tables.referenced(table), self.root):
                continue
            self.result.tables.append(ident)
            ids = expiring_snapshots(table.metadata, cutoff_ms)
            if ids and not self.dry_run:
                table = expire(table, ids)
                ids = [i for i in ids if table.metadata.snapshot_by_id(i) is None]
            self.expired[ident] = set(ids)
            self.result.snapshots_expired += len(ids)
            if ids:
                log.info("table %s: %s %d snapshots", ident, "would expire" if self.dry_run else "expired", len(ids))

    def _read_references(self) -> None:
        """Files of every retained snapshot of every table in the catalog (not only the
        output's: another table may reference this output's files too)."""
        if self.tables is None:
            return
        refs: set[str] = set()
        for ident in self.tables.tables():
            table = self.tables.load(ident)
            if table is not None:
                refs |= {k for k in self.tables.referenced(table, self.expired.get(ident, set())) if under(k, self.emb)}
        self.referenced = refs

    def _run_age(self, run_id: str) -> float:
        files = _files_under(self.fs, f"{self.runs}/{run_id}")
        return max((m for _, m in files.values()), default=0.0)

    def _read_plans(self) -> None:
        """The plans that protect the work they list (the last plan of every dataset lineage,
        and every plan younger than the retention) and the run directories gc keeps: those,
        and the runs the lineage heads continue (a retried plan step reads that plan again).
        A plan or pointer that cannot be read protects all work. A run directory first seen on
        a later call is new, so young: its plan is read then."""
        lineage_runs = set()
        for uri in storage.list_files(f"{self._uri(self.runs)}/{LINEAGE_DIR}"):
            if not uri.endswith(".json"):
                continue
            try:
                lineage_runs.add(str(json.loads(storage.read_text(uri))["run_id"]))
            except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
                self.plans_unreadable.add(f"{uri}: {exc}")
        first = self.known_runs is None
        runs = {r for r in storage.list_dirs(self._uri(self.runs)) if not r.startswith("_")}
        for run_id in sorted(runs - (self.known_runs or set())):
            if not first or self._run_age(run_id) >= self.cutoff:
                self.young_runs.add(run_id)
        self.known_runs = runs | (self.known_runs or set())
        protecting = lineage_runs | self.young_runs
        continued = {self._read_plan(run_id) for run_id in sorted(lineage_runs)}
        for run_id in sorted(self.young_runs - lineage_runs):
            self._read_plan(run_id)
        self.kept_runs = protecting | (continued - {""})

    def _read_plan(self, run_id: str) -> str:
        """Read run *run_id*'s plan once and protect the work it lists; the run it continues."""
        from ray_jobs.contract.plan import Plan

        if run_id not in self.plans:
            uri = plan_uri(self._uri(self.root), run_id)
            try:
                plan = Plan.from_json(storage.read_text(uri), uri)
            except FileNotFoundError:
                return ""  # not written yet: read again on the next call
            except PlanError as exc:
                self.plans_unreadable.add(str(exc))
                return ""
            self.planned |= _planned_idents(plan)
            self.plans[run_id] = plan.previous_run_id
        return self.plans[run_id]

    def _refresh(self) -> None:
        """Read again what protects: the catalog's snapshots, lineage pointers and new plans."""
        self._read_references()
        self._read_plans()

    # -- the output's contents ---------------------------------------------------------------

    def _inventory(self) -> list[WorkDir]:
        dirs: dict[str, WorkDir] = {}
        for rel, info in _files_under(self.fs, self.emb).items():
            parts = rel.split("/")
            ident = _work_ident(parts)
            if ident is None:
                continue
            key = "/".join(parts[:3])
            dirs.setdefault(key, WorkDir(key, ident)).files["/".join(parts[3:])] = info
        return [dirs[k] for k in sorted(dirs)]

    def _reload(self, work: WorkDir) -> WorkDir:
        return WorkDir(work.path, work.ident, _files_under(self.fs, f"{self.emb}/{work.path}"))

    def _abs(self, work: WorkDir, rel: str = "") -> str:
        return f"{self.emb}/{work.path}" + (f"/{rel}" if rel else "")

    def _marker(self, work: WorkDir) -> tuple[bool, CommitMarker | None]:
        """(readable, marker): an unreadable marker protects its whole directory."""
        if SUCCESS_FILE not in work.files:
            return True, None
        try:
            return True, CommitMarker.from_json(storage.read_text(self._uri(self._abs(work, SUCCESS_FILE))))
        except FileNotFoundError:
            return True, None
        except OutputError as exc:
            self.result.notes.append(f"kept {work.path}: {exc}")
            return False, None

    def _history_markers(self, work: WorkDir) -> dict[str, CommitMarker | None]:
        out: dict[str, CommitMarker | None] = {}
        for rel in work.history():
            try:
                out[rel] = CommitMarker.from_json(storage.read_text(self._uri(self._abs(work, rel))))
            except (OutputError, FileNotFoundError):
                out[rel] = None  # unreadable: its attempt stays protected
        return out

    def _attempt_live(self, work: WorkDir, attempt: str, rels: list[str]) -> bool:
        """The lease rule of :mod:`ray_jobs.output.lease`; an attempt with no readable lease is
        judged by its newest file (it may be writing its lease right now)."""
        now = time.time()
        beat = last_heartbeat(self._uri(self._abs(work, f"{ATTEMPT_PREFIX}{attempt}")))
        if beat == 0.0:
            beat = max((work.files[r][1] for r in rels if r in work.files), default=0.0)
        return now - beat <= LEASE_TTL_S

    def _committed_attempts(self, work: WorkDir, marker: CommitMarker | None) -> set[str]:
        """The attempts a marker names: the current one and every one in ``_history/``."""
        named = {posixpath.basename(rel).removesuffix(".json") for rel in work.history()}
        return named | ({marker.attempt} if marker is not None else set())

    def _live_attempts(self, work: WorkDir, marker: CommitMarker | None) -> list[str]:
        """Attempts still writing: no marker names them and their lease is live."""
        committed = self._committed_attempts(work, marker)
        return [a for a, rels in work.attempts().items() if a not in committed and self._attempt_live(work, a, rels)]

    def _referenced_in(self, work: WorkDir) -> bool:
        prefix = self._abs(work) + "/"
        return any(k.startswith(prefix) for k in self.referenced)

    def _why_kept(self, work: WorkDir, marker: CommitMarker | None) -> str | None:
        """Why *work* must stay (None: it may go)."""
        if self._live_attempts(work, marker):
            return "work dirs with a live attempt"
        if self.tables is None:
            return "work dirs (no catalog to check)" if not self.no_catalog else self._plain_why(work)
        if self._referenced_in(work):
            return "work dirs referenced by retained snapshots"
        return self._plain_why(work)

    def _plain_why(self, work: WorkDir) -> str | None:
        if self.plans_unreadable:
            return "work dirs (a plan is unreadable)"
        if work.ident in self.planned:
            return "work dirs listed by kept plans"
        if work.newest >= self.cutoff:
            return "work dirs younger than the retention"
        return None

    # -- removal -----------------------------------------------------------------------------

    def _remove(self, path: str) -> None:
        if not self.dry_run:
            storage.remove_tree(self._uri(path))

    def _collect_work(self, work: WorkDir) -> None:
        readable, marker = self._marker(work)
        if not readable:
            self.result.keep("work dirs with an unreadable marker")
            return
        why = self._why_kept(work, marker)
        if why is None and not self.dry_run:
            self._refresh()  # a snapshot or plan that landed since the listing protects too
            work = self._reload(work)
            readable, marker = self._marker(work)
            why = self._why_kept(work, marker) if readable else "work dirs with an unreadable marker"
        if why is None:
            self._remove(self._abs(work))
            self.result.work_removed.append(self._uri(self._abs(work)))
            self.result.rows_removed += marker.rows_ok if marker else 0
            return
        self.result.keep(why)
        self._collect_attempts(work, marker)
        if self.tables is not None or self.no_catalog:
            self._collect_history(work, marker)

    def _collect_attempts(self, work: WorkDir, marker: CommitMarker | None) -> None:
        protected = self._committed_attempts(work, marker)
        for attempt, rels in sorted(work.attempts().items()):
            if attempt in protected:
                continue
            if self._attempt_live(work, attempt, rels):
                self.result.keep("live attempts")
                continue
            path = self._abs(work, f"{ATTEMPT_PREFIX}{attempt}")
            if not self.dry_run:  # a marker naming it may have landed since the listing
                fresh = self._reload(work)
                ok, now_marker = self._marker(fresh)
                if not ok or (now_marker is not None and now_marker.attempt == attempt):
                    self.result.keep("attempts committed meanwhile")
                    continue
                if self._attempt_live(fresh, attempt, fresh.attempts().get(attempt, [])):
                    self.result.keep("live attempts")
                    continue
            self._remove(path)
            self.result.attempts_removed.append(self._uri(path))

    def _collect_history(self, work: WorkDir, marker: CommitMarker | None) -> None:
        current = {f.path for f in marker.listed} if marker is not None else set()
        current_attempt = marker.attempt if marker is not None else None
        for rel, old in self._history_markers(work).items():
            if old is None or work.files[rel][1] >= self.cutoff:
                continue
            if not self.dry_run:
                self._refresh()
            listed = {f.path for f in old.listed}
            if any(self._abs(work, p) in self.referenced for p in listed):
                self.result.keep("history markers referenced by retained snapshots")
                continue
            attempt = posixpath.basename(rel).removesuffix(".json")
            attempt_dir = f"{ATTEMPT_PREFIX}{attempt}"
            own = [r for r in work.files if r.startswith(attempt_dir + "/")]
            if attempt != current_attempt and not (set(own) & current):
                self._remove(self._abs(work, attempt_dir))
            else:  # only the files no current marker lists
                for path in sorted(listed - current):
                    if not self.dry_run:
                        storage.remove_tree(self._uri(self._abs(work, path)))
            self._remove(self._abs(work, rel))
            self.result.history_removed.append(self._uri(self._abs(work, rel)))

    def _collect_runs(self) -> None:
        for run_id in [r for r in storage.list_dirs(self._uri(self.runs)) if not r.startswith("_")]:
            if run_id in self.kept_runs:
                self.result.keep("run dirs")
                continue
            if not self.dry_run:
                self._read_plans()  # a lineage pointer may name it now
                if run_id in self.kept_runs or self._run_age(run_id) >= self.cutoff:
                    self.result.keep("run dirs")
                    continue
            self._remove(f"{self.runs}/{run_id}")
            self.result.runs_removed.append(self._uri(f"{self.runs}/{run_id}"))

    def _collect_uploads(self) -> None:
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        if protocol not in ("s3", "s3a"):
            return
        bucket, _, prefix = self.root.partition("/")
        kwargs = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else ""}
        while True:
            page = self.fs.call_s3("list_multipart_uploads", **kwargs)
            for up in page.get("Uploads", []):
                if _mtime({"LastModified": up["Initiated"]}) >= self.cutoff:
                    self.result.keep("multipart uploads in progress")
                    continue
                if not self.dry_run:
                    self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                self.result.uploads_aborted.append(f"s3://{bucket}/{up['Key']} ({up['UploadId']})")
            if not page.get("IsTruncated"):
                return
            kwargs.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])

    def run(self) -> GcResult:
        self._expire_snapshots()
        self._refresh()
        for work in self._inventory():
            self._collect_work(work)
        self._collect_runs()
        self._collect_uploads()
        for problem in sorted(self.plans_unreadable):
            self.result.notes.append(f"kept all work: unreadable plan or lineage pointer: {problem}")
        return self.result


def collect(
    output: str,
    retain_s: float,
    *,
    catalog_uri: str | None = None,
    no_catalog: bool = False,
    dry_run: bool = False,
    warehouse: str | None = None,
) -> GcResult:
    """Collect *output* (see the module's docstring); *retain_s*: the retention in seconds."""
    return Collector(
        output, retain_s, catalog_uri=catalog_uri, no_catalog=no_catalog, dry_run=dry_run, warehouse=warehouse
    ).run()
