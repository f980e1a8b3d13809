"""The upload list: only the dataset's images and captions (and the sample prompts file) go up."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from remote.config import load_config
from rentrain.upload_list import UploadFolder, list_dataset_files, plan_upload


def _png(size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def _dataset(tmp_path: Path) -> Path:
    root = tmp_path / "dataset"
    subset = root / "10_zed"
    subset.mkdir(parents=True)
    (subset / "a.png").write_bytes(_png())
    (subset / "a.txt").write_text("zed, a photo\n")
    (subset / "b.png").write_bytes(_png())  # no caption: trained with the folder's name
    return root


def _reasons(listing: UploadFolder) -> dict[str, str]:
    """{path relative to the dataset folder: why it stays here}"""
    return {Path(s.path).relative_to(listing.root).as_posix(): s.reason for s in listing.skipped}


def test_only_images_and_their_captions_are_listed(tmp_path: Path) -> None:
    root = _dataset(tmp_path)
    subset = root / "10_zed"
    (subset / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    (subset / ".env").write_text("VAST_API_KEY=secret\n")
    (subset / "credentials.toml").write_text('vast = "secret"\n')
    (subset / "orphan.txt").write_text("a caption without an image\n")
    (subset / "raw").mkdir()
    (subset / "raw" / "c.png").write_bytes(_png())
    (root / "credentials.toml").write_text('vast = "secret"\n')
    (root / ".git").mkdir()

    listing = list_dataset_files(root, ".txt")

    assert listing.files == ["10_zed/a.png", "10_zed/a.txt", "10_zed/b.png"]
    assert listing.bytes == sum((root / name).stat().st_size for name in listing.files)
    assert _reasons(listing) == {
        "10_zed/id_rsa": "not an image or a caption",
        "10_zed/credentials.toml": "not an image or a caption",
        "10_zed/.env": "a hidden file or folder",
        "10_zed/orphan.txt": "a caption with no image of the same name",
        "10_zed/raw": "a folder inside an image folder",
        "credentials.toml": "not inside an N_name image folder",
        ".git": "a hidden file or folder",
    }


def test_links_go_up_only_when_they_lead_to_an_image_or_a_caption(tmp_path: Path) -> None:
    root = _dataset(tmp_path)
    subset = root / "10_zed"
    outside = tmp_path / "home"
    outside.mkdir()
    (outside / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    (outside / "portrait.jpg").write_bytes(_png())  # a PNG with a .jpg name decodes: the check only warns
    (outside / "caption.txt").write_text("zed, a portrait\n")
    (outside / "fake.png").write_text("not an image at all")
    (subset / "portrait.jpg").symlink_to(outside / "portrait.jpg")
    (subset / "portrait.txt").symlink_to(outside / "caption.txt")
    (subset / "key").symlink_to(outside / "id_rsa")
    (subset / "stolen.png").symlink_to(outside / "id_rsa")
    (subset / "stolen.txt").symlink_to(outside / "id_rsa")
    (subset / "fake.png").symlink_to(outside / "fake.png")
    (subset / "gone.png").symlink_to(outside / "deleted.png")

    listing = list_dataset_files(root, ".txt")

    assert "10_zed/portrait.jpg" in listing.files and "10_zed/portrait.txt" in listing.files
    assert not {"10_zed/key", "10_zed/stolen.png", "10_zed/stolen.txt", "10_zed/fake.png", "10_zed/gone.png"} & set(
        listing.files
    )
    reasons = _reasons(listing)
    assert reasons["10_zed/stolen.png"].endswith("which is not an image")
    assert reasons["10_zed/stolen.txt"] == "its image is not uploaded"
    assert reasons["10_zed/fake.png"].endswith("which is not an image")
    assert "does not exist" in reasons["10_zed/gone.png"]
    assert reasons["10_zed/key"] == "not an image or a caption"


def test_a_linked_caption_must_be_a_caption_file(tmp_path: Path) -> None:
    root = _dataset(tmp_path)
    secret = tmp_path / "credentials"
    secret.write_text("token\n")
    (root / "10_zed" / "b.txt").symlink_to(secret)  # b.png's caption name, leading to a file without .txt
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00binary")
    (root / "10_zed" / "c.png").write_bytes(_png())
    (root / "10_zed" / "c.txt").symlink_to(binary)

    listing = list_dataset_files(root, ".txt")

    assert "10_zed/b.png" in listing.files and "10_zed/b.txt" not in listing.files
    assert "10_zed/c.png" in listing.files and "10_zed/c.txt" not in listing.files
    reasons = _reasons(listing)
    assert "which is not a caption file (.txt)" in reasons["10_zed/b.txt"]
    assert "which is not a caption" in reasons["10_zed/c.txt"]


def test_a_linked_image_folder_goes_up_under_its_own_name(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    root.mkdir()
    pictures = tmp_path / "Pictures"
    pictures.mkdir()
    (pictures / "x.png").write_bytes(_png())
    (pictures / "x.txt").write_text("zed\n")
    (pictures / "passwords.kdbx").write_bytes(b"secret")
    (root / "5_zed").symlink_to(pictures, target_is_directory=True)

    listing = list_dataset_files(root, ".txt")

    assert listing.files == ["5_zed/x.png", "5_zed/x.txt"]
    assert _reasons(listing)["5_zed/passwords.kdbx"] == "not an image or a caption"


def test_the_plan_counts_both_folders_and_the_prompts_file(tmp_path: Path) -> None:
    root = _dataset(tmp_path)
    reg = tmp_path / "reg" / "1_person"
    reg.mkdir(parents=True)
    (reg / "r.png").write_bytes(_png(32))
    (reg / "notes.md").write_text("private notes")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zed, a portrait\n")
    config = tmp_path / "config.toml"
    config.write_text(
        '[model]\npretrained_model_name_or_path = "builtin:tiny-sd15"\n'
        '[dataset]\ntrain_data_dir = "dataset"\nreg_data_dir = "reg"\nresolution = 64\n'
        "[training]\nmax_train_epochs = 1\nlearning_rate = 1e-4\n"
        '[sample]\nsample_prompts = "prompts.txt"\n'
    )
    train = load_config(config).train

    plan = plan_upload(train)

    assert [f.files for f in plan.folders] == [["10_zed/a.png", "10_zed/a.txt", "10_zed/b.png"], ["1_person/r.png"]]
    expected_bytes = sum(p.stat().st_size for p in [*root.rglob("*.*"), reg / "r.png", prompts])
    assert plan.file_count == 5 and plan.bytes == expected_bytes
    assert plan.summary().startswith(f"5 files, {expected_bytes / 1e6:.1f} MB will be uploaded")
    assert "1 other file(s)" in plan.summary()
    dumped = plan.model_dump(mode="json")  # as `rentrain check --json` shows it
    assert dumped["file_count"] == 5 and dumped["bytes"] == expected_bytes
    assert "files" not in dumped["folders"][0]
    assert dumped["folders"][1]["skipped"] == [{"path": str(reg / "notes.md"), "reason": "not an image or a caption"}]
