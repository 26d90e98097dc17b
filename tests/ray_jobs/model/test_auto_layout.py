"""``num_stages: auto``: one stage with N replicas when the model fits a stage's memory, else the
fewest stages that fit; explicit layouts unchanged; the decision printed with its inputs."""

import argparse

import pytest

from ray_jobs.config.declare import ConfigError, add_arguments, from_args
from ray_jobs.config.settings import StageSettings, parse_size
from ray_jobs.errors import StageSpecError
from ray_jobs.model.auto_layout import (
    DEFAULT_CPU_STAGE_MEMORY,
    DEFAULT_GPU_STAGE_MEMORY,
    data_layer_costs,
    decide_layout,
    layer_costs_at,
    memory_limit,
)
from ray_jobs.model.checkpoint import open_checkpoint
from ray_jobs.model.stage_memory import ModelMemory, TowerMemory, WholeModelMemory
from ray_jobs.model.stage_spec import balanced_spec, stage_ranges
from ray_jobs.model.staged import build_layout
from ray_jobs.perf.data_sample import DataShapes

MiB = 1024**2
NO_GPU = lambda: None  # noqa: E731  (this machine's view: no CUDA device)


@pytest.fixture(scope="module")
def ckpt(demo_checkpoint):
    return open_checkpoint(demo_checkpoint)


@pytest.fixture(scope="module")
def memory(ckpt):
    return ModelMemory.of(ckpt, "float32")


def _whole(memory, batch=64):
    whole = memory.whole()
    seq = {t: m.seq_len for t, m in memory.towers.items()}
    return memory.weights(whole) + memory.activations(whole, batch, seq)


def test_a_model_that_fits_runs_as_one_stage_whose_pool_is_the_replicas(ckpt, memory):
    settings = StageSettings(stage_pool=(2, 3))
    decision = decide_layout(ckpt, settings, 64, gpu=NO_GPU)
    assert decision.how == "data parallel" and len(decision.layout.stages) == 1
    stage = decision.layout.stages[0]
    assert {r.tower: (r.start, r.stop) for r in stage.ranges} == {"text": (0, 4), "image": (0, 6)}
    assert (stage.resources.min_pool, stage.resources.max_pool) == (2, 3)
    # read from the weight headers (no torch); the meta modules' figure differs by int64 buffers only
    assert decision.model_bytes == pytest.approx(memory.weights(memory.whole()), rel=0.01)
    assert decision.limit_bytes == DEFAULT_CPU_STAGE_MEMORY
    text = "\n".join(decision.lines())
    for shown in ("data parallel", "1 stage(s)", "pool(s) 2-3", "model weights", "activations", "4.0 GiB"):
        assert shown in text, (shown, text)
    assert decision.to_dict()["replicas"] == "2-3" and decision.to_dict()["stages"] == 1


def test_a_model_that_does_not_fit_uses_the_fewest_stages_that_fit(ckpt, memory):
    whole = _whole(memory)
    limit = int(whole * 0.8)  # the whole model does not fit; two stages do
    decision = decide_layout(ckpt, StageSettings(max_stage_memory=str(limit)), 64, gpu=NO_GPU)
    assert decision.how == "pipeline" and len(decision.layout.stages) == 2
    assert all(b <= limit for b in decision.stage_bytes) and max(decision.stage_bytes) < whole
    assert f"max_stage_memory {limit}" in "\n".join(decision.lines())


def test_the_stage_count_grows_until_every_stage_fits(ckpt, memory):
    counts = ckpt.layer_counts()
    seq = {t: m.seq_len for t, m in memory.towers.items()}
    biggest_layer = max(memory.stage_bytes(stage_ranges(counts, i, i + 1), 64, seq) for i in range(10))
    decision = decide_layout(ckpt, StageSettings(max_stage_memory=str(biggest_layer)), 64, gpu=NO_GPU)
    k = len(decision.layout.stages)
    assert k >= 3 and all(b <= biggest_layer for b in decision.stage_bytes)

    def fits(lo, hi):
        return memory.stage_bytes(stage_ranges(counts, lo, hi), 64, seq) <= biggest_layer

    with pytest.raises(StageSpecError):  # one stage fewer: no split fits
        balanced_spec(k - 1, layer_costs_at(memory, seq), fits=fits)


def test_a_model_no_split_fits_is_refused_naming_the_setting(ckpt):
    with pytest.raises(StageSpecError, match="raise max_stage_memory, lower batch_size"):
        decide_layout(ckpt, StageSettings(max_stage_memory="64KiB"), 64, gpu=NO_GPU)


def test_explicit_layouts_are_used_as_given(ckpt):
    for settings in (StageSettings(num_stages=2), StageSettings(num_stages=3)):
        decision = decide_layout(ckpt, settings, 64, gpu=NO_GPU)
        assert decision.layout == build_layout(ckpt, num_stages=settings.num_stages)
        assert decision.model_bytes is None and decision.how == f"num_stages {settings.num_stages}"
    spec = "text:0-1|text:2-3,image"
    decision = decide_layout(ckpt, StageSettings(stages=spec, max_stage_memory="1KiB"), 64, gpu=NO_GPU)
    assert decision.layout == build_layout(ckpt, spec=spec) and decision.how == "stage spec"
    resolved = StageSettings(auto_stages="text|image")
    assert decide_layout(ckpt, resolved, 64, gpu=NO_GPU).layout == build_layout(ckpt, spec="text|image")


