"""Plumbing shared by every model and script: data, image grids, checkpoints, seeding, device, logging.

Nothing here knows about a particular model. Models live in their own files; train_script.py,
visualization.py and random_generation.py find them through the one registry dict in train_script.py.
"""
import argparse
import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L")  # made 8-bit L first, so not listed as grayscale below
GRAYSCALE_MODES = ("1", "L", "LA", "F")
# What reading a bad file raises: OSError (not an image, truncated, no permission, a dangling link),
# ValueError and SyntaxError (malformed headers, from some of PIL's decoders), and PIL's refusal of
# images over Image.MAX_IMAGE_PIXELS (a guard against decompression bombs).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
CACHE_FORMAT = 2  # bumped when the cached arrays change meaning, so an old cache is never misread
DEFAULT_CACHE_DIR = Path(os.environ.get("GENLAB_CACHE", Path.home() / ".cache" / "genlab"))


class UserError(Exception):
    """A problem with the user's input: scripts print it as one line and exit with status 2."""


class TrainingDiverged(Exception):
    """Training went numerically wrong (a NaN loss, a GAN whose D won): the loop exits with status 1, Best kept."""


def run_cli(main):
    """Run `main()`; a UserError becomes `error: ...` on stderr and exit status 2, Ctrl-C exit status 130."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's errors: one line `error: <problem> (see <prog> --help)`, exit status 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def checked(kind, low=None, high=None, below=None):
    """An argparse type for numbers: `kind` (int or float), finite, >= low, <= high and < below where given."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got '{text}'")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (low is not None and value < low) or (high is not None and value > high) or \
                (below is not None and value >= below):
            bounds = [f">= {low}" if low is not None else "", f"<= {high}" if high is not None else "",
                      f"< {below}" if below is not None else ""]
            raise argparse.ArgumentTypeError(f"must be {' and '.join(b for b in bounds if b)}, got {text}")
        return value
    return parse


def option(default, help, choices=None, low=None, high=None):
    """A Config field with its --help text: `lr: float = option(1e-3, "learning rate", low=0)`; `choices` limits a
    value to a set, `low` and `high` a number (or each number of a tuple) to a range."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "low": low, "high": high})


def describe_default(value):
    """A default as --help shows it: on/off for booleans, space-separated for tuples."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return str(value)


