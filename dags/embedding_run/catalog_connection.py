"""The Iceberg catalog a run registers in, from an Airflow connection, its secret kept secret.

The form names a connection id (one the deployment lists); the connection holds the
credentials. :func:`resolve_catalog` builds the URL pyiceberg opens *and* a redacted form
without credentials: only the redacted form may leave the task (XCom, the Asset event, the
report, log lines). The password and the full URL are registered with Airflow's secrets
masker, so a library that prints them anyway prints ``***``.

Connection shapes (``conn_type``):

* ``postgres`` (or ``postgresql``): host, port, login, password, schema = database →
  ``postgresql+psycopg2://…``; ``extra.sqlalchemy_scheme`` picks another driver.
* ``mysql``: likewise, ``mysql+pymysql://…`` by default.
* ``sqlite``: host = the database file's path.
* any type with ``extra.pyiceberg_catalog = NAME``: a catalog configured the pyiceberg way
  (``PYICEBERG_CATALOG__NAME__*`` in the deployment's environment: REST, Glue, Hive).

Without a connection the embedded default stays: SQLite next to a local output (or in
``AIRFLOW_HOME`` for a remote one).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

_SCHEMES = {"postgres": "postgresql+psycopg2", "postgresql": "postgresql+psycopg2", "mysql": "mysql+pymysql"}
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class CatalogConnectionError(ValueError):
    """The catalog connection is missing or of a shape this pipeline cannot open."""


@dataclass(frozen=True)
class CatalogTarget:
    """Where the catalog is. ``uri`` may hold a password: use it only to open the catalog."""

    uri: str
    redacted_uri: str
    conn_id: str | None = None

    def __post_init__(self) -> None:
        if not self.uri or not self.redacted_uri:
            raise ValueError("a catalog target needs a URI and its redacted form")

    def __repr__(self) -> str:  # never the credentials, even in a traceback's locals
        return f"CatalogTarget(redacted_uri={self.redacted_uri!r}, conn_id={self.conn_id!r})"

    def public(self) -> dict[str, Any]:
        """What may go to XCom, the Asset event and the report."""
        return {"catalog_uri": self.redacted_uri, "catalog_conn_id": self.conn_id}


#: executors whose tasks run on the scheduler's machine: a file in ``AIRFLOW_HOME`` outlives the task
SAME_MACHINE_EXECUTORS = frozenset({"LocalExecutor", "SequentialExecutor", "DebugExecutor"})


def configured_executor() -> str:
    """Airflow's ``[core] executor`` setting as configured in this process."""
    try:
        from airflow.sdk.configuration import conf
    except ImportError:  # an Airflow without the task SDK's configuration module
        from airflow.configuration import conf
    return conf.get("core", "executor", fallback="LocalExecutor") or "LocalExecutor"


def remote_executors(setting: str) -> list[str]:
    """The executors in *setting* (``[core] executor``: one name, or a comma list of names,
    ``alias:module.path`` entries or module paths) whose workers are not the scheduler's
    machine. An executor this list does not know counts as remote."""
    out = []
    for entry in (part.strip() for part in setting.replace(";", ",").split(",")):
        if entry and entry.split("=")[-1].split(":")[-1].rsplit(".", 1)[-1] not in SAME_MACHINE_EXECUTORS:
            out.append(entry)
    return out


def check_catalog_lasts(conn_id: str | None, executor: str) -> bool:
    """Whether this deployment's runs must name a catalog connection: True under an executor
    whose tasks run on other machines (KubernetesExecutor, CeleryExecutor, EdgeExecutor, ...),
    where the embedded SQLite catalog (in ``AIRFLOW_HOME`` for a remote output) would live in
    one task's filesystem and vanish with it. Then an empty default *conn_id* raises
    :class:`CatalogConnectionError`, naming ``catalog_conn_id``."""
    remote = remote_executors(executor)
    if remote and not conn_id:
        raise CatalogConnectionError(
            f"catalog_conn_id is empty, but the executor ({', '.join(remote)}) runs tasks on other machines: "
            "the embedded SQLite catalog would live in one task's filesystem (AIRFLOW_HOME) and vanish with it. "
            "Set EMB_CATALOG_CONN_ID to a catalog connection (postgres, mysql, or extra.pyiceberg_catalog) "
            "and list it in deployment.catalog_conn_ids"
        )
    return bool(remote)


def embedded_default(output_uri: str) -> CatalogTarget:
    from ray_jobs import storage

    if not storage.is_remote(output_uri):
        uri = f"sqlite:///{storage.filesystem_for(output_uri)[1]}/iceberg_catalog.db"
    else:
        home = os.environ.get("AIRFLOW_HOME", os.path.expanduser("~/airflow"))
        uri = f"sqlite:///{home}/embeddings_iceberg_catalog.db"
    return CatalogTarget(uri=uri, redacted_uri=uri)


def from_connection(conn: Any, conn_id: str) -> CatalogTarget:
    """The target a connection describes (``conn``: an Airflow ``Connection``)."""
    extra = conn.extra_dejson if conn.extra else {}
    name = extra.get("pyiceberg_catalog")
    if name:
        if not isinstance(name, str) or not _NAME.match(name):
            raise CatalogConnectionError(f"connection {conn_id}: extra.pyiceberg_catalog {name!r} is not a name")
        uri = f"pyiceberg:{name}"
        return CatalogTarget(uri=uri, redacted_uri=uri, conn_id=conn_id)
    conn_type = (conn.conn_type or "").lower()
    if conn_type == "sqlite":
        if not conn.host:
            raise CatalogConnectionError(f"connection {conn_id}: a sqlite catalog needs the database path as host")
        uri = f"sqlite:///{conn.host}"
        return CatalogTarget(uri=uri, redacted_uri=uri, conn_id=conn_id)
    scheme = extra.get("sqlalchemy_scheme") or _SCHEMES.get(conn_type)
    if not scheme:
        raise CatalogConnectionError(
            f"connection {conn_id}: conn_type {conn.conn_type!r} is not a catalog this pipeline opens "
            f"(use {sorted({*_SCHEMES, 'sqlite'})}, or set extra.pyiceberg_catalog)"
        )
    if not conn.host:
        raise CatalogConnectionError(f"connection {conn_id}: no host")
    from sqlalchemy.engine import URL

    url = URL.create(
        drivername=scheme,
        username=conn.login or None,
        password=conn.password or None,
        host=conn.host,
        port=conn.port or None,
        database=conn.schema or None,
    )
    full = url.render_as_string(hide_password=False)
    redacted = URL.create(drivername=scheme, host=conn.host, port=conn.port or None, database=conn.schema or None)
    target = CatalogTarget(uri=full, redacted_uri=redacted.render_as_string(), conn_id=conn_id)
    if conn.password:
        _mask(conn.password, quote(conn.password, safe=""), full)
    return target


def _mask(*secrets: str) -> None:
    from airflow.sdk.log import mask_secret

    for secret in dict.fromkeys(secrets):
        mask_secret(secret)


def resolve_catalog(conn_id: str | None, output_uri: str) -> CatalogTarget:
    """The run's catalog: the connection's (read now, at task run time), or the embedded default."""
    if not conn_id:
        return embedded_default(output_uri)
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        raise CatalogConnectionError(f"catalog connection {conn_id!r} does not exist") from None
    return from_connection(conn, conn_id)
