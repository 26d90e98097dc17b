import re

from airflow_ray.naming import cluster_name, submission_id


def test_cluster_name_is_deterministic_dns_safe_and_short():
    a = cluster_name("Multimodal_Embeddings.v2", "scheduled__2026-11-26T00:00:00+00:00")
    assert a == cluster_name("Multimodal_Embeddings.v2", "scheduled__2026-11-26T00:00:00+00:00")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", a) and len(a) <= 40
    assert a != cluster_name("Multimodal_Embeddings.v2", "manual__2026-11-26T00:00:00+00:00")


def test_submission_ids_differ_per_partition_and_attempt_but_repeat_exactly():
    ids = {submission_id("d", "r", p) for p in range(100)}
    assert len(ids) == 100
    assert submission_id("d", "r", 3) == submission_id("d", "r", 3)
    assert submission_id("d", "r", 3, attempt=1) == submission_id("d", "r", 3) + "-r1"
    assert submission_id("d", "r2", 3) != submission_id("d", "r", 3)
