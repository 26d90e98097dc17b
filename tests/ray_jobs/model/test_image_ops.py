"""The image processor's config read as plain JSON means what transformers' processor class makes
of it, and is read so only where every value it needs is spelled out."""

from __future__ import annotations

import pytest

from bench.hf_presets import BUILDERS
from ray_jobs.model.checkpoint import open_checkpoint
from ray_jobs.model.image_ops import (
    _processor_config,
    load_image_processing,
    plain_image_processing,
    processor_class_image_processing,
)


@pytest.fixture(scope="module")
def processor_dirs(tmp_path_factory, demo_checkpoint) -> dict[str, str]:
    dirs = {"twin-tower-tiny": open_checkpoint(demo_checkpoint).tower_local_dir("image")}
    for name, build in BUILDERS.items():
        dirs[name] = build(str(tmp_path_factory.mktemp(name.replace("_", "-")) / "model"), seed=2)
    return dirs


def test_every_family_reads_as_its_processor_class_makes_it(processor_dirs):
    plain = set()
    for name, path in processor_dirs.items():
        assert load_image_processing(path) == processor_class_image_processing(path), name
        if plain_image_processing(_processor_config(path)) is not None:
            plain.add(name)
    # SigLIP 2's patch-count resize is read by its class
    assert plain == set(processor_dirs) - {"siglip2"}


CLIP = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 36},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 32, "width": 32},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48, 0.45, 0.4],
    "image_std": [0.26, 0.26, 0.27],
}


@pytest.mark.parametrize(
    "change",
    [
        {"size": 224},  # a legacy spelling: the class decides what it means
        {"size": {"shortest_edge": 36, "longest_edge": 50}},
        {"do_center_crop": None},  # left to the class's default
        {"image_processor_type": "DonutImageProcessor"},
        {"do_pad": True},  # a key this reader does not know
        {"do_normalize": False},
        {"image_mean": 0.5},
        {"crop_size": 32},
    ],
)
def test_anything_only_the_processor_class_can_say_is_left_to_it(change):
    config = {**CLIP, **change}
    config = {k: v for k, v in config.items() if v is not None}
    assert plain_image_processing(config) is None


def test_a_vit_config_needs_no_centre_crop_key_and_a_clip_one_is_read_whole():
    vit = {**CLIP, "image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 40}}
    del vit["do_center_crop"], vit["crop_size"]
    got = plain_image_processing(vit)
    assert got.resize == ("fixed", 32, 40) and got.crop is None
    clip = plain_image_processing(CLIP)
    assert clip.resize == ("shortest_edge", 36, 0) and clip.crop == (32, 32) and clip.resample == 3
    assert clip.image_mean == (0.48, 0.45, 0.4) and clip.rescale_factor == pytest.approx(1 / 255)
