"""Register a validated plan's committed files in an Apache Iceberg table (pyiceberg).

The table ``embeddings.<dataset>__<model_id>__<output_key>`` (one per dataset: the DAG's
``dataset`` param, by default derived from the manifest URI; and one per output identity, so
a run with another dtype or image limits starts its own table) is created with its
properties in one commit, and gets one snapshot per registration that makes it hold exactly
this plan's embeddings. The snapshot is a file-level overwrite of only what changed: the
data files of retired work (rewritten or deleted manifest files) are removed, the files of
new work are added in place (no data is copied; only files a valid commit marker lists), and
the files of kept work are not touched. Earlier nights stay reachable by time travel.
Registering the same files again creates no snapshot, so a re-run never adds rows twice. The
snapshot summary carries the run id, dataset, manifest and its fingerprint, plan id, model
id, output key, the rows and files added and removed, and the table's totals.

A table registered before output identities were part of its name
(``embeddings.<dataset>__<model_id>``) is renamed to the new name on first registration, its
history kept.

``catalog_uri`` is a SQLAlchemy URL for pyiceberg's SQL catalog (``sqlite:///…`` by
default, PostgreSQL in production), or ``pyiceberg:<name>`` to use a catalog configured the
pyiceberg way (``.pyiceberg.yaml`` or ``PYICEBERG_CATALOG__<NAME>__*``: REST, Glue, Hive).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ray_jobs import storage
from ray_jobs.contract.ids import default_dataset_name, sanitize_name
from ray_jobs.contract.layout import embeddings_schema, join_uri
from ray_jobs.contract.plan import Plan
from ray_jobs.errors import OutputError, UsageError
from ray_jobs.output.markers import check_planned

NAMESPACE = "embeddings"


def table_identifier(model_id: str, dataset: str, output_key: str = "") -> str:
    """``embeddings.<dataset>__<model_id>__<output_key>``: one table per dataset, model and
    output identity, so a run over another manifest, or with settings that change the
    embeddings, never touches this one's rows."""
    base = f"{NAMESPACE}.{sanitize_name(dataset)}__{sanitize_name(model_id)}"
    return f"{base}__{sanitize_name(output_key)}" if output_key else base


def _io_properties() -> dict[str, str]:
    props = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    for key, env in (
        ("s3.access-key-id", "AWS_ACCESS_KEY_ID"),
        ("s3.secret-access-key", "AWS_SECRET_ACCESS_KEY"),
        ("s3.session-token", "AWS_SESSION_TOKEN"),
        ("s3.region", "AWS_REGION"),
    ):
        if os.environ.get(env):
            props[key] = os.environ[env]
    if "s3.region" not in props and os.environ.get("AWS_DEFAULT_REGION"):
        props["s3.region"] = os.environ["AWS_DEFAULT_REGION"]
    if endpoint:
        props["s3.endpoint"] = endpoint
    return props


def open_catalog(catalog_uri: str, warehouse: str):
    """The pyiceberg catalog behind *catalog_uri*; *warehouse* is where new tables' metadata goes."""
    if catalog_uri.startswith("pyiceberg:"):
        from pyiceberg.catalog import load_catalog

        return load_catalog(catalog_uri.removeprefix("pyiceberg:"))
    if "://" not in catalog_uri:
        raise UsageError(f"catalog_uri {catalog_uri!r} is not a SQLAlchemy URL (e.g. sqlite:////path/catalog.db)")
    from pyiceberg.catalog.sql import SqlCatalog

    if catalog_uri.startswith("sqlite:///"):
        path = catalog_uri.removeprefix("sqlite:///")
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    if not storage.is_remote(warehouse):
        os.makedirs(storage.filesystem_for(warehouse)[1], exist_ok=True)
        warehouse = "file://" + storage.filesystem_for(warehouse)[1]
    return SqlCatalog("embeddings", uri=catalog_uri, warehouse=warehouse, **_io_properties())


@dataclass(frozen=True)
class CatalogResult:
    table: str
    snapshot_id: int
    rows: int
    files: int
    new_snapshot: bool
    rows_added: int = 0
    rows_removed: int = 0
    files_added: int = 0
    files_removed: int = 0

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        verb = "registered" if self.new_snapshot else "already registered"
        return (
            f"catalog: {verb} {self.rows} rows in {self.files} files as {self.table} snapshot {self.snapshot_id} "
            f"(+{self.rows_added} rows in {self.files_added} files, -{self.rows_removed} rows in "
            f"{self.files_removed} files)"
        )


def committed_files(plan: Plan, model_id: str, output_key: str = "") -> tuple[list[str], int, int, int, int]:
    """Data file URIs listed by every partition's marker, the summed rows in/ok/rejected, and the dim.

    Only files a valid marker lists are returned (:func:`ray_jobs.output.markers.check_planned`)."""
    files, rows_in, rows_ok, rejected, dims = [], 0, 0, 0, set()
    for p in plan.partitions:
        uri, marker, problems = check_planned(plan, p.index, model_id, output_key)
        if problems:
            raise OutputError(
                f"partition {p.index:05d} is not committed ({uri}: {problems[0]}); validate the plan first"
            )
        files += marker.data_uris(uri)
        rows_in, rows_ok, rejected = rows_in + marker.rows_in, rows_ok + marker.rows_ok, rejected + marker.rows_rejected
        dims.add((marker.text_dim, marker.image_dim))
    if len(dims) > 1:
        raise OutputError(f"partitions of plan {plan.plan_id} disagree on embedding dims: {sorted(dims)}")
    dim = next(iter(dims))[0] if dims else 0
    return files, rows_in, rows_ok, rejected, dim


