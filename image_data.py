"""Image data in memory: folders (torchvision's ImageFolder conventions), the decoded-image cache, the built-in
`shapes`, the train/validation split and the batches.

    data = image_data.load_data("./flowers", image_size=24)       # ImageData: uint8 images, labels, class names
    train_idx, val_idx = image_data.split_indices(len(data.images), seed=0)

Every image is decoded once and kept as uint8; the decoded arrays are cached on disk (common.DEFAULT_CACHE_DIR),
keyed by the folder's file names, sizes and modification times. scenes.py adds the multi-label and layout data.
"""
import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import common
from common import UserError

SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L")  # made 8-bit L first, so not listed as grayscale below
GRAYSCALE_MODES = ("1", "L", "LA", "F")
# What reading a bad file raises: OSError (not an image, truncated, no permission, a dangling link),
# ValueError and SyntaxError (malformed headers, from some of PIL's decoders), and PIL's refusal of
# images over Image.MAX_IMAGE_PIXELS (a guard against decompression bombs).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
CACHE_FORMAT = 2  # bumped when the cached arrays change meaning, so an old cache is never misread


@dataclass
class ImageData:
    """A whole dataset in memory. images: (N, C, H, W) uint8; labels: (N,) int64 class indices.

    Data with richer conditions (scenes.py) also has `label_names` (K), `multilabels` (N, K) uint8, the multi-hot
    set of labels in each image, and `layouts` (N, H, W) uint8, 1 + the label at each pixel (0: background)."""
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list
    source: str
    label_names: list = None
    multilabels: torch.Tensor = None
    layouts: torch.Tensor = None

    @property
    def image_shape(self):
        return tuple(self.images.shape[1:])

    def conditions(self, kind):
        """The tensor of a condition kind ("class", "labels", "layout"), and the names its values index."""
        if kind == "class":
            return self.labels, self.class_names
        found = self.multilabels if kind == "labels" else self.layouts
        if found is None:
            raise UserError(f"'{self.source}' has no {'multi-hot labels' if kind == 'labels' else 'layouts'}; pass "
                            "--labels/--layouts files (see scenes.py), --data objects, or another --condition")
        return found, self.label_names

    @property
    def fingerprint(self):
        """16 hex digits of sha256 over the decoded images, labels, class names and any multi-hot labels and
        layouts: a checkpoint records it, and a resume can tell that the data changed."""
        digest = hashlib.sha256(json.dumps([list(self.images.shape), self.class_names]).encode())
        for tensor in (self.images, self.labels, self.multilabels, self.layouts):
            if tensor is not None:
                digest.update(tensor.contiguous().numpy().tobytes())
        if self.label_names is not None:
            digest.update(json.dumps(self.label_names).encode())
        return digest.hexdigest()[:16]


