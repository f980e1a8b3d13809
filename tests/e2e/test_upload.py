"""Only the dataset goes up: a run on the simulated market sends the images and captions, and none of the
private files a dataset folder may hold or link to."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.e2e.conftest import EXAMPLE_IMAGES, Client, write_job
from tests.sim.provider_sim import ProviderSimulator

MARKER = "rentrain-e2e-secret-4f1c"  # in every private file: found in no file on the instance afterwards
PRIVATE_NAMES = {"id_rsa", ".env", "credentials.toml", "notes"}


def _files_under(root: Path) -> list[Path]:
    return [Path(folder) / name for folder, _, names in os.walk(root) for name in names]


def test_only_images_and_captions_reach_the_instance(tmp_path: Path, market: ProviderSimulator, client: Client) -> None:
    config = write_job(tmp_path / "job")
    dataset = tmp_path / "job" / "dataset"
    subset = dataset / "1_toy"
    outside = tmp_path / "home-of-the-user"
    outside.mkdir()
    (outside / "id_rsa").write_text(f"-----BEGIN OPENSSH PRIVATE KEY-----\n{MARKER}\n-----END OPENSSH PRIVATE KEY-----")
    shutil.copy(EXAMPLE_IMAGES / "toy_05.png", outside / "favourite.png")
    shutil.copy(EXAMPLE_IMAGES / "toy_05.txt", outside / "favourite.txt")
    (subset / "id_rsa").write_text(f"-----BEGIN OPENSSH PRIVATE KEY-----\n{MARKER}\n")
    (subset / ".env").write_text(f"VAST_API_KEY={MARKER}\n")
    (subset / "credentials.toml").write_text(f'vast = "{MARKER}"\n')
    (subset / "notes").symlink_to(outside / "id_rsa")  # a link to a private file outside the folder
    (subset / "toy_05.png").symlink_to(outside / "favourite.png")  # a link to an image: it goes up, as a file
    (subset / "toy_05.txt").symlink_to(outside / "favourite.txt")
    (dataset / "credentials.toml").write_text(f'runpod = "{MARKER}"\n')
    images_and_captions = sorted(p.name for p in subset.iterdir() if p.name.startswith("toy_"))

    check = client.run("check", str(config))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Upload: 10 files" in check.stdout
    for name in ("id_rsa", ".env", "credentials.toml", "notes"):
        assert f"not uploaded: {subset / name}: " in check.stdout, name
    assert f"not uploaded: {dataset / 'credentials.toml'}: not inside an N_name image folder" in check.stdout

    result = client.run("run", str(config), "--provider", "vast", "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "10 files, " in result.stdout and "MB will be uploaded" in result.stdout
    assert client.jobs()[-1]["outcome"] == "succeeded"

    (instance,) = market.instances.values()
    on_instance = _files_under(instance.sshd.workdir)
    uploaded = [p for p in on_instance if p.parent.name == "1_toy" and p.parent.parent.name == "dataset"]
    assert sorted(p.name for p in uploaded) == images_and_captions
    assert not any(p.is_symlink() for p in uploaded)
    assert (uploaded[0].parent / "toy_05.png").read_bytes() == (outside / "favourite.png").read_bytes()
    assert not [p for p in _files_under(instance.sshd.root) if p.name in PRIVATE_NAMES]
    assert not [p for p in _files_under(instance.sshd.root) if p.is_file() and MARKER.encode() in p.read_bytes()]
