"""A model stage tells a bad row from a broken stage: only the first is ever a reject.

The faults are injected by wrapping the real stage module's ``run`` (a stand-in for a GPU
that runs out of memory or a device that errors); the model itself is the demo checkpoint."""

import numpy as np
import pytest
import torch

from ray_jobs.errors import TRANSIENT_MARKER, TransientFailure
from ray_jobs.model.checkpoint import TwinTowerCheckpoint
from ray_jobs.model.staged import ModelStage, build_layout
from tests.ray_jobs.model.test_staged import _batch, _inputs


@pytest.fixture(scope="module")
def stage_and_batch(demo_checkpoint):
    ckpt = TwinTowerCheckpoint(demo_checkpoint)
    ids, mask, px = _inputs(ckpt)
    stage = ModelStage(demo_checkpoint, build_layout(ckpt, num_stages=1).spec(), 0)
    return stage, lambda: _batch(ids.copy(), mask.copy(), px.copy())


@pytest.fixture
def faulty(stage_and_batch, monkeypatch):
    """Make the stage's module fail as *rule(rows, call)* says; returns the calls seen (rows per call)."""
    stage, _ = stage_and_batch
    real = stage.module.run
    calls = []

    def install(rule):
        def run(cols):
            calls.append(len(cols["input_ids"]))
            error = rule(cols, len(calls))
            if error is not None:
                raise error
            return real(cols)

        monkeypatch.setattr(stage.module, "run", run)
        return calls

    return install


def test_out_of_memory_halves_the_batch_and_rejects_nothing(stage_and_batch, faulty):
    stage, make = stage_and_batch
    expected = stage(make())
    calls = faulty(lambda cols, n: torch.cuda.OutOfMemoryError("CUDA out of memory") if len(cols["id"]) > 2 else None)
    out = stage(make())
    assert out["ok"].all() and not any(out["reject_reason"])
    assert calls == [5, 2, 3, 1, 2]
    np.testing.assert_allclose(out["text_embedding"], expected["text_embedding"], atol=1e-5)
    np.testing.assert_allclose(out["image_embedding"], expected["image_embedding"], atol=1e-5)


def test_out_of_memory_for_its_first_n_batches_costs_no_row(stage_and_batch, faulty):
    """The first invocations fail whole (retried, as Ray Data retries the task); no row is lost."""
    stage, make = stage_and_batch
    faulty(lambda cols, n: RuntimeError("DefaultCPUAllocator: not enough memory") if n <= 4 else None)
    failures = 0
    for _ in range(3):  # what DataContext.retried_map_errors does with a TransientFailure
        try:
            out = stage(make())
            break
        except TransientFailure:
            failures += 1
    assert failures == 1 and out["ok"].all() and not any(out["reject_reason"])


def test_out_of_memory_even_for_one_row_fails_the_batch_for_a_retry(stage_and_batch, faulty):
    stage, make = stage_and_batch
    faulty(lambda cols, n: MemoryError())
    with pytest.raises(TransientFailure, match="out of memory even for one row") as exc:
        stage(make())
    assert str(exc.value).startswith(TRANSIENT_MARKER)


def test_an_error_that_hits_the_batch_every_row_alone_and_a_neutral_row_is_a_stage_failure(stage_and_batch, faulty):
    stage, make = stage_and_batch
    calls = faulty(lambda cols, n: RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(TransientFailure, match="5 of the batch's 5 rows failed alone and so did a neutral row"):
        stage(make())
    assert calls == [5, 1, 1, 1, 1, 1, 1], "the batch, each row, then the neutral row"


def test_a_stage_that_breaks_after_some_rows_succeeded_is_still_a_stage_failure(stage_and_batch, faulty):
    """Rows 0-1 succeed alone, then the device fails for good: the failed rows are not rejects."""
    stage, make = stage_and_batch
    faulty(lambda cols, n: RuntimeError("CUDA error: device lost") if n == 1 or n >= 4 else None)
    with pytest.raises(TransientFailure, match="3 of the batch's 5 rows failed alone and so did a neutral row"):
        stage(make())


def test_a_batch_whose_only_valid_row_breaks_the_model_rejects_that_row(stage_and_batch):
    """A token id outside the vocabulary (a tokenizer that does not match the model) fails the
    embedding lookup of the one valid row in its batch: that row is a reject, not a stage failure."""
    stage, make = stage_and_batch
    batch = make()
    batch["input_ids"][2, 1] = 10_000_000
    batch["ok"][[0, 1, 3, 4]] = False
    batch["reject_stage"][[0, 1, 3, 4]] = "fetch"
    batch["reject_reason"][[0, 1, 3, 4]] = "missing object: x"
    out = stage(batch)
    assert out["ok"].tolist() == [False] * 5
    assert out["reject_reason"][2].startswith("model error: IndexError"), out["reject_reason"][2]
    assert list(out["reject_reason"][[0, 1, 3, 4]]) == ["missing object: x"] * 4
    assert not out["text_embedding"].any() and not out["image_embedding"].any()


def test_only_a_row_that_fails_alone_while_others_succeed_is_a_reject(stage_and_batch, faulty):
    stage, make = stage_and_batch
    faulty(lambda cols, n: ValueError("index out of range in self") if "r3" in set(cols["id"]) else None)
    out = stage(make())
    assert out["ok"].tolist() == [True, True, True, False, True]
    assert out["reject_reason"][3].startswith("model error: ValueError")


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory) -> str:
    from bench.hf_presets import build_siglip2

    return build_siglip2(str(tmp_path_factory.mktemp("siglip2") / "siglip2-tiny"), seed=3)


@pytest.mark.parametrize("stages", ["text,image", "text,image:0-1|image:2-3"])
def test_a_siglip2_batch_without_a_valid_row_never_reaches_the_model_with_an_empty_patch_grid(
    siglip2_dir, tmp_path, stages
):
    """A 1-row tail batch whose image is missing: the rejected row's patch grid is (0, 0), which
    SigLIP 2's position embeddings refuse; every stage passes the reject through instead."""
    from ray_jobs.job.preprocess import Preprocessor
    from ray_jobs.model.checkpoint import open_checkpoint

    layout = build_layout(open_checkpoint(siglip2_dir), spec=stages)
    batch = Preprocessor(siglip2_dir)(
        {
            "id": np.array(["tail"], dtype=object),
            "text": np.array(["a red cat"], dtype=object),
            "image_uri": np.array([str(tmp_path / "missing.jpg")], dtype=object),
        }
    )
    assert batch["spatial_shapes"].tolist() == [[0, 0]] and batch["ok"].tolist() == [False]
    for index in range(len(layout.stages)):
        batch = ModelStage(siglip2_dir, layout.spec(), index)(batch)
    assert batch["ok"].tolist() == [False] and batch["reject_reason"][0].startswith("missing object")
    assert batch["text_embedding"].shape == (1, 32) and not batch["text_embedding"].any()
    assert batch["image_embedding"].shape == (1, 32) and not batch["image_embedding"].any()
