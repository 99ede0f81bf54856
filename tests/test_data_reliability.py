"""Data folders as users really have them: links and loops, unreadable files, 16-bit images, tiny folders,
a damaged cache; the data fingerprint; torchvision's folder conventions."""
import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

import common
from common import UserError
from conftest import REPO, write_image_folder


@contextmanager
def time_limit(seconds):
    """Turn a hang into a failure: SIGALRM raises in the main thread after `seconds`."""
    def give_up(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def resized(path, size):
    """The loader's decoding of one RGB file, computed independently: PIL's RGB image resized bilinear, (C, H, W)."""
    return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)


# --- folders: torchvision's conventions, links, wording -----------------------------------------

def test_import_common_does_not_import_torchvision():
    probe = "import sys, common; print('torchvision' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_class_folders_read_as_torchvision_imagefolder_lists_them(tmp_path):
    from torchvision.datasets import ImageFolder

    root = write_image_folder(tmp_path / "data", per_class=2, size=6, classes=("zeta", "Alpha", "mid"))
    (root / "mid" / "sub").mkdir()
    Image.new("RGB", (6, 6), (9, 9, 9)).save(root / "mid" / "sub" / "z.PNG")   # nested, upper-case extension
    Image.new("RGB", (6, 6), (7, 7, 7)).save(root / "mid-b.png")                # beside the classes: not read
    (root / "zeta" / "notes.txt").write_text("not an image")
    (root / "zeta" / "broken.jpg").write_bytes(b"not a jpeg")                   # listed by both, unreadable
    reference = ImageFolder(str(root))
    files, labels, classes = common.list_image_folder(root)
    assert classes == reference.classes == ["Alpha", "mid", "zeta"]
    assert [(str(f), label) for f, label in zip(files, labels)] == reference.samples
    readable = [(path, label) for path, label in reference.samples if not path.endswith("broken.jpg")]
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        data = common.load_image_folder(root, 6, cache_dir=tmp_path / "cache")
    assert data.labels.tolist() == [label for _, label in readable]
    assert np.array_equal(data.images.numpy(), np.stack([resized(path, 6) for path, _ in readable]))


def test_a_link_to_the_folder_itself_reads_each_image_once(tmp_path):
    root = write_image_folder(tmp_path, per_class=3, size=4, classes=("flat",)) / "flat"
    os.symlink(".", root / "again")
    data = common.load_image_folder(root, 4, cache_dir=tmp_path / "cache")
    assert data.images.shape[0] == 3 and data.class_names == ["flat"]


def test_links_to_parents_and_to_other_classes_neither_hang_nor_duplicate(tmp_path):
    root = write_image_folder(tmp_path / "data", per_class=2, size=4)
    os.symlink("..", root / "a" / "up")
    os.symlink("..", root / "b" / "up")
    os.symlink("../a", root / "b" / "to_a")
    os.symlink(".", root / "b" / "self")
    with time_limit(20):
        files, labels, classes = common.list_image_folder(root)
    assert classes == ["a", "b"] and labels == [0, 0, 1, 1]
    assert [str(f.relative_to(root)) for f in files] == ["a/000.png", "a/001.png", "b/000.png", "b/001.png"]


def test_a_link_to_another_real_folder_is_followed(tmp_path):
    elsewhere = write_image_folder(tmp_path / "elsewhere", per_class=2, size=4, classes=("birds",), seed=1)
    root = write_image_folder(tmp_path / "data", per_class=1, size=4)
    os.symlink(elsewhere / "birds", root / "birds")               # a linked class
    os.symlink(elsewhere / "birds", root / "a" / "more")          # the same real folder again: read once
    files, labels, classes = common.list_image_folder(root)
    assert classes == ["a", "b", "birds"] and labels == [0, 1, 2, 2]
    assert [str(f.relative_to(root)) for f in files] == ["a/000.png", "b/000.png", "birds/000.png", "birds/001.png"]


def test_data_pointing_to_a_file_says_so(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match=r"'.*photo.jpg' is a file, not a folder; pass --data PATH to a folder"):
        common.load_data(str(tmp_path / "photo.jpg"), 8)