def list_image_folder(root):
    """Files and labels in the order torchvision's ImageFolder gives them, with two things it lacks.

    As ImageFolder: the classes are `find_classes` (the sub-folder names, sorted), each class folder is
    walked with links followed, folders sorted by path and files by name, extensions `IMG_EXTENSIONS`.
    Beyond it: a folder with images but no class sub-folders is one class named after the folder, and
    every real folder is read once, so a symlink loop neither hangs nor duplicates images.
    Class folders without images are not classes.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes  # here: importing torchvision takes ~1.4 s
    root = Path(root)
    if root.is_file():
        raise UserError(f"'{root}' is a file, not a folder; pass --data PATH to a folder of images "
                        "(or class sub-folders), or --data shapes")
    if not root.is_dir():
        raise UserError(f"data folder '{root}' does not exist; pass --data PATH to a folder of images, or --data shapes")
    visited = {os.path.realpath(root)}
    try:
        class_dirs = [name for name in find_classes(root)[0] if _first_visit(root / name, visited)]
    except FileNotFoundError:  # find_classes' way of saying there are no sub-folders
        class_dirs = []
    files, labels, class_names = [], [], []
    for class_name in class_dirs:
        found = _walk_images(root / class_name, IMG_EXTENSIONS, visited)
        if found:
            labels += [len(class_names)] * len(found)
            class_names.append(class_name)
            files += found
    if not files:  # flat layout: the images sit in the folder itself
        files = [root / f for f in sorted(os.listdir(root))
                 if f.lower().endswith(IMG_EXTENSIONS) and not (root / f).is_dir()]
        labels = [0] * len(files)
        class_names = [root.resolve().name]
    if not files:
        raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) found in '{root}'; "
                        "put images in it (or in one sub-folder per class)")
    return files, labels, class_names


def _first_visit(folder, visited):
    """True the first time a real folder is met (through any path or link); records it in `visited`."""
    real = os.path.realpath(folder)
    if real in visited:
        return False
    visited.add(real)
    return True


def _walk_images(folder, extensions, visited):
    """Image files under `folder` in make_dataset's order: folders sorted by path, files by name.

    A sub-folder whose real folder is in `visited` (the data folder, every class folder, every folder
    already walked) is not entered, which is what stops a link to `.` or `..` from looping.
    """
    walked = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        # Sorted first, so that of two links to one folder the same one is kept on every run.
        dirnames[:] = [d for d in sorted(dirnames) if _first_visit(os.path.join(dirpath, d), visited)]
        walked.append((dirpath, sorted(f for f in filenames if f.lower().endswith(extensions))))
    return [Path(dirpath) / f for dirpath, names in sorted(walked) for f in names]


def _to_rgb(img):
    """Any PIL mode to RGB; transparent pixels are composited onto white."""
    if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def _to_8_bit(img):
    """16-bit grey to L as value * 255 / 65535, rounded (PIL's own conversion clips at 255: near-white images).

    Mode I (32-bit) is how PIL opens many 16-bit files, so it is read on the same 0..65535 scale.
    """
    if img.mode not in SIXTEEN_BIT_MODES:
        return img
    values = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)
    return Image.fromarray(np.round(values * 255 / 65535).astype(np.uint8))  # uint8 (H, W): mode L


def _decode(path, image_size, channels):
    """One file to a (C, S, S) uint8 array; resize to S x S as torchvision's Resize((S, S)) does on PIL.

    channels=None keeps the file's own kind: 1 for a grayscale mode, 3 otherwise.
    """
    with Image.open(path) as img:
        img.load()
        img = _to_8_bit(img)
        if channels is None:
            channels = 1 if img.mode in GRAYSCALE_MODES else 3
        img = _to_rgb(img) if channels == 3 else _to_rgb(img).convert("L")
        # PIL's bilinear filter is antialiased when shrinking (its support widens with the scale).
        img = img.resize((image_size, image_size), Image.BILINEAR)
        array = np.asarray(img, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _decode_files(root, files, labels, image_size, channels):
    """Decode every readable file: (images (N, C, S, S) uint8, labels, the skipped files as 'path (error)')."""
    arrays, kept_labels, skipped = [], [], []
    for path, label in zip(files, labels):
        try:
            arrays.append(_decode(path, image_size, channels))
            kept_labels.append(label)
        except UNREADABLE as err:
            skipped.append(f"{path.relative_to(root)} ({type(err).__name__})")
    if not arrays:
        raise UserError(f"none of the {len(files)} image files in '{root}' could be read (e.g. {skipped[0]}); "
                        "check that they are images you can open, or pass --data PATH to another folder")
    if any(a.shape[0] == 3 for a in arrays):  # 1 channel only when every readable image is grayscale
        # Exactly the 3-channel decoding: grey to RGB copies the value, and the resize acts on each channel alike.
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    images = np.ascontiguousarray(np.stack(arrays))  # (N, C, H, W) in row-major order, as the cache gives it
    return images, np.asarray(kept_labels, dtype=np.int64), skipped


def _cache_key(root, files, image_size, channels):
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{Path(root).resolve()}|{image_size}|{channels}".encode())
    for f in files:
        try:
            stat = f.stat()
            digest.update(f"{f}|{stat.st_mtime_ns}|{stat.st_size}\n".encode())
        except OSError:  # a dangling link: skipped as unreadable, and a key all the same
            digest.update(f"{f}|missing\n".encode())
    return digest.hexdigest()[:24]


def _read_cache(cache_file):
    with open(cache_file, "rb") as f:  # our own handle: np.load leaks the one it opens when the zip is broken
        cached = np.load(f)
        return cached["images"], cached["labels"], json.loads(str(cached["skipped"]))


def _write_cache(cache_file, images, labels, skipped):
    """Write a temporary file, then rename: a crash never leaves a half-written cache under the real name."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_file.parent, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, images=images, labels=labels, skipped=json.dumps(skipped))
    os.replace(tmp.name, cache_file)


def load_image_folder(root, image_size=24, channels=None, cache_dir=None):
    """Decode a folder once and keep it in memory (see decode_cached); classes from its sub-folders."""
    files, labels, class_names = list_image_folder(root)
    images, kept_labels = decode_cached(root, files, labels, image_size, channels, cache_dir)
    return ImageData(images, kept_labels, class_names, str(root))


def decode_cached(root, files, labels, image_size=24, channels=None, cache_dir=None):
    """Decode `files` under `root` with their `labels` (ints): (images (N, C, S, S) uint8, labels (N,)) of the
    readable ones; the decoded arrays are cached on disk.

    The cache key covers the file list, mtimes and sizes, the image size and channels, so a changed folder is
    decoded again and an unchanged one is never decoded twice. The cache also remembers which files were
    unreadable, so every run gives the same warning.
    """
    if channels not in (None, 1, 3):
        raise UserError(f"--channels must be 1 or 3, got {channels}")
    cache_dir = common.DEFAULT_CACHE_DIR if cache_dir is None else cache_dir   # read now, so a test can move it
    cache_file = Path(cache_dir) / f"{_cache_key(root, files, image_size, channels)}.npz"
    decoded = None
    if cache_file.exists():
        try:
            decoded = _read_cache(cache_file)
        except Exception as err:  # truncated, overwritten, half-copied: whatever it is, decode again
            warnings.warn(f"the data cache '{cache_file}' was unreadable ({type(err).__name__}); "
                          "decoded the folder again and rebuilt it", stacklevel=3)
    if decoded is None:
        decoded = _decode_files(root, files, labels, image_size, channels)
        _write_cache(cache_file, *decoded)
    images, label_array, skipped = decoded
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image file(s) in '{root}' (e.g. {skipped[0]})", stacklevel=3)
    return torch.from_numpy(images), torch.from_numpy(label_array)


SHAPE_NAMES = ("circle", "square", "triangle")
SHAPE_COLOURS = {"red": (220, 50, 47), "green": (60, 170, 60), "blue": (38, 110, 210)}


def make_shapes(n=3000, image_size=24, channels=3, seed=0, supersample=4):
    """The built-in dataset: one coloured shape per image, 9 classes (3 shapes x 3 colours).

    Deterministic from `seed`. Size, position, rotation, colour shade and the light background
    vary; shapes are drawn at `supersample` times the size and shrunk, which antialiases the edges.
    """
    rng = np.random.default_rng(seed)
    big = image_size * supersample
    class_names = [f"{colour}_{shape}" for colour in SHAPE_COLOURS for shape in SHAPE_NAMES]
    images, labels = [], []
    for i in range(n):
        label = i % len(class_names)
        colour = np.array(SHAPE_COLOURS[class_names[label].split("_")[0]])
        shape = SHAPE_NAMES[label % len(SHAPE_NAMES)]
        background = tuple(int(v) for v in rng.integers(215, 250) + rng.integers(-8, 9, size=3))
        fill = tuple(int(v) for v in np.clip(colour + rng.integers(-25, 26, size=3), 0, 255))
        radius = rng.uniform(0.18, 0.38) * big
        cx, cy = rng.uniform(radius, big - radius, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        img = Image.new("RGB", (big, big), background)
        draw = ImageDraw.Draw(img)
        if shape == "circle":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        else:
            corners = 4 if shape == "square" else 3
            r = radius * (1.15 if shape == "triangle" else 1.0)
            draw.polygon([(cx + r * math.cos(angle + 2 * math.pi * k / corners),
                           cy + r * math.sin(angle + 2 * math.pi * k / corners)) for k in range(corners)], fill=fill)
        img = img.resize((image_size, image_size), Image.LANCZOS)
        if channels == 1:
            img = img.convert("L")
        array = np.asarray(img, dtype=np.uint8)
        images.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
        labels.append(label)
    return ImageData(torch.from_numpy(np.ascontiguousarray(np.stack(images))), torch.tensor(labels, dtype=torch.int64),
                     class_names, "shapes")


def load_data(data, image_size=24, channels=None, cache_dir=None, labels=None, label_names=None,
              layouts=None):
    """`--data`: 'shapes' or 'objects' (built in), or a folder of images; with `labels` (a train.json) or `layouts`
    (a folder of maps or a boxes .json) and `label_names` (an objects.json), the folder's multi-label data."""
    import scenes   # here: scenes.py builds on this module
    if data == "shapes":
        return make_shapes(image_size=image_size, channels=channels or 3)
    if data == "objects":
        return scenes.make_objects(image_size=image_size, channels=channels or 3)
    if labels or layouts or label_names:
        return scenes.load_labelled_folder(data, labels, label_names, layouts, image_size, channels, cache_dir)
    return load_image_folder(data, image_size, channels, cache_dir)


def split_indices(n, seed=0, train_fraction=0.8):
    """The usual notebook split: `torch.manual_seed(seed)` then `random_split(ds, [int(0.8 n), n - int(0.8 n)])`.

    random_split draws `randperm(n)` from the default generator; a fresh generator with the same
    seed draws the same permutation, without touching the global RNG.
    """
    n_train = int(train_fraction * n)
    if n_train < 1 or n - n_train < 1:
        raise UserError(f"{n} image(s) are too few: the {train_fraction:.0%}/{1 - train_fraction:.0%} train/validation "
                        f"split leaves {n_train} training and {n - n_train} validation images; "
                        "use a folder with at least 2 readable images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train:]


def to_float(images):
    """uint8 (B, C, H, W) to float in [0, 1]."""
    return images.float().div_(255)


def in_batches(fn, images, batch_size=256):
    """fn applied to uint8 images (N, C, H, W) as floats in [0, 1], batch_size at a time; its outputs joined along
    the first dimension."""
    return torch.cat([fn(to_float(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


def iterate_batches(images, labels, batch_size, generator=None, flip=False, shuffle=True, rank=0, world=1):
    """Batches (float images in [0, 1], labels) straight from in-memory tensors.

    With `flip`, each image is mirrored left-right with probability 1/2, and with it its condition where that is a
    per-pixel map (a layout, (N, H, W)): a mirrored image with its unmirrored layout would teach the model that
    objects may stand at either place. With `world` > 1 processes, process
    `rank` takes every world-th image of the permutation (the last N mod world dropped, so all take as many
    batches); all processes draw the same permutation and flips from equally seeded generators, so their
    shares are disjoint and their generators stay equal.
    """
    n = images.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    mirror = torch.rand(n, generator=generator) < 0.5 if flip else None   # at once: as drawn batch by batch
    maps = labels.dim() == 3                                              # layouts (N, H, W), not classes or labels
    positions = torch.arange(rank, n - n % world, world)                  # all of 0 .. n-1 in one process
    for start in range(0, len(positions), batch_size):
        at = positions[start:start + batch_size]
        idx = order[at]
        x, y = to_float(images[idx]), labels[idx]
        if flip:
            x[mirror[at]] = x[mirror[at]].flip(-1)
            if maps:
                y[mirror[at]] = y[mirror[at]].flip(-1)
        yield x, y
