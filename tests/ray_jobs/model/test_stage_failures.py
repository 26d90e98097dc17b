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


def test_an_error_that_hits_the_batch_and_every_row_alone_is_a_stage_failure(stage_and_batch, faulty):
    stage, make = stage_and_batch
    calls = faulty(lambda cols, n: RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(TransientFailure, match="each of its 5 rows failed alone"):
        stage(make())
    assert calls == [5, 1, 1, 1, 1, 1]


def test_only_a_row_that_fails_alone_while_others_succeed_is_a_reject(stage_and_batch, faulty):
    stage, make = stage_and_batch
    faulty(lambda cols, n: ValueError("index out of range in self") if "r3" in set(cols["id"]) else None)
    out = stage(make())
    assert out["ok"].tolist() == [True, True, True, False, True]
    assert out["reject_reason"][3].startswith("model error: ValueError")