def test_the_stage_memory_comes_from_the_setting_the_gpu_or_the_defaults():
    assert memory_limit(StageSettings(max_stage_memory="8GiB"), NO_GPU) == (8 * 1024**3, "max_stage_memory 8GiB")
    assert memory_limit(StageSettings(), NO_GPU)[0] == DEFAULT_CPU_STAGE_MEMORY
    gpu = StageSettings(stage_num_gpus=0.5)
    limit, source = memory_limit(gpu, lambda: ("H100", 80 * 1024**3))
    assert limit == int(80 * 1024**3 * 0.5 * 0.9) and "H100" in source
    assert memory_limit(gpu, NO_GPU) == (DEFAULT_GPU_STAGE_MEMORY // 2, memory_limit(gpu, NO_GPU)[1])
    assert "no GPU visible" in memory_limit(gpu, NO_GPU)[1]


def test_the_datas_short_captions_make_text_layers_cheaper_and_activations_smaller(ckpt, memory):
    shapes = DataShapes((6, 8, 9, 7), ((640, 480),), 32, False, "4 rows")
    assert shapes.text_seq(64) == 9.0 and shapes.text_seq(1) < 9.0
    data = layer_costs_at(memory, {"text": shapes.text_seq(64)})
    worst = layer_costs_at(memory, {})
    assert data["text"][0] < worst["text"][0] / 3 and data["image"] == worst["image"]
    decision = decide_layout(ckpt, StageSettings(), 64, shapes, gpu=NO_GPU)
    assert decision.data["tokens_per_row"]["text"] == 9.0 and "caption tokens median" in decision.lines()[2]
    assert decision.activation_bytes < decide_layout(ckpt, StageSettings(), 64, gpu=NO_GPU).activation_bytes
    padded = DataShapes((6, 8), (), 32, True, "2 rows")
    assert padded.text_seq(64) == 32.0, "a tower that pads every caption pays the maximum length"


def test_a_twin_towers_fit_is_read_from_its_json_and_weight_headers(ckpt, memory):
    light = WholeModelMemory.of(ckpt, "bfloat16")
    meta = ModelMemory.of(ckpt, "bfloat16")
    assert light.weights == pytest.approx(meta.weights(meta.whole()), rel=0.01)
    seq = {"text": 12.0}
    assert light.memory.activations(light.memory.whole(), 8, seq) == meta.activations(meta.whole(), 8, seq)


def test_a_shared_layer_is_held_once_per_stage():
    albert = TowerMemory("text", 100, ("g0", "g0", "g0", "g0"), {"g0": 1000}, 10, 8, 32, 2, 16)
    assert albert.weights(0, 3) == 100 + 1000 + 10 and albert.weights(1, 2) == 1000
    vit = TowerMemory("image", 100, ("l0", "l1", "l2"), {"l0": 1000, "l1": 1000, "l2": 1000}, 10, 8, 32, 2, 5, 48)
    memory = ModelMemory({"text": albert, "image": vit}, "bfloat16")
    assert memory.weights([("image", 1, 2)]) == 2010
    acts = memory.activations([("image", 0, 0)], 4, {})
    assert acts == (4 * 2 * (5 * (4 * 8 + 32) + 2 * 25) + 4 * 2 * 5 * 8 + 4 * 48 * 4)


def test_num_stages_takes_auto_or_a_number_and_refuses_anything_else():
    assert StageSettings().num_stages == "auto" and StageSettings().auto
    assert StageSettings(num_stages="3").num_stages == 3 and not StageSettings(num_stages=3).auto
    assert not StageSettings(num_stages="auto", stages="text|image").auto
    for bad, says in (("lots", "expected auto or a whole number"), (0, ">= 1"), (65, "<= 64")):
        with pytest.raises(ConfigError, match=says):
            StageSettings(num_stages=bad)
    with pytest.raises(ConfigError, match="auto_stages"):
        StageSettings(num_stages=2, auto_stages="text|image")
    parser = argparse.ArgumentParser()
    add_arguments(parser, StageSettings)
    assert from_args(StageSettings, parser.parse_args(["--num-stages", "auto"])).num_stages == "auto"
    assert from_args(StageSettings, parser.parse_args(["--num-stages", "4"])).num_stages == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["--num-stages", "many"])


def test_memory_sizes_parse_in_bytes_and_units():
    assert [parse_size(t) for t in ("4096", "8GiB", "512MiB", "4GB", "1.5G", "2KiB")] == [
        4096,
        8 * 1024**3,
        512 * MiB,
        4 * 10**9,
        15 * 10**8,
        2048,
    ]
    with pytest.raises(ConfigError, match="max_stage_memory"):
        StageSettings(max_stage_memory="4 pigs")
    assert StageSettings(max_stage_memory="1MiB").max_stage_memory_bytes == MiB


def test_rebalancing_spreads_a_stage_by_the_layers_costs_at_the_datas_lengths(ckpt):
    short = data_layer_costs(ckpt, "float32", 8.0)
    assert short["text"][0] < ckpt.layer_costs()["text"][0] / 3
    assert data_layer_costs(ckpt, "float32", None)["text"] == ckpt.layer_costs()["text"], "max length: as declared"
