"""Data folders as users really have them: links and loops, unreadable files, 16-bit images, tiny folders,
a damaged cache; the data fingerprint; torchvision's folder conventions; large freed blocks kept for reuse."""
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
import image_data
from common import UserError
from conftest import REPO, write_image_folder


@contextmanager
def time_limit(seconds):
    """Turn a hang into a failure: SIGALRM fails the test from the main thread after `seconds`."""
    def give_up(signum, frame):  # not TimeoutError: it is an OSError, which os.walk swallows
        pytest.fail(f"still running after {seconds} s")

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


@pytest.mark.skipif(common.glibc_mallopt() is None, reason="keep_freed_memory sets glibc's malloc")
def test_keep_freed_memory_reuses_a_freed_block_instead_of_mapping_it_again():
    """A 64 MB tensor made and freed again and again: with glibc's defaults each one is a fresh mapping whose pages
    fault in anew; after keep_freed_memory (every script's start) the heap keeps the block, and once the heap has
    grown to it, at most a few rounds fault (here 0 or 2 of 30: the heap growing past a small block left above)."""
    probe = ("import resource, sys, torch, common\n"
             "if sys.argv[1] == 'keep': common.keep_freed_memory()\n"
             "for _ in range(5): torch.ones(16 * 2 ** 20).sum()\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "for _ in range(30): torch.ones(16 * 2 ** 20).sum()\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    faults = {setting: int(subprocess.run([sys.executable, "-c", probe, setting], cwd=REPO, capture_output=True,
                                          text=True, check=True).stdout)
              for setting in ("default", "keep")}
    assert faults["keep"] * 3 < faults["default"], faults   # here 0 or 32,768 against 30 x 16,384 pages of 4 KB


def test_class_folders_read_as_torchvision_imagefolder_lists_them(tmp_path):
    from torchvision.datasets import ImageFolder

    root = write_image_folder(tmp_path / "data", per_class=2, size=6, classes=("zeta", "Alpha", "mid"))
    (root / "mid" / "sub").mkdir()
    Image.new("RGB", (6, 6), (9, 9, 9)).save(root / "mid" / "sub" / "z.PNG")   # nested, upper-case extension
    Image.new("RGB", (6, 6), (7, 7, 7)).save(root / "mid-b.png")                # beside the classes: not read
    (root / "zeta" / "notes.txt").write_text("not an image")
    (root / "zeta" / "broken.jpg").write_bytes(b"not a jpeg")                   # listed by both, unreadable
    reference = ImageFolder(str(root))
    files, labels, classes = image_data.list_image_folder(root)
    assert classes == reference.classes == ["Alpha", "mid", "zeta"]
    assert [(str(f), label) for f, label in zip(files, labels)] == reference.samples
    readable = [(path, label) for path, label in reference.samples if not path.endswith("broken.jpg")]
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        data = image_data.load_image_folder(root, 6, cache_dir=tmp_path / "cache")
    assert data.labels.tolist() == [label for _, label in readable]
    assert np.array_equal(data.images.numpy(), np.stack([resized(path, 6) for path, _ in readable]))


def test_a_link_to_the_folder_itself_reads_each_image_once(tmp_path):
    root = write_image_folder(tmp_path, per_class=3, size=4, classes=("flat",)) / "flat"
    os.symlink(".", root / "again")
    data = image_data.load_image_folder(root, 4, cache_dir=tmp_path / "cache")
    assert data.images.shape[0] == 3 and data.class_names == ["flat"]


def test_links_to_parents_and_to_other_classes_neither_hang_nor_duplicate(tmp_path):
    root = write_image_folder(tmp_path / "data", per_class=2, size=4)
    os.symlink("..", root / "a" / "up")
    os.symlink("..", root / "b" / "up")
    os.symlink("../a", root / "b" / "to_a")
    os.symlink(".", root / "b" / "self")
    with time_limit(20):
        files, labels, classes = image_data.list_image_folder(root)
    assert classes == ["a", "b"] and labels == [0, 0, 1, 1]
    assert [str(f.relative_to(root)) for f in files] == ["a/000.png", "a/001.png", "b/000.png", "b/001.png"]


def test_a_link_to_another_real_folder_is_followed(tmp_path):
    elsewhere = write_image_folder(tmp_path / "elsewhere", per_class=2, size=4, classes=("birds",), seed=1)
    root = write_image_folder(tmp_path / "data", per_class=1, size=4)
    os.symlink(elsewhere / "birds", root / "birds")               # a linked class
    os.symlink(elsewhere / "birds", root / "a" / "more")          # the same real folder again: read once
    files, labels, classes = image_data.list_image_folder(root)
    assert classes == ["a", "b", "birds"] and labels == [0, 1, 2, 2]
    assert [str(f.relative_to(root)) for f in files] == ["a/000.png", "b/000.png", "birds/000.png", "birds/001.png"]


def test_data_pointing_to_a_file_says_so(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match=r"'.*photo.jpg' is a file, not a folder; pass --data PATH to a folder"):
        image_data.load_data(str(tmp_path / "photo.jpg"), 8)


# --- unreadable files and a damaged cache ---------------------------------------------------------

def deny_reading(path, monkeypatch):
    """chmod 000; as root (who reads anyway) opening the file raises PermissionError as it would for a user."""
    path.chmod(0)
    if os.geteuid() == 0:
        real_open = open

        def guarded_open(file, *args, **kwargs):
            if os.fspath(file) == os.fspath(path):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr("builtins.open", guarded_open)


def load_warning(root, cache, **kwargs):
    """Load a folder; (data, the one warning's text). Fails unless exactly one warning is given."""
    with pytest.warns(UserWarning) as caught:
        data = image_data.load_image_folder(root, 8, cache_dir=cache, **kwargs)
    assert len(caught) == 1, [str(w.message) for w in caught]
    return data, str(caught[0].message)


def test_unreadable_files_are_skipped_counted_in_one_warning_and_remembered_by_the_cache(tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    grey = [np.full((8, 8), v, np.uint8) for v in (10, 120, 250)]
    for i, g in enumerate(grey):
        Image.fromarray(g).save(root / f"{i}.png")
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "notes.jpg").write_text("a text file named .jpg")
    os.symlink(tmp_path / "moved_away.png", root / "gone.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)             # 8 x 8 is fine, 20 x 20 is over twice the limit
    Image.new("RGB", (20, 20), (255, 0, 0)).save(root / "huge.png")  # (an RGB one: the grey files still give 1 channel)
    Image.new("RGB", (8, 8), (0, 0, 255)).save(root / "locked.png")
    deny_reading(root / "locked.png", monkeypatch)
    data, message = load_warning(root, tmp_path / "cache")
    assert message.startswith(f"skipped 5 unreadable image file(s) in '{root}' (e.g. broken.jpg (")
    assert np.array_equal(data.images.numpy(), np.stack(grey)[:, None])   # 1 channel: all readable ones are grey
    monkeypatch.setattr(image_data, "_decode", lambda *args: pytest.fail("decoded although cached"))
    cached, cached_message = load_warning(root, tmp_path / "cache")
    assert cached_message == message and torch.equal(cached.images, data.images)


def test_a_folder_with_no_readable_image_is_a_user_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"garbage")
    (tmp_path / "b.png").write_text("")
    with pytest.raises(UserError, match=r"none of the 2 image files in '.*' could be read \(e.g. a.jpg \("):
        image_data.load_image_folder(tmp_path, 8, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_an_unreadable_cache_file_is_rebuilt_with_one_warning(tmp_path, monkeypatch, damage):
    root = write_image_folder(tmp_path / "data", per_class=2, size=8)
    cache = tmp_path / "cache"
    first = image_data.load_image_folder(root, 8, cache_dir=cache)
    [cache_file] = cache.iterdir()
    good = cache_file.read_bytes()
    cache_file.write_bytes({"garbage": b"\x00garbage" * 50, "truncated": good[:len(good) // 2], "empty": b""}[damage])
    rebuilt, message = load_warning(root, cache)
    assert f"the data cache '{cache_file}' was unreadable" in message and "rebuilt" in message
    assert torch.equal(rebuilt.images, first.images) and torch.equal(rebuilt.labels, first.labels)
    assert cache_file.read_bytes() == good
    monkeypatch.setattr(image_data, "_decode", lambda *args: pytest.fail("decoded although the cache was rebuilt"))
    image_data.load_image_folder(root, 8, cache_dir=cache)


# --- decoding --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, dtype", [("deep.png", np.uint16), ("deep.tif", np.int32)])  # modes I;16 and I
def test_16_bit_grey_is_scaled_to_8_bits(tmp_path, name, dtype):
    gradient = (np.arange(16 * 16).reshape(16, 16) * 257 + np.arange(16)).astype(dtype)   # 0 .. 65535, off the grid
    Image.fromarray(gradient).save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == {np.uint16: "I;16", np.int32: "I"}[dtype]
    data = image_data.load_image_folder(tmp_path, 16, cache_dir=tmp_path / "cache")
    expected = np.floor(gradient.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    assert data.images.shape == (1, 1, 16, 16) and np.array_equal(data.images[0, 0].numpy(), expected)


def test_grey_files_beside_colour_ones_decode_as_their_rgb_conversion(tmp_path):
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (9, 13), dtype=np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(rng.integers(0, 256, (9, 13, 2), dtype=np.uint8)).save(tmp_path / "grey_alpha.png")
    Image.fromarray(rng.integers(0, 256, (11, 7, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    data = image_data.load_image_folder(tmp_path, 6, cache_dir=tmp_path / "cache")
    alpha = Image.open(tmp_path / "grey_alpha.png").convert("RGBA")
    on_white = Image.alpha_composite(Image.new("RGBA", alpha.size, (255,) * 4), alpha).convert("RGB")
    expected = [resized(tmp_path / "grey.png", 6), np.asarray(on_white.resize((6, 6), Image.BILINEAR)).transpose(2, 0, 1),
                resized(tmp_path / "rgb.png", 6)]
    assert np.array_equal(data.images.numpy(), np.stack(expected))


# --- the split and the fingerprint ---------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1])
def test_too_few_images_for_the_split_is_a_user_error(n):
    with pytest.raises(UserError, match=rf"^{n} image\(s\) are too few: the 80%/20% train/validation split leaves "
                                        rf"0 training and {n} validation images; use a folder with at least 2"):
        image_data.split_indices(n)
    train_idx, val_idx = image_data.split_indices(2)
    assert len(train_idx) == 1 and len(val_idx) == 1


def test_fingerprint_is_the_same_for_the_same_data_and_changes_with_it(tmp_path):
    root = write_image_folder(tmp_path / "data", per_class=3, size=6)
    decoded = image_data.load_image_folder(root, 6, cache_dir=tmp_path / "cache")
    cached = image_data.load_image_folder(root, 6, cache_dir=tmp_path / "cache")
    copied = image_data.load_image_folder(write_image_folder(tmp_path / "copy", per_class=3, size=6), 6,
                                          cache_dir=tmp_path / "cache")
    assert len(decoded.fingerprint) == 16 and int(decoded.fingerprint, 16) >= 0
    assert decoded.fingerprint == cached.fingerprint == copied.fingerprint
    Image.new("RGB", (6, 6)).save(root / "b" / "new.png")
    one_more_image = image_data.load_image_folder(root, 6, cache_dir=tmp_path / "cache")
    write_image_folder(root, per_class=1, size=6, classes=("c",))
    one_more_class = image_data.load_image_folder(root, 6, cache_dir=tmp_path / "cache")
    (root / "c").rename(root / "d")
    renamed_class = image_data.load_image_folder(root, 6, cache_dir=tmp_path / "cache")
    fingerprints = {d.fingerprint for d in (decoded, one_more_image, one_more_class, renamed_class)}
    assert len(fingerprints) == 4
    shapes = image_data.make_shapes(n=18)
    assert shapes.fingerprint == image_data.make_shapes(n=18).fingerprint != image_data.make_shapes(n=18, seed=1).fingerprint
