"""docs/params.md is generated from the settings' declarations; CI fails when it is stale."""

from scripts.params_doc import main


def test_params_doc_is_current():
    assert main(["--check"]) == 0, "docs/params.md is out of date: run `python scripts/params_doc.py`"
