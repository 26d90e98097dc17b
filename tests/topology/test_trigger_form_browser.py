"""The trigger form as users meet it: headless Chromium (Debian's chromium + chromium-driver)
driven by Selenium against the real api-server of the shared Airflow stack (tests/topology/
conftest.py), logged in through the Simple auth manager's form.

- Filling only the three URIs is enough: the run is created with exactly those plus every
  default, and starts. It is then marked failed through the REST API before it reaches the
  cluster (three tasks precede ``cluster_up``), so it ends in seconds and starts no Ray.
- Invalid input never becomes a run: a number below its minimum is clamped by the field, an
  emptied required URI disables Trigger with "This field is required", and a value the schema
  refuses (``stage_pool`` "two") is sent, refused by the api-server, and its error shown in
  the dialog.

Screenshots of every step: ``test-artifacts/browser/`` (or ``$TEST_ARTIFACTS_DIR/browser``).
"""

from __future__ import annotations

import time

import pytest

from tests.topology.airflow_stack import DAG_ID, FINISHED, ROOT, assert_no_ray_left
from tests.topology.trigger_form import BrowserConfig, BrowserUnavailable, TriggerDialog, start_chromium

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dialog(stack):
    try:
        config = BrowserConfig.from_env(ROOT)
        driver = start_chromium(config)
    except BrowserUnavailable as exc:
        pytest.fail(f"{exc} (`make system-deps` installs them)")
    try:
        yield TriggerDialog(driver, stack.url, config)
    finally:
        driver.quit()


def _uris(assets, tmp_path) -> dict[str, str]:
    return {"manifest_uri": assets.manifest, "output_uri": str(tmp_path / "output"), "model_uri": assets.model}


def _wait(predicate, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s")


def _end_run(stack, run_id: str) -> str:
    """Mark the run failed through the REST API and wait until it and every task are finished
    (the teardowns included); return the run's final state. (Marking it failed while
    ``cluster_up`` runs is tested in test_real_topology.py.)"""
    r = stack.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{run_id}", json={"state": "failed"})
    assert r.status_code == 200, r.text

    def finished():
        state = stack.run_state(run_id)
        tis = stack.task_instances(run_id)
        return state in ("success", "failed") and all(t["state"] in FINISHED for t in tis) and state

    return _wait(finished, 120, f"run {run_id} and its teardowns to finish")


def test_the_three_uris_alone_trigger_a_run_with_every_default(stack, dialog, demo_assets, tmp_path):
    from embedding_run.deployment import load_defaults

    uris = _uris(demo_assets, tmp_path)
    runs_before = stack.run_count()
    dialog.open_dag(DAG_ID, "admin", stack.password)
    dialog.open()
    dialog.wait_submit_enabled(False)  # the three URIs are required and empty
    dialog.screenshot("valid-1-dialog-opened")
    dialog.section("Input and output")
    for name, value in uris.items():
        dialog.fill(name, value)
    dialog.wait_submit_enabled(True)
    dialog.screenshot("valid-2-three-uris-filled")
    dialog.submit()
    dialog.wait_closed()
    dialog.wait_toast("Dag Run Triggered")
    run_id = dialog.wait_run_page(DAG_ID)
    dialog.screenshot("valid-3-triggered")

    r = stack.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")
    assert r.status_code == 200, r.text
    run = r.json()
    assert run["run_type"] == "manual" and stack.run_count() == runs_before + 1
    expected = {**load_defaults()["params"], **uris}
    assert run["conf"] == expected, {
        k: (run["conf"].get(k), expected.get(k))
        for k in set(run["conf"]) | set(expected)
        if run["conf"].get(k) != expected.get(k)
    }
    _wait(lambda: stack.run_state(run_id) == "running", 60, f"run {run_id} to start")
    final = _end_run(stack, run_id)
    tis = {t["task_id"]: t["state"] for t in stack.task_instances(run_id)}
    assert final == "failed" and tis["report"] == "failed" and tis["cluster_down"] == "success", (final, tis)
    assert_no_ray_left(within_s=30)


def test_invalid_values_are_shown_in_the_form_and_create_no_run(stack, dialog, demo_assets, tmp_path):
    runs_before = stack.run_count()
    dialog.open_dag(DAG_ID, "admin", stack.password)
    dialog.open()
    dialog.section("Input and output")
    for name, value in _uris(demo_assets, tmp_path).items():
        dialog.fill(name, value)

    # a number outside the schema's range: the field clamps it to the minimum when left
    dialog.section("Embed job")
    batch_size = dialog.fill("batch_size", "0")
    dialog.screenshot("invalid-1-batch-size-0-typed")
    dialog.blur(batch_size)
    dialog.wait_value(batch_size, "1", "batch_size 0 clamped to its minimum")
    dialog.screenshot("invalid-2-batch-size-clamped-to-1")

    # a required URI emptied: the field says so and Trigger is disabled
    dialog.section("Input and output")  # one section is open at a time
    manifest = dialog.fill("manifest_uri", "")
    dialog.blur(manifest)
    dialog.wait_dialog_text("This field is required")
    dialog.wait_submit_enabled(False)
    dialog.screenshot("invalid-3-manifest-uri-required")
    dialog.fill("manifest_uri", demo_assets.manifest)

    # a URI outside the deployment's allowed prefixes (a metadata address): refused, named
    dialog.fill("model_uri", "http://169.254.169.254/latest/meta-data/")
    dialog.submit()
    dialog.wait_dialog_text("Invalid input for param model_uri")
    dialog.screenshot("invalid-4-model-uri-not-allowed")
    dialog.wait_submit_enabled(True)
    dialog.fill("model_uri", demo_assets.model)

    # a value the schema refuses: the api-server's refusal, naming the param, in the dialog
    dialog.section("Model stages")
    dialog.fill("stage_pool", "two")
    dialog.submit()
    text = dialog.wait_dialog_text("Invalid input for param stage_pool")
    dialog.screenshot("invalid-5-stage-pool-refused")
    assert "400 Bad Request" in text, text
    dialog.wait_submit_enabled(True)  # the dialog stays open with the user's input
    assert stack.run_count() == runs_before, "a refused trigger created a run"
