"""`tune` and `capacity` on the command line; rates read from tune output, a marker and a report."""

import json

import pytest

from ray_jobs.cli import main
from ray_jobs.contract.marker import CommitMarker, CommittedFile, StageStat
from ray_jobs.errors import UsageError
from ray_jobs.perf.rate_sources import rates_from_json

TUNE = {
    "format": "ray-jobs-tune/1",
    "embed_dim": 32,
    "stages": [
        {"name": "stage1", "rows_per_s": 400.0, "num_cpus": 1, "num_gpus": 0, "layers": "text:0-3"},
        {"name": "stage2", "rows_per_s": 200.0, "num_cpus": 1, "num_gpus": 0, "layers": "image:0-5"},
    ],
}


def test_rates_from_a_marker_and_from_tune_output():
    stats = (
        StageStat("preprocess", "MapBatches(Preprocessor)", 60, 2, 1.0, 1.0, 1.0, 1, 1.0, 0.0),
        StageStat("stage1", "MapBatches(ModelStage)", 60, 2, 0.5, 0.5, 1.0, 1, 1.0, 0.0, "text:0-3,image:0-5"),
    )
    marker = CommitMarker("m", "p", 0, 1, 1, 0, 32, 32, (CommittedFile("a/x", 1, 1),), (), stage_stats=stats)
    got = rates_from_json(marker.to_json(), "_SUCCESS")
    assert got.source == "marker" and [r.rows_per_s for r in got.rates] == [60.0, 120.0] and got.embed_dim == 32
    assert [r.name for r in rates_from_json(json.dumps(TUNE), "t.json").rates] == ["stage1", "stage2"]
    with pytest.raises(UsageError, match="no stage_stats"):
        rates_from_json(CommitMarker("m", "p", 0, 0, 0, 0, 1, 1, (), ()).to_json(), "_SUCCESS")
    with pytest.raises(UsageError, match="not a run report"):
        rates_from_json("{}", "x.json")


def test_capacity_prints_nodes_partitions_wall_time_and_cost(tmp_path, capsys):
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(TUNE))
    argv = ["capacity", "--rates", str(path), "--rows", "10000000", "--bytes", str(10**12)]
    argv += ["--gpus-per-node", "0", "--cpus-per-node", "8", "--preprocess-rows-per-s", "100", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rates_source"] == "tune" and out["partitions"] == 10 and out["fits_window"]
    assert {s["name"]: s["actors_per_replica"] for s in out["stages"]} == {"preprocess": 3, "stage1": 1, "stage2": 2}
    assert out["replica_rows_per_s"] == 300.0  # 6 usable CPUs and out["gets"] > 10_000_000


def test_capacity_without_a_size_exits_2(tmp_path, capsys):
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(TUNE))
    assert main(["capacity", "--rates", str(path)]) == 2
    assert "--rows" in capsys.readouterr().err


@pytest.mark.integration
def test_tune_times_every_layer_of_the_demo_checkpoint(demo_checkpoint, capsys):
    assert main(["tune", "--model", demo_checkpoint, "--stages", "3", "--batch-size", "8", "--batches", "2"]) == 0
    capsys.readouterr()
    assert main(["tune", "--model", demo_checkpoint, "--stages", "3", "--batch-size", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    layers = out["seconds_per_row"]["layers"]
    assert len(layers["text"]) == 4 and len(layers["image"]) == 6 and all(c > 0 for v in layers.values() for c in v)
    assert len(out["stages"]) == 3 and out["spec"].count("|") == 2
    assert out["rows_per_s"] == pytest.approx(min(s["rows_per_s"] for s in out["stages"]), rel=1e-3)
    assert out["rows_per_s"] > out["unsplit_rows_per_s"]


def test_a_module_shared_by_several_layers_is_charged_call_by_call():
    """ALBERT shares one layer module across its layers (num_hidden_groups=1, the real
    ALBERT-base): each call of the shared module is charged to its own layer, in order
    (`tune` crashed with a KeyError on such checkpoints)."""
    import torch

    from ray_jobs.perf.layer_profile import _Timer

    shared, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    timer = _Timer(cuda=False)
    for layer in range(3):
        timer.watch(shared, ("text", layer))
    timer.watch(head, ("text", "head"))
    x = torch.ones(1, 4)
    for _ in range(2):  # two forwards: the k-th call of each forward goes to layer k
        h = x
        for _layer in range(3):
            h = shared(h)
        head(h)
    assert set(timer.totals) == {("text", 0), ("text", 1), ("text", 2), ("text", "head")}
    assert all(v > 0 for v in timer.totals.values()) and timer.calls[id(shared)] == 6
    timer.reset()
    assert timer.totals == {} and timer.calls[id(shared)] == 0
    timer.close()


def test_capacity_prints_the_nightly_run_beside_the_full_run(tmp_path, capsys):
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(TUNE))
    argv = ["capacity", "--rates", str(path), "--rows", "10000000", "--bytes", str(10**12), "--gpus-per-node", "0"]
    argv += ["--cpus-per-node", "8", "--preprocess-rows-per-s", "100", "--daily-change", "0.02"]
    assert main([*argv, "--manifest-file-rows", "500000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    nightly = out["nightly"]
    assert nightly["work_fraction"] == pytest.approx(0.06)  # 0.02 x (1 + 1,000,000 / 500,000)
    assert nightly["rows"] == 600_000 and nightly["partitions"] == 1 and out["partitions"] == 10
    assert nightly["compute_cost"] < out["compute_cost"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "nightly at 2.00% daily change" in text and "= 4.00% of the rows" in text  # file rows: a partition's
    assert "| rows embedded | 10,000,000 | 400,000 |" in text
    assert main([*argv[:-1], "1.5"]) == 2
    assert "--daily-change must be a fraction" in capsys.readouterr().err
