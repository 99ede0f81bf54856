import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))


def write_image_folder(root, per_class=6, size=20, classes=("a", "b"), seed=0):
    """A small class-folder dataset of random RGB PNGs."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture
def tiny_data(tmp_path):
    """40 random 16x16 images in two class folders."""
    return write_image_folder(tmp_path / "data", per_class=20, size=16, classes=("x", "y"))


def train(tmp_path, data, *flags):
    """train_script.train on `data` at 8x8, batch 8, with models/ and log/ in tmp_path."""
    import train_script
    argv = ["--data", str(data), "--image-size", "8", "--batch-size", "8",
            "--models-dir", str(tmp_path / "models"), "--log-dir", str(tmp_path / "log"), *map(str, flags)]
    return train_script.train(argv)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Decoded-data caches go to a temporary folder, never the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("GENLAB_CACHE", str(cache))
    import common
    monkeypatch.setattr(common, "DEFAULT_CACHE_DIR", cache)
    return cache


def run_script(script, *args, cwd, timeout=300):
    """Run one of the repository's scripts as a user would, in `cwd`."""
    import subprocess
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def make_optimizers(model, lr, grad_clip=0.0, accumulation=1):
    """What train_script gives a model's train_step: one Adam per parameter group, as contract.Optimizers."""
    import torch
    import contract
    groups = model.parameter_groups()
    return contract.Optimizers({name: torch.optim.Adam(contract.trainable(m), lr=lr) for name, m in groups.items()},
                               groups, grad_clip, accumulation)


def run_main(monkeypatch, script, *argv):
    """Run a script's main() in this process as `python script.py argv` would (saves a start-up), in the current
    folder; returns the exit status (0, or what common.run_cli exits with)."""
    import common
    monkeypatch.setattr("sys.argv", [script.__name__ + ".py", *map(str, argv)])
    try:
        common.run_cli(script.main)
    except SystemExit as exit_:
        return exit_.code
    return 0


class GuidanceSpy(torch.nn.Module):
    """Stands in for the network: records each evaluation's time and batch (doubled when guided), returns zeros."""

    def __init__(self, net, calls):
        super().__init__()
        self.condition, self.num_classes, self.calls = net.condition, net.num_classes, calls
        self.device_anchor = torch.nn.Parameter(torch.zeros(()))   # samplers find the device from a parameter

    def forward(self, x, t, y=None):
        self.calls.append((round(float(t[0]), 3), len(x)))
        return torch.zeros_like(x)
