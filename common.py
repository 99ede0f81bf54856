"""Plumbing shared by every model and script: errors and flags, image grids, checkpoints, seeding, device, logging.

Nothing here knows about a particular model. Models live in their own files; train_script.py,
visualization.py and random_generation.py find them through the one dict in registry.py. Image data: image_data.py.
"""
import argparse
import ctypes
import dataclasses
import glob
import math
import os
import random
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DEFAULT_CACHE_DIR = Path(os.environ.get("GENLAB_CACHE", Path.home() / ".cache" / "genlab"))


class UserError(Exception):
    """A problem with the user's input: scripts print it as one line and exit with status 2."""


class TrainingDiverged(Exception):
    """Training went numerically wrong (a NaN loss, a GAN whose D won): the loop exits with status 1, Best kept."""


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def glibc_mallopt():
    """glibc's mallopt(param, value), or None without glibc (not Linux, or another C library)."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def keep_freed_memory():
    """Let glibc's malloc keep what PyTorch frees on the CPU for the next allocation of the same size.

    By default glibc maps a block above its mmap threshold (at most 32 MB) fresh at each allocation and unmaps it
    at each free, and gives a free top of the heap back to the system: every step of a loop that allocates the
    same large activations again then pays the kernel to zero new pages (page faults, system CPU time). Served
    from the heap alone, never trimmed, a loop's blocks are reused as they are. A process then keeps its peak
    memory until it exits. benchmarks/README.md measures it ("Memory allocation"). A no-op without glibc."""
    mallopt = glibc_mallopt()
    if mallopt is None:
        return
    mallopt(M_MMAP_MAX, 0)                 # no block of its own mapping: all from the heap
    mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)  # never give the heap's free top back


def run_cli(main):
    """Run `main()` (after keep_freed_memory); a UserError becomes `error: ...` on stderr and exit status 2,
    Ctrl-C exit status 130."""
    keep_freed_memory()
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


def device_generator(device):
    """(get, set) of the default generator of a GPU `device`, None on the CPU: noise made on the device
    (torch.randn(..., device="cuda")) draws from this generator, not from the CPU's."""
    if device.type == "cuda":
        return (lambda: torch.cuda.get_rng_state(device)), (lambda state: torch.cuda.set_rng_state(state, device))
    if device.type == "mps":
        return torch.mps.get_rng_state, torch.mps.set_rng_state
    return None


def rng_state(device):
    """The state of every generator training draws from: Python's, torch's CPU one and `device`'s own."""
    state = {"python": list(random.getstate()[1]), "torch": torch.get_rng_state()}
    generator = device_generator(device)
    if generator:
        state[device.type] = generator[0]()
    return state


def set_rng_state(state, device):
    """Back to `state`; a device generator's state is restored on a device of that type (a checkpoint saved on
    the CPU, or before device states were saved, has none: that generator keeps its seed)."""
    random.setstate((3, tuple(state["python"]), None))
    torch.set_rng_state(state["torch"])
    generator = device_generator(device)
    if generator and device.type in state:
        generator[1](state[device.type])


@contextmanager
def rng_kept(device):
    """Run a block without moving the generators of `device`: what it draws leaves the training's own draws as
    they would be without it."""
    state = rng_state(device)
    try:
        yield
    finally:
        set_rng_state(state, device)


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
