from ray_jobs.contract import ids


def test_ids_are_stable_and_sensitive_to_inputs():
    files = [ids.FileFingerprint("b", 2, 20), ids.FileFingerprint("a", 1, 10)]
    fp = ids.manifest_fingerprint(files)
    assert fp == ids.manifest_fingerprint(list(reversed(files)))
    assert fp != ids.manifest_fingerprint(files[:1])
    rewritten = [ids.FileFingerprint("b", 2, 20, version="etag-2"), files[1]]
    assert ids.manifest_fingerprint(rewritten) != fp, "same size and rows, new content: a new plan"
    assert ids.make_plan_id(fp, {"rows": 10}) == ids.make_plan_id(fp, {"rows": 10})
    assert ids.make_plan_id(fp, {"rows": 10}) != ids.make_plan_id(fp, {"rows": 11})
    assert ids.make_model_id("Tiny ALBERT/ViT", "abcdef0123456789") == "tiny_albert_vit-abcdef0123"


def test_default_dataset_name_is_readable_and_tells_manifests_apart():
    a = ids.default_dataset_name("s3://bucket/nightly/Products/")
    assert a == ids.default_dataset_name("s3://bucket/nightly/Products") and a.startswith("products_")
    assert ids.default_dataset_name("s3://other/nightly/Products") != a
    assert ids.default_dataset_name("/data/manifest.parquet").startswith("manifest_")
