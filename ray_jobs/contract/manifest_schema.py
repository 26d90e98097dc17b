"""The manifest schema: the columns a manifest file must have, the optional ones the data
plane understands, and the check every manifest file's footer goes through."""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa

from ray_jobs.errors import ManifestError

#: Required manifest columns and a description of the accepted Arrow types.
REQUIRED_COLUMNS: Mapping[str, str] = {"id": "string", "text": "string", "image_uri": "string"}
#: Optional columns the data plane understands.
OPTIONAL_COLUMNS: Mapping[str, str] = {"image_bytes": "int64"}


def _type_ok(expected: str, actual: pa.DataType) -> bool:
    if expected == "string":
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if expected == "int64":
        return pa.types.is_integer(actual)
    raise AssertionError(expected)


def check_manifest_schema(schema: pa.Schema, source: str) -> None:
    """Raise :class:`ManifestError` naming the file and column when *schema* breaks the contract."""
    for name, expected in {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}.items():
        idx = schema.get_field_index(name)
        if idx < 0:
            if name in REQUIRED_COLUMNS:
                raise ManifestError(
                    f"manifest file {source}: required column {name!r} ({expected}) is missing; "
                    f"found columns {schema.names}"
                )
            continue
        actual = schema.field(idx).type
        if not _type_ok(expected, actual):
            raise ManifestError(f"manifest file {source}: column {name!r} has type {actual}, expected {expected}")
