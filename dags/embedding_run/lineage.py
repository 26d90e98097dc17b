"""What a run read and what it wrote, once: for OpenLineage and for the table's Asset event.

:func:`run_lineage` describes the run's input (the manifest) and output (the Iceberg table:
its schema, the rows it holds and the snapshot this run committed) as plain JSON;
:func:`operator_lineage` turns that same description into the OpenLineage provider's
:class:`~airflow.providers.openlineage.extractors.OperatorLineage`, which the catalog task
returns from ``get_openlineage_facets_on_complete``. The Asset event's ``extra["lineage"]``
is the JSON itself, so a data catalog (Marquez, DataHub) and an Asset-triggered DAG see the
same facts. No credentials: the catalog is named by its redacted URI.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

import attrs

#: the custom dataset facet naming the Iceberg snapshot a run committed
SNAPSHOT_FACET = "icebergSnapshot"


def dataset_name(uri: str) -> tuple[str, str]:
    """OpenLineage ``(namespace, name)`` of a storage URI: ``s3://bucket`` and the key, or
    ``file`` and the absolute path for a local path."""
    parts = urlsplit(uri)
    if parts.scheme and parts.scheme != "file" and parts.netloc:
        return f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/") or "/"
    path = parts.path if parts.scheme == "file" else uri
    return "file", os.path.abspath(path)


def table_schema(embed_dim: int) -> list[dict[str, str]]:
    """The embeddings table's columns (name and Arrow type), as the data plane writes them."""
    from ray_jobs.contract.layout import embeddings_schema

    return [{"name": f.name, "type": str(f.type)} for f in embeddings_schema(embed_dim, embed_dim)]


def run_lineage(checked: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The run's input and output from ``check_inputs``' result and the catalog step's result."""
    manifest = checked["config"]["manifest_uri"]
    if manifest.startswith("iceberg://"):  # a manifest table: named in its catalog, as the output table is
        in_ns, in_name = checked.get("manifest_catalog_uri") or "iceberg", manifest.removeprefix("iceberg://")
    else:
        in_ns, in_name = dataset_name(manifest)
    return {
        "inputs": [{"namespace": in_ns, "name": in_name, "uri": manifest, "rows": checked.get("rows")}],
        "outputs": [
            {
                "namespace": result.get("catalog_uri") or "iceberg",
                "name": result["table"],
                "schema": table_schema(int(checked["embed_dim"])),
                "row_count": result.get("rows"),
                "snapshot_id": result.get("snapshot_id"),
                "new_snapshot": result.get("new_snapshot"),
                "model_id": result.get("model_id"),
            }
        ],
    }


def _snapshot_facet_class():
    from airflow.providers.common.compat.openlineage.facet import DatasetFacet

    @attrs.define
    class IcebergSnapshotDatasetFacet(DatasetFacet):
        """The Iceberg snapshot this run committed (or found committed) in the table."""

        # OpenLineage facet fields are camelCase
        snapshotId: str | None = None
        newSnapshot: bool | None = None
        modelId: str | None = None

    return IcebergSnapshotDatasetFacet


def operator_lineage(lineage: dict[str, Any]):
    """:func:`run_lineage`'s description as the OpenLineage provider's ``OperatorLineage``."""
    from airflow.providers.common.compat.openlineage.facet import (
        InputDataset,
        OutputDataset,
        OutputStatisticsOutputDatasetFacet,
        SchemaDatasetFacet,
        SchemaDatasetFacetFields,
    )
    from airflow.providers.openlineage.extractors import OperatorLineage

    snapshot_facet = _snapshot_facet_class()
    inputs = [InputDataset(namespace=i["namespace"], name=i["name"]) for i in lineage["inputs"]]
    outputs = []
    for o in lineage["outputs"]:
        fields = [SchemaDatasetFacetFields(name=f["name"], type=f["type"]) for f in o["schema"]]
        facets = {
            "schema": SchemaDatasetFacet(fields=fields),
            SNAPSHOT_FACET: snapshot_facet(
                snapshotId=None if o["snapshot_id"] is None else str(o["snapshot_id"]),
                newSnapshot=o.get("new_snapshot"),
                modelId=o.get("model_id"),
            ),
        }
        stats = {}
        if o.get("row_count") is not None:
            stats["outputStatistics"] = OutputStatisticsOutputDatasetFacet(rowCount=int(o["row_count"]))
        outputs.append(OutputDataset(namespace=o["namespace"], name=o["name"], facets=facets, outputFacets=stats))
    return OperatorLineage(inputs=inputs, outputs=outputs)
