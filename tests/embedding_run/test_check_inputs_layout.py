"""``check_inputs`` decides the run's stage layout (``num_stages: auto``), prints the decision with
its inputs, and every job gets the spec as ``--auto-stages``; an integer stays as given."""

from __future__ import annotations

import json

import pytest

from embedding_run import steps
from embedding_run.config import RunConfig, build_params
from embedding_run.deployment import load_defaults
from embedding_run.jobs import embed_argv


@pytest.fixture
def params(monkeypatch, demo_assets, tmp_path, tmp_path_factory):
    root = str(tmp_path_factory.getbasetemp())
    monkeypatch.setenv("EMB_DEPLOYMENT_ALLOWED_URI_PREFIXES", json.dumps(["s3://", root]))
    monkeypatch.delenv("EMB_CATALOG_CONN_ID", raising=False)
    defaults = {name: p.resolve(suppress_exception=True) for name, p in build_params(load_defaults()).items()}
    conf = {"manifest_uri": demo_assets.manifest, "output_uri": str(tmp_path / "out"), "model_uri": demo_assets.model}
    return {**defaults, **conf}


def test_check_inputs_prints_the_auto_decision_and_its_inputs(params, capsys):
    checked = steps.check_inputs({**params, "max_stage_memory": "4MiB"})
    out = capsys.readouterr().out
    assert "layout: pipeline: 2 stage(s)" in out and "a stage may hold 4.0 MiB (max_stage_memory 4MiB)" in out
    assert "data sample: 32 rows of 4 row group(s) (seed 0): caption tokens median" in out
    layout = checked["layout"]
    assert layout["how"] == "pipeline" and layout["stages"] == 2 and layout["spec"] == checked["stages"]
    assert layout["model_bytes"] + layout["activation_bytes"] > layout["limit_bytes"] >= max(layout["stage_bytes"])
    argv = embed_argv(RunConfig.from_dict(checked["config"]), "/o/plan.json", 0, "python", stages=checked["stages"])
    assert "--num-stages=auto" in argv and f"--auto-stages={checked['stages']}" in argv
    assert not any(a.startswith("--stages=") for a in argv)


def test_an_integer_num_stages_is_used_as_given(params, capsys):
    checked = steps.check_inputs({**params, "num_stages": 2})
    assert "layout: num_stages 2: 2 stage(s)" in capsys.readouterr().out
    argv = embed_argv(RunConfig.from_dict(checked["config"]), "/o/plan.json", 0, "python", stages=checked["stages"])
    assert f"--stages={checked['stages']}" in argv and not any(a.startswith("--auto-stages") for a in argv)
