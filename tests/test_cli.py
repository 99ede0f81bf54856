"""Every script end to end as a user runs it, on the bundled shapes data, and its errors on bad input."""
import pytest
import torch
from PIL import Image

from conftest import run_script, write_image_folder

TINY = ["--image-size", "12", "--epochs", "2", "--batch-size", "64"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder where each autoencoder was trained for two tiny epochs on the built-in shapes."""
    root = tmp_path_factory.mktemp("cli")
    for name in ("MLPAE", "AE", "VAE"):
        result = run_script("train_script.py", "--model", name, *TINY, cwd=root)
        assert result.returncode == 0, result.stderr
        epoch_lines = [l for l in result.stdout.splitlines() if l.startswith("epoch ")]
        assert len(epoch_lines) == 2 and all("train_loss" in l and "val_loss" in l for l in epoch_lines)
        assert "Traceback" not in result.stderr
    return root


@pytest.mark.parametrize("name", ["MLPAE", "AE", "VAE"])
def test_train_writes_checkpoints_and_tensorboard(workdir, name):
    assert (workdir / "models" / f"Best_{name}.pth").is_file() and (workdir / "models" / f"Last_{name}.pth").is_file()
    assert any((workdir / "log" / name).glob("events.out.tfevents.*"))


@pytest.mark.parametrize("name", ["MLPAE", "AE", "VAE"])
def test_visualization_and_random_generation(workdir, name):
    result = run_script("visualization.py", "--model", name, "--n", "8", cwd=workdir)
    assert result.returncode == 0, result.stderr
    for picture in (f"train_{name}.png", f"valid_{name}.png", f"loss_{name}.png"):
        assert (workdir / "vis" / picture).is_file()
    # 8 originals above 8 reconstructions, 12x12 each with 2-pixel padding, scaled 4x
    assert Image.open(workdir / "vis" / f"train_{name}.png").size == (4 * (8 * 14 + 2), 4 * 2 * (14 + 2))
    result = run_script("random_generation.py", "--model", name, "--n", "16", "--seed", "1", cwd=workdir)
    assert result.returncode == 0, result.stderr
    first = (workdir / "vis" / f"random_images_{name}.png").read_bytes()
    run_script("random_generation.py", "--model", name, "--n", "16", "--seed", "1", cwd=workdir)
    assert (workdir / "vis" / f"random_images_{name}.png").read_bytes() == first  # same seed, same picture


def assert_clear_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in last, last


def test_bad_input_gives_one_line_errors_and_keeps_saved_files(workdir, tmp_path):
    best = workdir / "models" / "Best_VAE.pth"
    saved = best.read_bytes()
    new_run = ["--run-name", "another"]
    assert_clear_error(run_script("train_script.py", "--model", "VAE", *new_run, "--data", tmp_path / "missing",
                                  cwd=workdir), "does not exist", "--data")
    (tmp_path / "empty").mkdir()
    assert_clear_error(run_script("train_script.py", "--model", "VAE", *new_run, "--data", tmp_path / "empty",
                                  cwd=workdir), "no images")
    assert_clear_error(run_script("train_script.py", "--model", "Transformer", cwd=workdir), "invalid choice")
    assert_clear_error(run_script("visualization.py", "--model", "AE", "--checkpoint", best, cwd=workdir),
                       "holds a VAE model, not AE")
    assert_clear_error(run_script("random_generation.py", "--model", "VAE", "--checkpoint", tmp_path / "none.pth",
                                  cwd=workdir), "not found")
    assert_clear_error(run_script("train_script.py", "--model", "VAE", *TINY[:2], "--resume", "--image-size", "16",
                                  cwd=workdir), "--image-size")
    assert_clear_error(run_script("train_script.py", "--model", "AE", *new_run, "--image-size", "10", cwd=workdir),
                       "divisible by 4")
    assert best.read_bytes() == saved


def test_own_folder_with_classes_and_grayscale(tmp_path):
    write_image_folder(tmp_path / "imgs", per_class=10, size=16)
    result = run_script("train_script.py", "--model", "AE", "--data", tmp_path / "imgs", "--image-size", "8",
                        "--epochs", "1", "--channels", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / "models" / "Best_AE.pth", weights_only=True)
    assert ckpt["image_shape"] == [1, 8, 8] and ckpt["class_names"] == ["a", "b"]