def add_config_flags(parser, config_cls, title):
    """Every field of a Config dataclass becomes a flag: `encoding_dim` -> `--encoding-dim`, with its help,
    its default and, for options with a fixed set of values, its choices."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {describe_default(f.default)})"
        choices = f.metadata.get("choices")
        kind = type(f.default[0]) if isinstance(f.default, tuple) else type(f.default)
        if kind in (int, float) and choices is None:
            kind = checked(kind, f.metadata.get("low"), f.metadata.get("high"))
        if isinstance(f.default, bool):
            group.add_argument(flag, dest=f.name, default=f.default, action=argparse.BooleanOptionalAction,
                               help=help_text)
        elif isinstance(f.default, tuple):
            group.add_argument(flag, dest=f.name, default=f.default, nargs="+", type=kind, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, default=f.default, type=kind, choices=choices, help=help_text)


def config_from_args(config_cls, args):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

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


def load_image_folder(root, image_size=24, channels=None, cache_dir=DEFAULT_CACHE_DIR):
    """Decode a folder once and keep it in memory (see decode_cached); classes from its sub-folders."""
    files, labels, class_names = list_image_folder(root)
    images, kept_labels = decode_cached(root, files, labels, image_size, channels, cache_dir)
    return ImageData(images, kept_labels, class_names, str(root))


def decode_cached(root, files, labels, image_size=24, channels=None, cache_dir=DEFAULT_CACHE_DIR):
    """Decode `files` under `root` with their `labels` (ints): (images (N, C, S, S) uint8, labels (N,)) of the
    readable ones; the decoded arrays are cached on disk.

    The cache key covers the file list, mtimes and sizes, the image size and channels, so a changed folder is
    decoded again and an unchanged one is never decoded twice. The cache also remembers which files were
    unreadable, so every run gives the same warning.
    """
    if channels not in (None, 1, 3):
        raise UserError(f"--channels must be 1 or 3, got {channels}")
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


def load_data(data, image_size=24, channels=None, cache_dir=DEFAULT_CACHE_DIR, labels=None, label_names=None,
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


def iterate_batches(images, labels, batch_size, generator=None, flip=False, shuffle=True, rank=0, world=1):
    """Batches (float images in [0, 1], labels) straight from in-memory tensors.

    With `flip`, each image is mirrored left-right with probability 1/2. With `world` > 1 processes, process
    `rank` takes every world-th image of the permutation (the last N mod world dropped, so all take as many
    batches); all processes draw the same permutation and flips from equally seeded generators, so their
    shares are disjoint and their generators stay equal.
    """
    n = images.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    mirror = torch.rand(n, generator=generator) < 0.5 if flip else None   # at once: as drawn batch by batch
    positions = torch.arange(rank, n - n % world, world)                  # all of 0 .. n-1 in one process
    for start in range(0, len(positions), batch_size):
        at = positions[start:start + batch_size]
        idx = order[at]
        x = to_float(images[idx])
        if flip:
            x[mirror[at]] = x[mirror[at]].flip(-1)
        yield x, labels[idx]


# ----------------------------------------------------------------------------------------------
# Image grids (torchvision's make_grid, imported where used: importing torchvision takes ~1.4 s)
# ----------------------------------------------------------------------------------------------

def make_grid(images, nrow=8, padding=2, pad_value=1.0):
    """(B, C, H, W) floats, clamped to [0, 1], to one (C', H', W') image, `nrow` images per row, white padding.

    torchvision's make_grid: grey images come back as RGB (C' = 3), and a single image without padding.
    """
    from torchvision.utils import make_grid as torchvision_make_grid
    return torchvision_make_grid(images.detach().cpu().float().clamp(0, 1), nrow, padding, pad_value=pad_value)


def grid_to_pil(grid, scale=1):
    """A (C, H, W) grid to a PIL image, quantised as torchvision's save_image does: floor(255 x + 0.5)."""
    array = grid.detach().cpu().clamp(0, 1).mul(255).add_(0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_image_grid(images, path, nrow=8, scale=4):
    """Save (B, C, H, W) floats in [0, 1] as one PNG; small images are scaled up (nearest) to be visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_to_pil(make_grid(images, nrow), scale).save(path)
    return path


def comparison_grid(rows, nrow=8):
    """Stack several equal-length batches as blocks of rows: e.g. originals above reconstructions."""
    return torch.cat([make_grid(r, nrow) for r in rows], dim=1)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def save_checkpoint(state, path):
    """Write atomically and durably: a temporary file in the same folder, flushed to the disk (fsync), then renamed
    over `path` and the rename made durable too; a crash or power cut leaves the old file or the new one, never a
    partial one. A failed write is one UserError and leaves the previous file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as err:
        raise UserError(f"could not save '{path}' ({err.strerror or err}); the previous file, if any, is intact; "
                        "free some space or pass a writable --models-dir") from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(*paths):
    """Delete what a killed save_checkpoint of these paths left behind (<name>*.tmp beside each)."""
    for path in map(Path, paths):
        for stale in path.parent.glob(glob.escape(path.name) + "*.tmp"):
            stale.unlink(missing_ok=True)


def output_dir(path, flag):
    """A folder to write into, created if needed and checked before any work, so a bad one fails in one line."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} '{path}' is a file, not a folder; pass a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"cannot write to {flag} '{path}' ({err.strerror or err}); pass a writable folder") from err
    return path


def load_checkpoint(path):
    """Load with `weights_only=True`: checkpoints hold tensors and plain Python types only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' not found; train first (python train_script.py --model ...) "
                        "or pass --checkpoint PATH")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which, not a traceback
        raise UserError(f"'{path}' is not a readable genlab checkpoint ({type(err).__name__})") from err


def config_from_dict(config_cls, values):
    """Rebuild a Config dataclass from a checkpoint, ignoring fields the class no longer has."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in values.items() if k in names})


def rng_state():
    return {"python": list(random.getstate()[1]), "torch": torch.get_rng_state()}


def set_rng_state(state):
    random.setstate((3, tuple(state["python"]), None))
    torch.set_rng_state(state["torch"])


# ----------------------------------------------------------------------------------------------
# Seeding, device, logging
# ----------------------------------------------------------------------------------------------

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for but CUDA is not available; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for but MPS is not available; use --device cpu or auto")
    return torch.device(name)


@dataclass
class Process:
    """Where this process stands in a torchrun job: rank `rank` of `world` (one process: 0 of 1)."""
    rank: int = 0
    world: int = 1

    @property
    def main(self):
        return self.rank == 0


def start_process(device_name="auto"):
    """(Process, device). Under torchrun (WORLD_SIZE > 1) join its process group: NCCL on CUDA, one GPU per process
    (LOCAL_RANK), else gloo. Without torchrun: one process, nothing to join."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return Process(), device
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Process(dist.get_rank(), dist.get_world_size()), device


def say(line):
    """Print run information to stdout once: under torchrun, from the process of rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        print(line, flush=True)


def tensorboard_writer(log_dir):
    """A TensorBoard SummaryWriter (imported here so scripts that do not log never import tensorboard)."""
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(log_dir))
