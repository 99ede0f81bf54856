"""Every script end to end as a user runs it, on the bundled shapes data, and its errors on bad input."""
import pytest
import torch
from PIL import Image

import random_generation
import visualization
from conftest import run_main, run_script, write_image_folder
from registry import MODELS, load_model

TINY = ["--image-size", "12", "--epochs", "2", "--batch-size", "64"]
# Small networks, so that every model trains in seconds; everything else is the model's default.
SMALL = {"MLPAE": [], "AE": [], "VAE": [], "GAN": ["--ngf", "8", "--ndf", "8"],
         "diffusion": ["--width", "8", "--channel-mults", "1", "2", "--attention-levels", "1", "--timesteps", "50"],
         "flow": ["--width", "8", "--channel-mults", "1", "2", "--attention-levels", "1"],
         "LDM": ["--width", "8", "--channel-mults", "1", "2", "--attention-levels", "1", "--timesteps", "50",
                 "--ae-width", "8", "--ae-epochs", "1"]}


def test_every_registered_model_has_its_tiny_flags():
    assert set(SMALL) == set(MODELS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder, empty at first, where each autoencoder was trained for two tiny epochs on the built-in shapes."""
    root = tmp_path_factory.mktemp("cli")
    for name in ("MLPAE", "AE", "VAE"):
        result = run_script("train_script.py", "--model", name, *TINY, cwd=root)
        assert result.returncode == 0, result.stderr
    return root


@pytest.mark.parametrize("name", ["GAN", "diffusion", "flow", "LDM"])
def test_generative_models_train_show_and_sample_from_an_empty_folder(tmp_path, name):
    result = run_script("train_script.py", "--model", name, *TINY, *SMALL[name], cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert (tmp_path / "models" / f"Best_{name}.pth").is_file() and any((tmp_path / "log" / name).iterdir())
    result = run_script("visualization.py", "--model", name, "--n", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    model, _ = load_model(tmp_path / "models" / f"Best_{name}.pth")
    expected = ["loss"] + ["train", "valid"] * model.reconstructs + ["denoising"] * model.denoises
    assert sorted(p.stem for p in (tmp_path / "vis").iterdir()) == sorted(f"{e}_{name}" for e in expected)
    result = run_script("random_generation.py", "--model", name, "--n", "4", cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "vis" / f"random_images_{name}.png").is_file(), result.stderr


@pytest.mark.parametrize("name", ["MLPAE", "AE", "VAE"])
def test_train_writes_checkpoints_and_tensorboard(workdir, name):
    assert (workdir / "models" / f"Best_{name}.pth").is_file() and (workdir / "models" / f"Last_{name}.pth").is_file()
    assert any((workdir / "log" / name).glob("events.out.tfevents.*"))


@pytest.mark.parametrize("name", ["MLPAE", "AE", "VAE"])
def test_visualization_and_random_generation(workdir, name, monkeypatch):
    monkeypatch.chdir(workdir)   # in-process: the same code as a user's run, without two more start-ups
    assert run_main(monkeypatch, visualization, "--model", name, "--n", "8") == 0
    for picture in (f"train_{name}.png", f"valid_{name}.png", f"loss_{name}.png"):
        assert (workdir / "vis" / picture).is_file()
    # 8 originals above 8 reconstructions, 12x12 each with 2-pixel padding, scaled 4x
    assert Image.open(workdir / "vis" / f"train_{name}.png").size == (4 * (8 * 14 + 2), 4 * 2 * (14 + 2))
    assert run_main(monkeypatch, random_generation, "--model", name, "--n", "16", "--seed", "1") == 0
    first = (workdir / "vis" / f"random_images_{name}.png").read_bytes()
    run_main(monkeypatch, random_generation, "--model", name, "--n", "16", "--seed", "1")
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


def test_improved_ddpm_and_its_samplers_from_the_command_line(tmp_path, monkeypatch):
    flags = [*TINY, *SMALL["diffusion"], "--learn-sigma", "--timestep-sampler", "loss-aware"]
    result = run_script("train_script.py", "--model", "diffusion", *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    epoch = [line for line in result.stdout.splitlines() if line.startswith("epoch 2 ")][0].split()
    assert float(epoch[epoch.index("val_bpd") + 1]) > 0 and "train_vb" in epoch
    monkeypatch.chdir(tmp_path)
    for sampler, steps in (("ddpm", "10"), ("dpmpp", "5"), ("ddim", "5")):
        assert run_main(monkeypatch, random_generation, "--model", "diffusion", "--sampler", sampler, "--steps", steps,
                        "--n", "4", "--out", f"vis/{sampler}.png") == 0
        assert (tmp_path / "vis" / f"{sampler}.png").is_file()
