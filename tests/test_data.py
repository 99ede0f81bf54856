"""Data plumbing: folders of every mode and format, bad files, caching, the NN Lab split, shapes, batches, grids."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import common
import image_data
from common import UserError
from conftest import SHARED_DATA, write_image_folder


def test_every_mode_and_format_loads_as_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    samples = {
        "rgb.png": Image.fromarray(rgb),
        "gray.png": Image.fromarray(rgb[:, :, 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((30, 40), 255, np.uint8)])),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "photo.jpg": Image.fromarray(rgb),
        "bitmap.bmp": Image.fromarray(rgb),
        "gray.tiff": Image.fromarray(rgb[:, :, 1]),
        "web.webp": Image.fromarray(rgb),
        "la.png": Image.fromarray(rgb[:, :, 0]).convert("LA"),
    }
    for name, img in samples.items():
        img.save(tmp_path / name)
    data = image_data.load_image_folder(tmp_path, image_size=16, cache_dir=tmp_path / "cache")
    assert data.images.shape == (len(samples), 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.class_names == [tmp_path.name] and data.labels.tolist() == [0] * len(samples)


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    data = image_data.load_image_folder(tmp_path, image_size=8, cache_dir=tmp_path / "cache")
    assert data.images.min() == 255


def test_channels_default_to_one_only_when_all_grayscale(tmp_path):
    gray, mixed = tmp_path / "gray", tmp_path / "mixed"
    gray.mkdir(), mixed.mkdir()
    for folder in (gray, mixed):
        Image.new("L", (10, 10), 100).save(folder / "a.png")
    Image.new("RGB", (10, 10), (1, 2, 3)).save(mixed / "b.png")
    assert image_data.load_image_folder(gray, 8, cache_dir=tmp_path / "c").images.shape[1] == 1
    assert image_data.load_image_folder(mixed, 8, cache_dir=tmp_path / "c").images.shape[1] == 3
    assert image_data.load_image_folder(gray, 8, channels=3, cache_dir=tmp_path / "c").images.shape[1] == 3


def test_resize_is_pil_bilinear_of_the_rgb_image(tmp_path):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    img.save(tmp_path / "x.png")
    expected = np.asarray(img.resize((24, 24), Image.BILINEAR)).transpose(2, 0, 1)
    data = image_data.load_image_folder(tmp_path, 24, cache_dir=tmp_path / "cache")
    assert np.array_equal(data.images[0].numpy(), expected)


def test_corrupt_and_non_image_files_are_skipped_with_one_warning(tmp_path):
    write_image_folder(tmp_path, per_class=3)
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "b" / "truncated.png").write_bytes((tmp_path / "b" / "000.png").read_bytes()[:40])
    (tmp_path / "a" / "notes.txt").write_text("hello")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = image_data.load_image_folder(tmp_path, 8, cache_dir=tmp_path / "cache")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "skipped 2 unreadable" in messages[0]
    assert data.images.shape[0] == 6 and data.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_class_folders_in_imagefolder_order(tmp_path):
    for cls, names in {"zeta": ["b.png", "a.png"], "alpha": ["c.png"], "mid": ["sub/z.png", "y.png"]}.items():
        for name in names:
            (tmp_path / cls / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4)).save(tmp_path / cls / name)
    files, labels, classes = image_data.list_image_folder(tmp_path)
    assert classes == ["alpha", "mid", "zeta"]
    assert [str(f.relative_to(tmp_path)) for f in files] == ["alpha/c.png", "mid/y.png", "mid/sub/z.png",
                                                              "zeta/a.png", "zeta/b.png"]
    assert labels == [0, 1, 1, 2, 2]


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        image_data.load_image_folder(tmp_path / "nope", 8)
    (tmp_path / "empty" / "classdir").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        image_data.load_image_folder(tmp_path / "empty", 8)


def test_second_load_decodes_nothing_and_a_change_invalidates(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "data", per_class=4)
    cache = tmp_path / "cache"
    first = image_data.load_image_folder(root, 12, cache_dir=cache)
    assert first.images.is_contiguous()  # (N, C, H, W) row-major, the same whether decoded or cached

    def no_decoding(*args):
        raise AssertionError("decoded although cached")

    with monkeypatch.context() as m:
        m.setattr(image_data, "_decode", no_decoding)
        second = image_data.load_image_folder(root, 12, cache_dir=cache)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert first.class_names == second.class_names
    Image.new("RGB", (20, 20), (0, 0, 0)).save(root / "a" / "999.png")  # a new file: decode again
    third = image_data.load_image_folder(root, 12, cache_dir=cache)
    assert third.images.shape[0] == first.images.shape[0] + 1
    assert image_data.load_image_folder(root, 16, cache_dir=cache).images.shape[-1] == 16  # other size: other key


def test_split_matches_random_split_after_manual_seed():
    for n in (10, 2588, 3000):
        train_idx, val_idx = image_data.split_indices(n, seed=0)
        torch.manual_seed(0)
        ref_train, ref_val = torch.utils.data.random_split(range(n), [int(0.8 * n), n - int(0.8 * n)])
        assert train_idx.tolist() == list(ref_train.indices) and val_idx.tolist() == list(ref_val.indices)
    a, b = image_data.split_indices(100, seed=0), image_data.split_indices(100, seed=1)
    assert not torch.equal(a[0], b[0])
    assert sorted(a[0].tolist() + a[1].tolist()) == list(range(100))


def test_shapes_are_deterministic_and_varied():
    a = image_data.make_shapes(n=90, image_size=24, seed=0)
    b = image_data.make_shapes(n=90, image_size=24, seed=0)
    c = image_data.make_shapes(n=90, image_size=24, seed=1)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.images.shape == (90, 3, 24, 24) and len(a.class_names) == 9
    assert torch.bincount(a.labels).tolist() == [10] * 9
    per_image_std = a.images.float().flatten(1).std(1)
    assert per_image_std.min() > 10  # every image holds a visible shape, not a blank
    assert image_data.make_shapes(n=9, image_size=28, channels=1).images.shape == (9, 1, 28, 28)
    # antialiased: edge pixels take values between background and shape
    assert len(torch.unique(a.images[0])) > 20


def test_batches_cover_the_set_once_and_flip_mirrors():
    images = torch.arange(10 * 3 * 2 * 2, dtype=torch.uint8).reshape(10, 3, 2, 2)
    labels = torch.arange(10)
    seen = torch.cat([y for _, y in image_data.iterate_batches(images, labels, 4, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))
    x, _ = next(image_data.iterate_batches(images, labels, 10, shuffle=False))
    assert x.dtype == torch.float32 and torch.allclose(x, images.float() / 255)
    flipped = torch.cat([x for x, _ in image_data.iterate_batches(images, labels, 10, torch.Generator().manual_seed(3),
                                                               flip=True, shuffle=False)])
    mirrored = [torch.equal(flipped[i], images[i].float().div(255).flip(-1)) for i in range(10)]
    kept = [torch.equal(flipped[i], images[i].float().div(255)) for i in range(10)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)


def test_flip_mirrors_a_layout_with_its_image():
    # each layout is the image's first channel, so image and map agree exactly when they are mirrored together
    images = torch.randint(0, 5, (16, 3, 4, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    layouts = images[:, 0].clone()
    batches = list(image_data.iterate_batches(images, layouts, 5, torch.Generator().manual_seed(1), flip=True))
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert torch.equal((x[:, 0] * 255).round().to(torch.uint8), y)
    mirrored = [not torch.equal(a, b) for a, b in zip(y, layouts[torch.randperm(16, generator=torch.Generator()
                                                                               .manual_seed(1))])]
    assert any(mirrored) and not all(mirrored)
    assert torch.equal(layouts, images[:, 0])   # the data in memory is not flipped in place


def test_grid_places_images_row_by_row(tmp_path):
    images = torch.stack([torch.full((3, 4, 5), v / 10) for v in range(10)])
    grid = common.make_grid(images, nrow=4, padding=2)
    assert grid.shape == (3, 3 * 6 + 2, 4 * 7 + 2)
    assert torch.all(grid[:, 2:6, 2:7] == 0.0) and torch.all(grid[:, 8:12, 9:14] == 0.5)
    assert torch.all(grid[:, 0, :] == 1.0)  # padding
    path = common.save_image_grid(images, tmp_path / "g.png", nrow=4, scale=2)
    assert Image.open(path).size == (grid.shape[2] * 2, grid.shape[1] * 2)
    both = common.comparison_grid([images[:4], images[4:8]], nrow=4)
    assert both.shape[1] == 2 * (4 + 4)


def test_saved_grid_is_torchvision_save_image_scaled_up(tmp_path):
    from torchvision.utils import save_image

    halves = torch.arange(1, 510, 2, dtype=torch.float32)[:240] / 510        # 255 x = k + 1/2: rounding decides
    images = torch.cat([halves, torch.tensor([-0.5, 1.5] * 60)]).reshape(10, 3, 4, 3)   # and values outside [0, 1]
    common.save_image_grid(images, tmp_path / "ours.png", nrow=4, scale=3)
    save_image(images.clamp(0, 1), tmp_path / "torchvision.png", nrow=4, padding=2, pad_value=1.0)
    reference = np.asarray(Image.open(tmp_path / "torchvision.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ours.png")), reference.repeat(3, axis=0).repeat(3, axis=1))
    top_left = reference[2:6, 2:5].transpose(2, 0, 1).ravel()
    assert top_left.tolist() == [(k + 1) // 2 for k in range(1, 72, 2)]     # floor(255 x + 0.5), not round-half-even
    assert reference[0].min() == 255 and reference[-1].min() == 255         # white padding


@pytest.mark.skipif(not (SHARED_DATA / "flowers").is_dir(), reason="shared flowers data not present")
def test_flowers_folder_as_the_nn_lab_uses_it(tmp_path):
    data = image_data.load_image_folder(SHARED_DATA / "flowers", 24, cache_dir=tmp_path)
    assert data.class_names == ["astilbe", "bellflower", "calendula"]
    assert data.images.shape == (2588, 3, 24, 24)
    assert torch.bincount(data.labels).tolist() == [737, 873, 978]
    train_idx, val_idx = image_data.split_indices(len(data.images), 0)
    assert (len(train_idx), len(val_idx)) == (2070, 518)


@pytest.mark.skipif(not (SHARED_DATA / "mnist_test").is_dir(), reason="shared MNIST data not present")
def test_grayscale_pngs_give_one_channel(tmp_path):
    folder = tmp_path / "mnist"
    for digit in ("3", "7"):
        (folder / digit).mkdir(parents=True)
        for src in sorted((SHARED_DATA / "mnist_test" / digit).iterdir())[:5]:
            (folder / digit / src.name).write_bytes(src.read_bytes())
    data = image_data.load_image_folder(folder, 28, cache_dir=tmp_path / "cache")
    assert data.images.shape == (10, 1, 28, 28) and data.class_names == ["3", "7"]
