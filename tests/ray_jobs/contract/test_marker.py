import pytest

from ray_jobs.contract.marker import CommitMarker, CommittedFile, StageStat, marker_problems
from ray_jobs.errors import OutputError


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
        files=(CommittedFile("attempt=a1/part-00000-000.parquet", 8, 100),),
        rejects=(CommittedFile("attempt=a1/rejects-00000.parquet", 2, 50),),
        attempt="a1",
    )
    return CommitMarker(**{**base, **over})


def test_marker_round_trips_and_reconciles():
    m = _marker(rejects_by_reason={"missing object": 2})
    again = CommitMarker.from_json(m.to_json())
    assert again == m and again.reconciles()


@pytest.mark.parametrize(
    "over",
    [
        {"rows_ok": 7},
        {"rows_in": 11},
        {"files": (CommittedFile("attempt=a1/part-00000-000.parquet", 7, 100),)},
        {"rejects": ()},
    ],
)
def test_marker_that_does_not_add_up_does_not_reconcile(over):
    assert not _marker(**over).reconciles()


def test_invalid_marker_is_an_output_error():
    with pytest.raises(OutputError, match="not a valid"):
        CommitMarker.from_json('{"format": "other"}', "x/_SUCCESS")
    with pytest.raises(OutputError):
        CommitMarker.from_json("not json", "x/_SUCCESS")


def test_marker_problems_is_the_one_judge_of_a_commit():
    m = _marker()
    sizes = {"attempt=a1/part-00000-000.parquet": 100, "attempt=a1/rejects-00000.parquet": 50, "attempt=zz/x": 1}
    assert marker_problems(m, sizes, model_id="m", plan_id="p", partition=0, rows_planned=10, embed_dim=4) == []
    assert m.data_uris("s3://b/p=0") == ["s3://b/p=0/attempt=a1/part-00000-000.parquet"]
    problems = marker_problems(
        m, {"attempt=a1/rejects-00000.parquet": 49}, model_id="other", rows_planned=9, embed_dim=8
    )
    assert problems == [
        "rows_in 10 != planned 9",
        "marker names model m plan p partition 0",
        "embedding dims 4/4 != model's 8",
        "listed file attempt=a1/part-00000-000.parquet is missing",
        "listed file attempt=a1/rejects-00000.parquet has 49 bytes, marker says 50",
    ]


STAGE_STATS = (
    StageStat("preprocess", "MapBatches(Preprocessor)", 100, 4, 2.0, 1.5, 1.0, 1, 1.0, 0.0),
    StageStat("stage1", "MapBatches(ModelStage)", 100, 4, 0.5, 0.4, 0.9, 2, 1.0, 0.0, "text:0-3,image:0-1"),
)


def test_marker_with_stage_stats_round_trips():
    marker = _marker(stage_stats=STAGE_STATS)
    back = CommitMarker.from_json(marker.to_json())
    assert back == marker and back.stage_stats[1].layers == "text:0-3,image:0-1"
    assert back.stage_stats[0].rows_per_busy_s == 50.0 and back.stage_stats[1].rows_per_s == pytest.approx(100 / 0.9)


def test_an_older_marker_without_stage_stats_still_parses():
    import json

    data = json.loads(_marker().to_json())
    del data["stage_stats"]
    assert CommitMarker.from_json(json.dumps(data)).stage_stats == ()


def test_a_malformed_stage_stat_is_an_output_error():
    import json

    data = json.loads(_marker(stage_stats=STAGE_STATS).to_json())
    data["stage_stats"][0]["busy_s"] = -1
    with pytest.raises(OutputError, match="busy_s must be >= 0"):
        CommitMarker.from_json(json.dumps(data))
