"""Bad arguments and bad inputs: exit 2 with one line naming the problem, before any Ray work."""

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_jobs.cli import main
from ray_jobs.errors import AdmissionTimeout, JobInputError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    """Every case here must fail before Ray is touched."""
    import ray

    def boom(*a, **k):
        raise AssertionError("Ray was started for an invalid input")

    monkeypatch.setattr(ray, "init", boom)


def _run(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    return rc, errors


def _manifest(tmp_path, name="m.parquet", **cols):
    data = {"id": ["a"], "text": ["t"], "image_uri": ["/x.jpg"], **cols}
    table = pa.table({k: v for k, v in data.items() if v is not None})
    path = tmp_path / name
    pq.write_table(table, path)
    return str(path)


def _embed(*extra, manifest="M", model="MODEL", output="/tmp/out"):
    args = ["embed", "--output", output, "--model", model]
    if manifest:
        args += ["--manifest", manifest]
    return [*args, *extra]


def test_no_command(capsys):
    rc, err = _run(capsys)
    assert rc == 2 and len(err) == 1 and "required" in err[0]


def test_missing_required_flag(capsys):
    rc, err = _run(capsys, "embed", "--manifest", "x", "--output", "y")
    assert rc == 2 and len(err) == 1 and "--model" in err[0]


def test_manifest_form_needs_output(capsys):
    rc, err = _run(capsys, "embed", "--manifest", "x", "--model", "m")
    assert rc == 2 and len(err) == 1 and "--manifest needs --output" in err[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "0"], "--batch-size: must be >= 1"),
        (["--stage-pool", "x"], "expected MIN-MAX"),
        (["--num-stages", "2", "--stages", "text|image"], "give --num-stages or --stages, not both"),
        (["--plan", "p.json"], "give exactly one of --manifest or --plan"),
        (["--partition", "3"], "--partition goes with --plan"),
        (["--preprocess-pool", "3-1"], "--preprocess-pool: needs 1 <= min <= max"),
    ],
)
def test_bad_arguments(capsys, extra, message):
    rc, err = _run(capsys, *_embed(*extra))
    assert rc == 2 and len(err) == 1 and message in err[0], err


def test_plan_without_partition(capsys):
    rc, err = _run(capsys, *_embed("--plan", "p.json", manifest=None))
    assert rc == 2 and "--plan needs --partition" in err[0]


def test_manifest_that_does_not_exist(capsys, tmp_path, demo_checkpoint):
    rc, err = _run(capsys, *_embed(manifest=str(tmp_path / "nope"), model=demo_checkpoint))
    assert rc == 2 and len(err) == 1 and "holds no .parquet files" in err[0]


def test_manifest_missing_a_column_names_file_and_column(capsys, tmp_path, demo_checkpoint):
    path = _manifest(tmp_path, image_uri=None)
    rc, err = _run(capsys, *_embed(manifest=path, model=demo_checkpoint))
    assert rc == 2 and len(err) == 1 and path in err[0] and "'image_uri'" in err[0] and "missing" in err[0]


def test_manifest_with_a_wrongly_typed_column(capsys, tmp_path, demo_checkpoint):
    _manifest(tmp_path, "a.parquet")
    bad = _manifest(tmp_path, "b.parquet", text=[3])
    rc, err = _run(capsys, *_embed(manifest=str(tmp_path), model=demo_checkpoint))
    assert rc == 2 and bad in err[0] and "'text' has type int64, expected string" in err[0]


def test_unreadable_manifest_file(capsys, tmp_path, demo_checkpoint):
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    rc, err = _run(capsys, *_embed(manifest=str(tmp_path), model=demo_checkpoint))
    assert rc == 2 and "junk.parquet is not a readable Parquet file" in err[0]


def test_missing_model(capsys, tmp_path):
    rc, err = _run(capsys, *_embed(manifest=_manifest(tmp_path), model=str(tmp_path / "nomodel")))
    assert rc == 2 and "model directory" in err[0] and "does not exist" in err[0]


def test_directory_that_is_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "notamodel").mkdir()
    rc, err = _run(capsys, *_embed(manifest=_manifest(tmp_path), model=str(tmp_path / "notamodel")))
    assert rc == 2 and "neither twin_tower.json (twin tower) nor config.json (Hugging Face dual encoder" in err[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stages", "text|image:0-2"], "covers image layers 0-2 of 0-5"),
        (["--num-stages", "12"], "between 1 and the model's 10 layers"),
        (["--num-stages", "99"], "--num-stages: must be <= 64"),
    ],
)
def test_stage_layout_that_does_not_fit_the_model(capsys, tmp_path, demo_checkpoint, extra, message):
    rc, err = _run(capsys, *_embed(*extra, manifest=_manifest(tmp_path), model=demo_checkpoint))
    assert rc == 2 and message in err[0]


def test_demo_assets_bad_count(capsys, tmp_path):
    rc, err = _run(capsys, "demo-assets", "--out", str(tmp_path), "--rows", "3", "--bad-images", "5")
    assert rc == 2 and "--bad-images must be between 0 and --rows (3)" in err[0]


def test_subprocess_exit_code_and_single_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_jobs",
            "embed",
            "--manifest",
            str(tmp_path / "nope"),
            "--output",
            str(tmp_path),
            "--model",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: manifest")


@pytest.mark.parametrize("command", ["plan", "embed", "validate", "demo-assets"])
def test_help(command):
    proc = subprocess.run(
        [sys.executable, "-m", "ray_jobs", command, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0 and "usage:" in proc.stdout


@pytest.mark.parametrize("exc, rc", [(AdmissionTimeout("admission: could not reserve GPU:3"), 3),
                                     (JobInputError("manifest: gone"), 2)])  # fmt: skip
@pytest.mark.parametrize("connected_before", [False, True])
def test_the_error_is_the_last_line_when_ray_is_still_connected(capsys, monkeypatch, exc, rc, connected_before):
    """A driver connected to Ray prints the cluster's autoscaler events from a thread; a
    connection the command made is shut down (which stops and joins that thread) before the
    error is printed. One the caller made before calling main() in-process (a test session's
    Ray) is left alone: shutting it down broke every later test on it. A stand-in for the ray
    module: its shutdown prints the event that the real logger thread would flush."""
    import types

    import ray_jobs.cli as cli

    calls, state = [], {"up": connected_before}

    def shutdown():
        print("(autoscaler +3s) Error: No available node types can fulfill resource request", file=sys.stderr)
        calls.append("shutdown")
        state["up"] = False

    fake = types.SimpleNamespace(is_initialized=lambda: state["up"], shutdown=shutdown)
    monkeypatch.setitem(sys.modules, "ray", fake)

    def failing(args):
        state["up"] = True  # the command connected (ray.init), then failed
        raise exc

    monkeypatch.setitem(cli.COMMANDS, "model-id", (cli.COMMANDS["model-id"][0], failing))
    assert main(["model-id", "--model", "x"]) == rc
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {exc}", err
    assert calls == ([] if connected_before else ["shutdown"]) and state["up"] is connected_before
