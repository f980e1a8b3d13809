"""The dataset check: kohya layout, every error and warning named, steps counted as kohya counts them."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from remote.buckets import BucketPlanner, make_bucket_resolutions, plan_steps
from remote.config import load_config
from rentrain.dataset_check import DatasetReport, inspect_dataset
from tests.foundation.helpers import TUTORIAL_CONFIG, make_dataset, write_captioned, write_config, write_image


def _check(job: Path, extra: str = "") -> DatasetReport:
    return inspect_dataset(load_config(write_config(job, TUTORIAL_CONFIG + extra)).train)


def _messages(report: DatasetReport, severity: str) -> list[str]:
    return [str(f) for f in report.findings if f.severity == severity]


def test_tutorial_with_30_images_counts_steps_like_kohya(tmp_path: Path) -> None:
    # 20 square images go to the 512x512 bucket; 10 images of aspect 1.5 go to 640x384, the closest
    # predefined aspect (1.667 vs 1.286 for 576x448). Repeats 10, batch 2, 10 epochs:
    # (200 / 2 + 100 / 2) batches per epoch = 150; x 10 epochs = 1500 steps.
    make_dataset(tmp_path / "dataset", [(512, 512)] * 20 + [(768, 512)] * 10, repeats=10)
    report = _check(tmp_path)
    assert report.errors == []
    assert report.warnings == []
    plan = report.step_plan
    assert plan is not None
    assert plan.bucket_samples == {"512x512": 200, "640x384": 100}
    assert (plan.batches_per_epoch, plan.epochs, plan.total_steps) == (150, 10, 1500)
    subset = report.subsets[0]
    assert (subset.repeats, subset.images, subset.captions, subset.class_tokens) == (10, 30, 30, "sks dog")
    assert (subset.smallest, subset.largest) == ("512x512", "768x512")


def test_partial_batches_round_up_per_bucket(tmp_path: Path) -> None:
    # 7 images x 3 repeats = 21 samples, batch 2 -> 11 batches; bucketing off puts all in one bucket.
    make_dataset(tmp_path / "dataset", [(512, 512)] * 4 + [(600, 900)] * 3, repeats=3)
    text = TUTORIAL_CONFIG.replace("enable_bucket = true", "enable_bucket = false")
    plan = inspect_dataset(load_config(write_config(tmp_path, text)).train).step_plan
    assert plan is not None
    assert plan.bucket_samples == {"512x512": 21}
    assert (plan.batches_per_epoch, plan.total_steps) == (11, 110)


def test_max_train_steps_and_accumulation(tmp_path: Path) -> None:
    make_dataset(tmp_path / "dataset", [(512, 512)] * 16, repeats=2)  # 32 samples, 16 batches per epoch
    text = (
        TUTORIAL_CONFIG.replace("max_train_epochs = 10", "max_train_steps = 20") + "gradient_accumulation_steps = 3\n"
    )
    plan = inspect_dataset(load_config(write_config(tmp_path, text)).train).step_plan
    assert plan is not None
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.epochs, plan.total_steps) == (16, 6, 4, 20)


def test_regularisation_repeats_balance_to_training_samples(tmp_path: Path) -> None:
    make_dataset(tmp_path / "dataset", [(512, 512)] * 15, repeats=4)  # 60 training samples
    make_dataset(tmp_path / "reg", [(512, 512)] * 7, repeats=1, name="dog")
    text = TUTORIAL_CONFIG.replace(
        'train_data_dir = "./dataset"', 'train_data_dir = "./dataset"\nreg_data_dir = "./reg"'
    )
    report = inspect_dataset(load_config(write_config(tmp_path, text)).train)
    plan = report.step_plan
    assert plan is not None
    assert plan.samples_per_epoch == 120  # reg repeats raised round-robin until 60 reg samples
    assert [s.is_reg for s in report.subsets] == [False, True]


def test_bucket_list_matches_kohya() -> None:
    assert len(make_bucket_resolutions((512, 512), 256, 1024, 64)) == 17
    assert len(make_bucket_resolutions((1024, 1024), 256, 2048, 64)) == 41
    assert len(make_bucket_resolutions((1024, 1024), 256, 1024, 64)) == 25
    planner = BucketPlanner((512, 512), enable_bucket=True)
    choice = planner.assign(1920, 1080)
    assert choice.bucket == (640, 384) and choice.resized == (683, 384)
    assert planner.assign(512, 512).bucket == (512, 512)


def test_no_upscale_buckets_never_exceed_the_image() -> None:
    planner = BucketPlanner((512, 512), enable_bucket=True, bucket_no_upscale=True)
    small = planner.assign(300, 200)
    assert small.bucket == (256, 192) and small.resized == (300, 200)
    large = planner.assign(2000, 1000)
    assert large.bucket[0] * large.bucket[1] <= 512 * 512
    assert large.bucket[0] % 64 == 0 and large.bucket[1] % 64 == 0


def test_plan_steps_needs_epochs_or_steps() -> None:
    try:
        plan_steps([(512, 512)], 1)
    except ValueError as exc:
        assert "max_train_epochs" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_folder_without_repeat_prefix_is_an_error(tmp_path: Path) -> None:
    make_dataset(tmp_path / "dataset", [(512, 512)] * 20)
    write_captioned(tmp_path / "dataset" / "extra_photos", "a", (512, 512), (1, 2, 3), "sks dog")
    errors = _messages(_check(tmp_path), "error")
    assert len(errors) == 1
    assert (
        "extra_photos: folder name must start with the repeat count and an underscore, e.g. 10_extra_photos"
        in errors[0]
    )


def test_zero_repeats_is_an_error(tmp_path: Path) -> None:
    make_dataset(tmp_path / "dataset", [(512, 512)] * 3, repeats=0)
    assert any("repeat count 0 must be from 1 to" in e for e in _messages(_check(tmp_path), "error"))


def test_undecodable_and_truncated_images_are_named(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "dataset", [(512, 512)] * 20)
    (folder / "notes.png").write_text("this is not an image")
    (folder / "notes.txt").write_text("sks dog")
    truncated = write_image(folder / "cut.jpg", (512, 512), (9, 9, 9), "JPEG")
    truncated.write_bytes(truncated.read_bytes()[:300])
    (folder / "cut.txt").write_text("sks dog")
    report = _check(tmp_path)
    errors = _messages(report, "error")
    assert any(e.startswith(f"{folder / 'notes.png'}: cannot be decoded as an image") for e in errors), errors
    assert any(e.startswith(f"{folder / 'cut.jpg'}: cannot be decoded as an image") for e in errors), errors
    assert report.step_plan is None


def test_empty_dataset_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "dataset" / "10_empty").mkdir(parents=True)
    assert any("no training images found" in e for e in _messages(_check(tmp_path), "error"))
    other = tmp_path / "other"
    assert any("train_data_dir does not exist" in e for e in _messages(_check(other), "error"))


def test_images_directly_in_train_data_dir(tmp_path: Path) -> None:
    write_captioned(tmp_path / "dataset", "a", (512, 512), (1, 2, 3), "sks dog")
    errors = _messages(_check(tmp_path), "error")
    assert any("must be the parent of folders named N_name" in e for e in errors), errors


def test_unreadable_and_empty_captions_are_errors(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "dataset", [(512, 512)] * 20)
    (folder / "img_000.txt").write_bytes(b"\xff\xfe\xfa bad bytes")
    (folder / "img_001.txt").write_text("\n  \n")
    errors = _messages(_check(tmp_path), "error")
    assert f"{folder / 'img_000.txt'}: caption is not UTF-8 text" in errors
    assert any(e.startswith(f"{folder / 'img_001.txt'}: caption file is empty") for e in errors)


def test_warnings_small_missing_caption_trigger_duplicates_few_rotated(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "dataset", [(512, 512)] * 5, name="zed")
    write_image(folder / "small.png", (200, 200), (50, 60, 70))
    (folder / "small.caption").write_text("zed")
    (folder / "copy.png").write_bytes((folder / "img_000.png").read_bytes())
    (folder / "copy.txt").write_text("zed, copy")
    rotated = Image.new("RGB", (640, 512), (90, 10, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(folder / "rotated.jpg", exif=exif)
    (folder / "rotated.txt").write_text("zed rotated")
    text = TUTORIAL_CONFIG.replace('train_data_dir = "./dataset"', 'train_data_dir = "./dataset"\ntrigger_word = "zed"')
    report = inspect_dataset(load_config(write_config(tmp_path, text)).train)
    assert report.errors == []
    warnings = _messages(report, "warning")
    joined = "\n".join(warnings)
    assert f"{folder / 'small.png'}: 200x200 is smaller than the training resolution 512x512" in joined
    assert "no caption file (small.txt); it is trained with the folder's name as its caption: 'zed'" in joined
    assert 'Found small.caption: set caption_extension = ".caption"' in joined
    assert f"{folder / 'img_000.png'}: same content as {folder / 'copy.png'}" in joined
    assert "only 8 training images" in joined
    assert f"{folder / 'rotated.jpg'}: has an EXIF orientation (6)" in joined and "512x640" in joined
    # captions from make_dataset say "sks dog", not the trigger word
    assert sum("does not contain the trigger word 'zed'" in w for w in warnings) == 5
    plan = report.step_plan
    assert plan is not None and plan.samples_per_epoch == 80


def test_misnamed_format_is_a_warning_not_an_error(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "dataset", [(512, 512)] * 20)
    write_image(folder / "jpeg_named_png.png", (512, 512), (4, 5, 6), "JPEG")
    (folder / "jpeg_named_png.txt").write_text("sks dog")
    report = _check(tmp_path)
    assert report.errors == []
    assert any("is a JPEG file with a .png name" in w for w in _messages(report, "warning"))


def test_hidden_folders_are_ignored(tmp_path: Path) -> None:
    make_dataset(tmp_path / "dataset", [(512, 512)] * 20)
    (tmp_path / "dataset" / ".ipynb_checkpoints").mkdir()
    assert _check(tmp_path).errors == []


def test_surplus_regularisation_images_are_not_used(tmp_path: Path) -> None:
    # 10 images x 10 repeats = 100 training samples; 500 reg images x 1: kohya adds only the first 100
    make_dataset(tmp_path / "dataset", [(64, 64)] * 10, repeats=10)
    make_dataset(tmp_path / "reg", [(64, 64)] * 500, repeats=1, name="dog")
    text = TUTORIAL_CONFIG.replace(
        'train_data_dir = "./dataset"', 'train_data_dir = "./dataset"\nreg_data_dir = "./reg"'
    )
    text = text.replace("resolution = 512", "resolution = 64").replace("min_bucket_reso = 256", "min_bucket_reso = 64")
    report = inspect_dataset(load_config(write_config(tmp_path, text)).train)
    plan = report.step_plan
    assert plan is not None and plan.samples_per_epoch == 200
    assert any("400 regularisation image(s) are not used" in f.message for f in report.warnings)
