"""The seeded manifest sample the auto layout and ``tune`` are balanced on, and its shapes."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_jobs.model.checkpoint import open_checkpoint
from ray_jobs.perf.data_sample import manifest_fragments, measure_shapes, sample_rows
from ray_jobs.planning.manifest import read_manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Two files of three row groups of 10 rows; captions of 1..60 words; images of two sizes."""
    root = tmp_path_factory.mktemp("sample")
    images = []
    for k, size in enumerate(((64, 48), (40, 80))):
        path = root / f"img{k}.png"
        Image.new("RGB", size, (k * 90, 40, 200)).save(path)
        images.append(str(path))
    (root / "manifest").mkdir()
    for f in range(2):
        ids = [f"r{f}-{i}" for i in range(30)]
        texts = [" ".join(["word"] * (1 + (f * 30 + i) % 60)) for i in range(30)]
        uris = [images[i % 2] if i != 7 else str(root / "missing.png") for i in range(30)]
        table = pa.table({"id": ids, "text": texts, "image_uri": uris})
        pq.write_table(table, root / "manifest" / f"part-{f}.parquet", row_group_size=10)
    return str(root / "manifest")


def test_the_sample_is_seeded_small_and_spread_over_row_groups(manifest):
    fragments = manifest_fragments(read_manifest(manifest))
    a, b = sample_rows(fragments, rows=12, seed=3), sample_rows(fragments, rows=12, seed=3)
    assert a == b and a.rows == 12 and "4 row group(s)" in a.source and "seed 3" in a.source
    assert sample_rows(fragments, rows=12, seed=4) != a
    assert len({t for t in a.texts}) > 3, "rows of several row groups, not one"
    one_group = sample_rows([(fragments[0][0], [1])], rows=50)
    assert one_group.rows == 10, "never more rows than the row groups hold"


def test_the_shapes_are_the_captions_tokens_and_the_images_sizes(manifest, demo_checkpoint):
    ckpt = open_checkpoint(demo_checkpoint)
    sample = sample_rows(manifest_fragments(read_manifest(manifest)), rows=16)
    shapes = measure_shapes(ckpt, sample)
    assert len(shapes.text_tokens) == 16 and max(shapes.text_tokens) <= ckpt.text_processing.max_length
    assert min(shapes.text_tokens) < max(shapes.text_tokens), "real lengths, not the maximum for all"
    assert set(shapes.image_sizes) <= {(64, 48), (40, 80)} and shapes.image_sizes, "sizes of the images that open"
    assert shapes.text_seq(1) < shapes.text_seq(64) <= max(shapes.text_tokens)
    assert "caption tokens median" in shapes.line(64) and "images median" in shapes.line(64)


def test_the_control_plane_measures_the_captions_without_fetching_any_image(manifest, demo_checkpoint, monkeypatch):
    """check_inputs runs on an Airflow worker: it never fetches a URI read from the manifest's
    rows (only the cluster's workers do, under their own policy), and the layout needs none."""
    from ray_jobs.perf import data_sample

    def fetched(*args, **kwargs):
        raise AssertionError("an image was fetched")

    monkeypatch.setattr(data_sample, "_image_size", fetched)
    ckpt = open_checkpoint(demo_checkpoint)
    sample = sample_rows(manifest_fragments(read_manifest(manifest)), rows=16)
    shapes = measure_shapes(ckpt, sample, open_images=False)
    assert len(shapes.text_tokens) == 16 and shapes.image_sizes == ()
    assert "no image opened" in shapes.line(8)
