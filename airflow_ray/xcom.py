"""The deployment's XCom class, from the Task SDK's public API.

``airflow.sdk.BaseXCom`` is public, as is ``airflow.sdk.conf``; the class a deployment
configures (``[core] xcom_backend``, a ``BaseXCom`` subclass) is resolved from them here the
way the Task SDK resolves it, so values are read and written as every task reads and writes them.
"""

from __future__ import annotations


def xcom_backend():
    """The configured XCom class (``BaseXCom`` unless ``[core] xcom_backend`` names another)."""
    from airflow.sdk import BaseXCom, conf

    backend = conf.getimport("core", "xcom_backend", fallback=None)
    if backend is None:
        return BaseXCom
    if not (isinstance(backend, type) and issubclass(backend, BaseXCom)):
        raise TypeError(f"[core] xcom_backend {backend!r} is not a subclass of BaseXCom")
    return backend
