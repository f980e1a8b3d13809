"""Bucket assignment, step counts, batch composition, caption options, EXIF, the latent cache."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from remote.buckets import BucketPlanner, plan_steps
from remote.trainer import data as data_mod


def test_buckets_and_step_counts_agree_with_remote_buckets(make_config):
    sizes = [(64, 64), (128, 64), (64, 128), (100, 60), (60, 100), (128, 128), (90, 64)]
    _, cfg = make_config(
        sizes=sizes,
        resolution=128,
        enable_bucket=True,
        min_bucket_reso=64,
        max_bucket_reso=256,
        batch_size=2,
        repeats=3,
        max_train_epochs=2,
        max_train_steps=None,
    )
    dataset = data_mod.build_dataset(cfg)
    planner = BucketPlanner((128, 128), True, 64, 256, 64, False)
    for record in dataset.records:
        choice = planner.assign(*record.original_size)
        assert record.bucket == tuple(choice.bucket) and record.resized == tuple(choice.resized)
        assert record.bucket[0] * record.bucket[1] <= 128 * 128
        assert record.bucket[0] % 64 == 0 and record.bucket[1] % 64 == 0
    expected = plan_steps([r.bucket for r in dataset.records for _ in range(3)], 2, 1, 2, None)
    assert dataset.plan == expected
    batches = data_mod.epoch_batches(dataset, 2, seed=5, epoch=0)
    assert len(batches) == expected.batches_per_epoch
    for batch in batches:  # a batch never mixes buckets
        assert len({dataset.records[i].bucket for i in batch}) == 1
    assert Counter(i for b in batches for i in b) == Counter({i: 3 for i in range(len(sizes))})  # repeats
    assert batches == data_mod.epoch_batches(dataset, 2, seed=5, epoch=0)
    assert batches != data_mod.epoch_batches(dataset, 2, seed=5, epoch=1)


def test_pixels_cover_bucket_and_centre_crop(make_config):
    _, cfg = make_config(sizes=[(128, 64)], resolution=64)  # bucketing off: one 64x64 bucket
    record = data_mod.build_dataset(cfg).records[0]
    assert record.bucket == (64, 64) and record.resized == (128, 64)
    pixels = data_mod.load_pixels(record)
    assert tuple(pixels.shape) == (3, 64, 64)
    assert pixels.min() >= -1 and pixels.max() <= 1
    # the centre of the circle is in the centre crop
    assert pixels[:, 32, 32].tolist() != pixels[:, 0, 0].tolist()


def test_exif_orientation_is_applied_before_sizing(tmp_path, make_config):
    from PIL import Image

    folder = tmp_path / "data" / "1_x"
    folder.mkdir(parents=True)
    image = Image.new("RGB", (128, 64), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    image.save(folder / "a.jpg", exif=exif.tobytes())
    _, cfg = make_config(resolution=128, enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256)
    record = data_mod.build_dataset(cfg).records[0]
    assert record.original_size == (64, 128) and record.bucket == (64, 192)


def test_step_counts_with_accumulation_and_max_steps(make_config):
    _, cfg = make_config(gradient_accumulation_steps=3, max_train_steps=5, repeats=5, batch_size=1)
    plan = data_mod.build_dataset(cfg).plan  # 4 images x 5 repeats, bucketing off -> 20 batches
    assert plan.batches_per_epoch == 20 and plan.steps_per_epoch == 7 and plan.total_steps == 5 and plan.epochs == 1


class _Caps:
    caption_prefix = None
    caption_suffix = None
    caption_dropout_rate = 0.0
    caption_dropout_every_n_epochs = 0
    caption_tag_dropout_rate = 0.0
    shuffle_caption = False
    keep_tokens = 0
    caption_separator = ","

    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_caption_shuffle_keeps_tokens_and_joins_with_comma_space():
    cfg = _Caps(shuffle_caption=True, keep_tokens=2)
    caption = "rtoy, solo, red,blue ,  green, ,yellow"
    seen = set()
    for seed in range(30):
        out = data_mod.process_caption(cfg, caption, random.Random(seed), epoch=1)
        tokens = out.split(", ")
        assert tokens[:2] == ["rtoy", "solo"]
        assert sorted(tokens[2:]) == ["blue", "green", "red", "yellow"]
        seen.add(out)
    assert len(seen) > 5


def test_caption_dropout_prefix_suffix_and_tag_dropout():
    assert data_mod.process_caption(_Caps(caption_dropout_rate=1.0), "a, b", random.Random(0), 1) == ""
    every = _Caps(caption_dropout_every_n_epochs=2)
    assert data_mod.process_caption(every, "a, b", random.Random(0), 1) == "a, b"
    assert data_mod.process_caption(every, "a, b", random.Random(0), 2) == ""
    fixed = _Caps(caption_prefix="pre", caption_suffix="post")
    assert data_mod.process_caption(fixed, "a, b", random.Random(0), 1) == "pre a, b post"
    drop = _Caps(caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert data_mod.process_caption(drop, "keep, x, y", random.Random(0), 1) == "keep"
    rates = [
        data_mod.process_caption(_Caps(caption_dropout_rate=0.3), "a", random.Random(i), 1) == "" for i in range(400)
    ]
    assert 0.2 < sum(rates) / 400 < 0.4


def test_folder_class_tokens_used_without_caption_file(tmp_path, make_config):
    from tests.trainer.conftest import make_images

    make_images(tmp_path / "data" / "3_sks dog", [(64, 64)], captions=None)
    _, cfg = make_config()
    record = next(r for r in data_mod.build_dataset(cfg).records if r.subset == "3_sks dog")
    assert record.caption == "sks dog" and record.repeats == 3


def test_latent_cache_is_reused_and_keyed_by_content(tmp_path, make_config, monkeypatch):
    import torch

    from remote.trainer.tiny import build_tiny

    monkeypatch.setenv("RENTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    _, cfg = make_config()
    vae = build_tiny("sd15")["vae"]
    first = data_mod.build_dataset(cfg)
    assert data_mod.cache_latents(first, vae, 0.18215, torch.device("cpu"), flip=False) == (4, 0)
    second = data_mod.build_dataset(cfg)
    assert data_mod.cache_latents(second, vae, 0.18215, torch.device("cpu"), flip=False) == (0, 4)
    assert all(torch.equal(a.latent, b.latent) for a, b in zip(first.records, second.records, strict=True))
    assert tuple(first.records[0].latent.shape) == (4, 8, 8)
    # flips need the flipped latents too; a changed image is re-encoded
    assert data_mod.cache_latents(data_mod.build_dataset(cfg), vae, 0.18215, torch.device("cpu"), flip=True) == (4, 0)
    from PIL import Image

    Image.new("RGB", (64, 64), "black").save(first.records[0].path)
    assert data_mod.cache_latents(data_mod.build_dataset(cfg), vae, 0.18215, torch.device("cpu"), flip=True) == (1, 3)


def test_empty_caption_file_is_a_data_error(make_config):
    _path, cfg = make_config()
    next(cfg.train_data_dir.rglob("*.txt")).write_text("\n")
    with pytest.raises(data_mod.DataError, match="empty"):
        data_mod.build_dataset(cfg)


def test_unreadable_image_is_a_data_error_naming_the_file(make_config):
    _, cfg = make_config()
    bad = next(cfg.train_data_dir.rglob("*.png"))
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(data_mod.DataError, match=bad.name):
        data_mod.build_dataset(cfg)


def test_large_jpegs_decode_at_a_reduced_scale_that_still_covers_the_bucket(tmp_path, make_config):
    """A rotated 2000x1500 photo for a 256px bucket: decoded at 1/4 scale (500x375, still larger than the
    bucket's 256x192 resize), the same picture as a full decode within resampling differences."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "data" / "1_x"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    field = Image.fromarray(rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)).resize((2000, 1500), Image.BICUBIC)
    exif = field.getexif()
    exif[0x0112] = 6
    field.save(folder / "a.jpg", quality=95, exif=exif.tobytes())
    _, cfg = make_config(resolution=256, enable_bucket=True, min_bucket_reso=64, max_bucket_reso=512)
    record = data_mod.build_dataset(cfg).records[0]
    assert record.original_size == (1500, 2000)  # as shown: portrait

    drafted = data_mod.open_image(record.path, at_least=record.resized)
    assert drafted.size[0] >= record.resized[0] and drafted.size[1] >= record.resized[1]
    assert drafted.size[0] < 1500 / 2  # a reduced scale was used
    pixels = data_mod.load_pixels(record)
    assert tuple(pixels.shape) == (3, record.bucket[1], record.bucket[0])

    full = data_mod.open_image(record.path).resize(record.resized, Image.Resampling.BOX)
    left = (full.size[0] - record.bucket[0]) // 2
    top = (full.size[1] - record.bucket[1]) // 2
    reference = np.asarray(full.crop((left, top, left + record.bucket[0], top + record.bucket[1])), dtype=np.float32)
    reference = reference / 127.5 - 1.0
    assert float(np.abs(pixels.permute(1, 2, 0).numpy() - reference).mean()) < 0.02
