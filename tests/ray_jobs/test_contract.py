import pyarrow as pa
import pytest

from ray_jobs import contract
from ray_jobs.errors import ManifestError, OutputError


def _schema(**over):
    fields = {"id": pa.string(), "text": pa.string(), "image_uri": pa.string(), **over}
    return pa.schema([(k, v) for k, v in fields.items() if v is not None])


def test_valid_schema_with_large_strings_and_extra_columns_passes():
    contract.check_manifest_schema(_schema(text=pa.large_string(), extra=pa.float64()), "m.parquet")


@pytest.mark.parametrize("column", ["id", "text", "image_uri"])
def test_missing_required_column_names_file_and_column(column):
    with pytest.raises(ManifestError, match=rf"m\.parquet.*'{column}'.*missing"):
        contract.check_manifest_schema(_schema(**{column: None}), "m.parquet")


def test_wrong_type_names_column_and_expected_type():
    with pytest.raises(ManifestError, match=r"'image_uri' has type int64, expected string"):
        contract.check_manifest_schema(_schema(image_uri=pa.int64()), "m.parquet")
    with pytest.raises(ManifestError, match=r"'image_bytes' has type string, expected int64"):
        contract.check_manifest_schema(_schema(image_bytes=pa.string()), "m.parquet")


def test_layout_is_deterministic_and_zero_padded():
    d = contract.partition_dir("s3://b/out/", "tiny-abc", "p123", 7)
    assert d == "s3://b/out/embeddings/model=tiny-abc/plan=p123/partition=00007"
    assert contract.part_file_name(3) == "part-00003-000.parquet"
    assert contract.part_file_name(3, 12) == "part-00003-012.parquet"
    assert contract.rejects_file_name(7) == "rejects-00007.parquet"
    assert contract.attempt_dir_name("20261129T082300Z-1a2b3c4d") == "attempt=20261129T082300Z-1a2b3c4d"
    assert contract.new_attempt_id() != contract.new_attempt_id()
    with pytest.raises(ValueError):
        contract.attempt_dir_name("a/../b")
    assert contract.plan_uri("/o", "run1") == "/o/runs/run1/plan.json"
    with pytest.raises(ValueError):
        contract.partition_dir("/o", "m", "p", -1)


def test_ids_are_stable_and_sensitive_to_inputs():
    files = [contract.FileFingerprint("b", 2, 20), contract.FileFingerprint("a", 1, 10)]
    fp = contract.manifest_fingerprint(files)
    assert fp == contract.manifest_fingerprint(list(reversed(files)))
    assert fp != contract.manifest_fingerprint(files[:1])
    rewritten = [contract.FileFingerprint("b", 2, 20, version="etag-2"), files[1]]
    assert contract.manifest_fingerprint(rewritten) != fp, "same size and rows, new content: a new plan"
    assert contract.make_plan_id(fp, {"rows": 10}) == contract.make_plan_id(fp, {"rows": 10})
    assert contract.make_plan_id(fp, {"rows": 10}) != contract.make_plan_id(fp, {"rows": 11})
    assert contract.make_model_id("Tiny ALBERT/ViT", "abcdef0123456789") == "tiny_albert_vit-abcdef0123"


def _marker(**over):
    base = dict(
        model_id="m",
        plan_id="p",
        partition=0,
        rows_in=10,
        rows_ok=8,
        rows_rejected=2,
        text_dim=4,
        image_dim=4,
        files=(contract.CommittedFile("attempt=a1/part-00000-000.parquet", 8, 100),),
        rejects=(contract.CommittedFile("attempt=a1/rejects-00000.parquet", 2, 50),),
        attempt="a1",
    )
    return contract.CommitMarker(**{**base, **over})


def test_marker_round_trips_and_reconciles():
    m = _marker(rejects_by_reason={"missing object": 2})
    again = contract.CommitMarker.from_json(m.to_json())
    assert again == m and again.reconciles()


@pytest.mark.parametrize(
    "over",
    [
        {"rows_ok": 7},
        {"rows_in": 11},
        {"files": (contract.CommittedFile("attempt=a1/part-00000-000.parquet", 7, 100),)},
        {"rejects": ()},
    ],
)
def test_marker_that_does_not_add_up_does_not_reconcile(over):
    assert not _marker(**over).reconciles()


def test_invalid_marker_is_an_output_error():
    with pytest.raises(OutputError, match="not a valid"):
        contract.CommitMarker.from_json('{"format": "other"}', "x/_SUCCESS")
    with pytest.raises(OutputError):
        contract.CommitMarker.from_json("not json", "x/_SUCCESS")


def test_marker_problems_is_the_one_judge_of_a_commit():
    m = _marker()
    sizes = {"attempt=a1/part-00000-000.parquet": 100, "attempt=a1/rejects-00000.parquet": 50, "attempt=zz/x": 1}
    assert (
        contract.marker_problems(m, sizes, model_id="m", plan_id="p", partition=0, rows_planned=10, embed_dim=4) == []
    )
    assert m.data_uris("s3://b/p=0") == ["s3://b/p=0/attempt=a1/part-00000-000.parquet"]
    problems = contract.marker_problems(
        m, {"attempt=a1/rejects-00000.parquet": 49}, model_id="other", rows_planned=9, embed_dim=8
    )
    assert problems == [
        "rows_in 10 != planned 9",
        "marker names model m plan p partition 0",
        "embedding dims 4/4 != model's 8",
        "listed file attempt=a1/part-00000-000.parquet is missing",
        "listed file attempt=a1/rejects-00000.parquet has 49 bytes, marker says 50",
    ]


def test_default_dataset_name_is_readable_and_tells_manifests_apart():
    a = contract.default_dataset_name("s3://bucket/nightly/Products/")
    assert a == contract.default_dataset_name("s3://bucket/nightly/Products") and a.startswith("products_")
    assert contract.default_dataset_name("s3://other/nightly/Products") != a
    assert contract.default_dataset_name("/data/manifest.parquet").startswith("manifest_")


STAGE_STATS = (
    contract.StageStat("preprocess", "MapBatches(Preprocessor)", 100, 4, 2.0, 1.5, 1.0, 1, 1.0, 0.0),
    contract.StageStat("stage1", "MapBatches(ModelStage)", 100, 4, 0.5, 0.4, 0.9, 2, 1.0, 0.0, "text:0-3,image:0-1"),
)


def test_marker_with_stage_stats_round_trips():
    marker = _marker(stage_stats=STAGE_STATS)
    back = contract.CommitMarker.from_json(marker.to_json())
    assert back == marker and back.stage_stats[1].layers == "text:0-3,image:0-1"
    assert back.stage_stats[0].rows_per_busy_s == 50.0 and back.stage_stats[1].rows_per_s == pytest.approx(100 / 0.9)


def test_an_older_marker_without_stage_stats_still_parses():
    import json

    data = json.loads(_marker().to_json())
    del data["stage_stats"]
    assert contract.CommitMarker.from_json(json.dumps(data)).stage_stats == ()


def test_a_malformed_stage_stat_is_an_output_error():
    import json

    data = json.loads(_marker(stage_stats=STAGE_STATS).to_json())
    data["stage_stats"][0]["busy_s"] = -1
    with pytest.raises(OutputError, match="busy_s must be >= 0"):
        contract.CommitMarker.from_json(json.dumps(data))