def _location(uri: str) -> str:
    return uri if storage.is_remote(uri) else "file://" + storage.filesystem_for(uri)[1]


def _load_or_create(catalog, ident: str, embed_dim: int, properties: dict[str, str]):
    """The table, created with its schema and properties in one commit if it does not exist."""
    from pyiceberg.catalog import Catalog
    from pyiceberg.exceptions import NoSuchTableError, TableAlreadyExistsError
    from pyiceberg.schema import assign_fresh_schema_ids
    from pyiceberg.table.name_mapping import create_mapping_from_schema

    try:
        return catalog.load_table(ident)
    except NoSuchTableError:
        pass
    schema = assign_fresh_schema_ids(Catalog._convert_schema_if_needed(embeddings_schema(embed_dim, embed_dim)))
    # our Parquet files carry no field ids: the name mapping lets readers map columns by name
    props = {**properties, "schema.name-mapping.default": create_mapping_from_schema(schema).model_dump_json()}
    try:
        return catalog.create_table(ident, schema=schema, properties=props)
    except TableAlreadyExistsError:  # another registration created it first
        return catalog.load_table(ident)


def _adopt_legacy_table(catalog, ident: str, model_id: str, dataset: str) -> None:
    """Rename the table a registration before output identities had (``<dataset>__<model_id>``)
    to *ident*, keeping its snapshots, if *ident* does not exist yet."""
    from pyiceberg.exceptions import NoSuchTableError, TableAlreadyExistsError

    legacy = table_identifier(model_id, dataset)
    if legacy == ident or catalog.table_exists(ident) or not catalog.table_exists(legacy):
        return
    try:
        catalog.rename_table(legacy, ident)
    except (NoSuchTableError, TableAlreadyExistsError):  # another registration moved it first
        return
    print(f"catalog: renamed {legacy} to {ident} (tables are now named by output identity too); history kept")


def register_plan(
    plan: Plan,
    model_id: str,
    catalog_uri: str,
    run_id: str,
    warehouse: str | None = None,
    dataset: str | None = None,
    output_key: str | None = None,
) -> CatalogResult:
    """Make the table of *dataset* (default: derived from the plan's manifest URI), the model
    and the output identity hold exactly this plan's committed embeddings, as one new
    snapshot that removes the files no longer planned and adds the new ones."""
    from pyiceberg.io.pyarrow import parquet_files_to_data_files

    from ray_jobs.output.validate import resolve_output_key

    dataset = dataset or default_dataset_name(plan.manifest_uri)
    if output_key is None:
        output_key = resolve_output_key(plan, model_id)
    files, rows_in, rows_ok, rejected, embed_dim = committed_files(plan, model_id, output_key)
    catalog = open_catalog(catalog_uri, warehouse or join_uri(plan.output_uri, "warehouse"))
    ident = table_identifier(model_id, dataset, output_key)
    catalog.create_namespace_if_not_exists(NAMESPACE)
    _adopt_legacy_table(catalog, ident, model_id, dataset)
    table = _load_or_create(
        catalog,
        ident,
        embed_dim,
        {"embeddings.dataset": dataset, "embeddings.model_id": model_id, "embeddings.output_key": output_key},
    )
    wanted = {_location(f) for f in files}
    present = {task.file.file_path: task.file for task in table.scan().plan_files()}
    removed = [f for path, f in present.items() if path not in wanted]
    added = sorted(wanted - present.keys())
    current = table.current_snapshot()
    if current is not None and not removed and not added:
        return CatalogResult(ident, current.snapshot_id, rows_ok, len(files), new_snapshot=False)
    new_files = list(parquet_files_to_data_files(table.io, table.metadata, iter(added)))
    rows_added, rows_removed = sum(f.record_count for f in new_files), sum(f.record_count for f in removed)
    properties = {
        "airflow.run_id": run_id,
        "embeddings.dataset": dataset,
        "embeddings.manifest_uri": plan.manifest_uri,
        "embeddings.manifest_fingerprint": plan.manifest_fingerprint,
        "embeddings.plan_id": plan.plan_id,
        "embeddings.model_id": model_id,
        "embeddings.output_key": output_key,
        "embeddings.rows_in": str(rows_in),
        "embeddings.rows_ok": str(rows_ok),
        "embeddings.rows_rejected": str(rejected),
        "embeddings.partitions": str(len(plan.partitions)),
        "embeddings.rows_added": str(rows_added),
        "embeddings.rows_removed": str(rows_removed),
        "embeddings.files_added": str(len(new_files)),
        "embeddings.files_removed": str(len(removed)),
    }
    with table.transaction() as tx, tx.update_snapshot(snapshot_properties=properties).overwrite() as ow:
        for data_file in removed:
            ow.delete_data_file(data_file)
        for data_file in new_files:
            ow.append_data_file(data_file)
    table = catalog.load_table(ident)
    return CatalogResult(
        ident,
        table.current_snapshot().snapshot_id,
        rows_ok,
        len(files),
        new_snapshot=True,
        rows_added=rows_added,
        rows_removed=rows_removed,
        files_added=len(new_files),
        files_removed=len(removed),
    )
