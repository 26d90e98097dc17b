import pytest

from ray_jobs.errors import StageSpecError
from ray_jobs.model.stage_spec import StageResources, balanced_spec, parse_spec, resolve

COUNTS = {"text": 12, "image": 12}


def test_reference_deployment_spec():
    layout = resolve(parse_spec("text@gpus=1|image:0-5@gpus=1|image:6-11@gpus=1,pool=1-3"), COUNTS)
    assert len(layout.stages) == 3
    s1, s2, s3 = layout.stages
    assert layout.owns_embed(s1, "text") and layout.owns_head(s1, "text")
    assert layout.owns_embed(s2, "image") and not layout.owns_head(s2, "image")
    assert layout.owns_head(s3, "image") and not layout.owns_embed(s3, "image")
    assert s3.resources == StageResources(num_cpus=1.0, num_gpus=1.0, min_pool=1, max_pool=3)
    # the canonical form parses back to the same layout
    assert resolve(parse_spec(layout.spec()), COUNTS) == layout


def test_towers_may_share_a_stage_and_fractional_gpus_are_allowed():
    layout = resolve(parse_spec("text:0-5@gpus=0.5|text:6-11,image@gpus=0.5"), COUNTS)
    assert [r.tower for r in layout.stages[1].ranges] == ["text", "image"]
    assert layout.stages[0].resources.num_gpus == 0.5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("text|image:0-5", r"covers image layers 0-5 of 0-11"),
        ("text|image:1-11", r"must continue at 0, got 1"),
        ("text|image:0-5|image:5-11", r"must continue at 6, got 5"),
        ("text|image:0-12", r"outside 0-11"),
        ("text,text|image", r"names the text tower twice"),
        ("audio|image", r"cannot parse 'audio'"),
        ("text@tpus=1|image", r"unknown stage resource 'tpus'"),
        ("text@gpus=x|image", r"bad stage resource value"),
        ("text@pool=3-1|image", r"1 <= min <= max"),
        ("text@gpus=1.5|image", r"gpus above 1 must be whole"),
        ("text@cpus=0|image", r"cpus and gpus are both 0"),
        ("", r"empty"),
        ("text||image", r"stage 2 has no layers"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(StageSpecError, match=message):
        resolve(parse_spec(spec), COUNTS)


def test_defaults_apply_where_a_stage_gives_no_resources():
    defaults = StageResources(num_cpus=2, num_gpus=0.25, min_pool=2, max_pool=4)
    layout = resolve(parse_spec("text|image@gpus=1", defaults), COUNTS)
    assert layout.stages[0].resources == defaults
    assert layout.stages[1].resources.num_gpus == 1 and layout.stages[1].resources.min_pool == 2


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7, 24])
def test_balanced_split_covers_every_layer_once(k):
    costs = {"text": [1.0] * 12, "image": [2.0] * 12}
    layout = resolve([(r, StageResources()) for r in balanced_spec(k, costs)], COUNTS)
    assert len(layout.stages) == k


def test_balanced_split_minimises_the_largest_stage():
    costs = {"text": [1.0] * 12, "image": [2.0] * 12}  # total 36
    stages = balanced_spec(3, costs)
    loads = [sum(costs[t][i] for t, a, b in s for i in range(a, b + 1)) for s in stages]
    assert max(loads) == 12.0
    assert stages[0] == [("text", 0, 11)]


def test_balanced_split_rejects_more_stages_than_layers():
    with pytest.raises(StageSpecError, match="between 1 and the model's 24 layers"):
        balanced_spec(25, {"text": [1.0] * 12, "image": [1.0] * 12})
