import pyarrow as pa
import pytest

from ray_jobs.contract import manifest_schema
from ray_jobs.errors import ManifestError


def _schema(**over):
    fields = {"id": pa.string(), "text": pa.string(), "image_uri": pa.string(), **over}
    return pa.schema([(k, v) for k, v in fields.items() if v is not None])


def test_valid_schema_with_large_strings_and_extra_columns_passes():
    manifest_schema.check_manifest_schema(_schema(text=pa.large_string(), extra=pa.float64()), "m.parquet")


@pytest.mark.parametrize("column", ["id", "text", "image_uri"])
def test_missing_required_column_names_file_and_column(column):
    with pytest.raises(ManifestError, match=rf"m\.parquet.*'{column}'.*missing"):
        manifest_schema.check_manifest_schema(_schema(**{column: None}), "m.parquet")


def test_wrong_type_names_column_and_expected_type():
    with pytest.raises(ManifestError, match=r"'image_uri' has type int64, expected string"):
        manifest_schema.check_manifest_schema(_schema(image_uri=pa.int64()), "m.parquet")
    with pytest.raises(ManifestError, match=r"'image_bytes' has type string, expected int64"):
        manifest_schema.check_manifest_schema(_schema(image_bytes=pa.string()), "m.parquet")
