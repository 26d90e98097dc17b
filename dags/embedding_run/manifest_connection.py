"""The catalog of a manifest that is an Iceberg table, from an Airflow connection.

``manifest_uri = iceberg://<namespace>.<table>`` is read through the connection the
``manifest_conn_id`` param names (one of ``deployment.manifest_conn_ids``). The connection has
the shapes of the output catalog's (:mod:`embedding_run.catalog_connection`: postgres, mysql,
sqlite, or ``extra.pyiceberg_catalog``) and is turned into a URL by the same function, which
registers its password with Airflow's secrets masker; ``extra.catalog_name`` names the SQL
catalog the table is listed under (default ``default``).

The connection is read at task run time by the tasks that read the manifest (``check_inputs``
and ``plan``, in the Airflow worker); the URL stays in that process. Only the redacted form
leaves the task. The embed jobs never open the catalog: the plan names the table's data files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from embedding_run.catalog_connection import CatalogConnectionError, CatalogTarget, from_connection

_CATALOG_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclass(frozen=True)
class ManifestTarget:
    """The manifest table's catalog: ``target.uri`` may hold a password, use it only to open it."""

    target: CatalogTarget
    catalog_name: str | None = None

    def catalog(self):
        """The data plane's :class:`~ray_jobs.planning.iceberg_manifest.ManifestCatalog`."""
        from ray_jobs.planning.iceberg_manifest import ManifestCatalog

        return ManifestCatalog(self.target.uri, self.catalog_name)

    def public(self) -> dict[str, Any]:
        """What may go to XCom and the logs."""
        return {
            "manifest_catalog_uri": self.target.redacted_uri,
            "manifest_conn_id": self.target.conn_id,
            "manifest_catalog_name": self.catalog_name,
        }


def manifest_target(conn_id: str | None, manifest_uri: str) -> ManifestTarget | None:
    """The catalog of *manifest_uri* when it is an ``iceberg://`` table (None for a Parquet
    manifest: *conn_id* is not used then). Raises :class:`CatalogConnectionError` naming the
    param when the table has no connection or the connection cannot name a catalog."""
    from ray_jobs.planning.iceberg_manifest import is_table_uri

    if not is_table_uri(manifest_uri):
        return None
    if not conn_id:
        raise CatalogConnectionError(
            f"param manifest_uri {manifest_uri} is an Iceberg table: set manifest_conn_id to the connection of "
            "its catalog (one of deployment.manifest_conn_ids)"
        )
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        raise CatalogConnectionError(f"manifest connection {conn_id!r} does not exist") from None
    return from_manifest_connection(conn, conn_id)


def from_manifest_connection(conn: Any, conn_id: str) -> ManifestTarget:
    """The target a connection describes (``conn``: an Airflow ``Connection``)."""
    target = from_connection(conn, conn_id)
    extra = conn.extra_dejson if conn.extra else {}
    name = extra.get("catalog_name")
    if name is not None and not (isinstance(name, str) and _CATALOG_NAME.match(name)):
        raise CatalogConnectionError(f"connection {conn_id}: extra.catalog_name {name!r} is not a name")
    return ManifestTarget(target, name)
