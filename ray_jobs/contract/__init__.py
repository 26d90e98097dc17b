"""The contract between the control plane and the data plane.

* :mod:`.manifest_schema`: the columns a manifest must and may have.
* :mod:`.ids`: deterministic ids (model, plan, dataset) and the manifest fingerprint.
* :mod:`.layout`: where a run's plan, partitions, attempts and part files live, and the
  schemas of the files written there.
* :mod:`.marker`: the commit-marker format (``_SUCCESS``) and the one judge of a commit.
* :mod:`.plan`: the plan format (``plan.json``).

These modules depend on nothing heavier than pyarrow and the standard library, so the
Airflow side can import them at parse time; everything that touches storage lives elsewhere.
"""
