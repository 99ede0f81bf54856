"""--config: TOML files of flags, the settings file every new run writes, and the recipes in configs/."""
import tomllib

import pytest
import torch

import common
import config_file
import contract
import registry
import train_flags
import train_script
from common import UserError
from conftest import REPO, run_script

CONFIGS = sorted((REPO / "configs").glob("*.toml"))


def settings_of(args):
    """What a run's settings file holds: every flag but those that say what to do rather than how; a default
    tuple and the list a flag gives are the same setting (common.config_from_args makes both a tuple)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()
            if k not in config_file.NOT_SETTINGS}


def test_settings_file_round_trip(tmp_path):
    argv = ["--model", "diffusion", "--channel-mults", "1", "2", "--lr", "3e-4", "--no-flip", "--seed", "7",
            "--data", 'a "quoted" folder\\with ünïcode\ttab', "--fid-features", "evaluator", "inception"]
    args = train_flags.parse_args(argv)
    path = config_file.write_settings(tmp_path / "run.toml", vars(args), ["a comment"])
    written = tomllib.loads(path.read_text(encoding="utf-8"))   # an independent TOML reader
    assert written["lr"] == 3e-4 and written["channel_mults"] == [1, 2] and written["flip"] is False
    assert written["data"] == 'a "quoted" folder\\with ünïcode\ttab'
    defaults_line = next(line for line in path.read_text(encoding="utf-8").splitlines()
                         if line.startswith("# left to their defaults: "))
    assert "channels" not in written and "channels" in defaults_line.split(": ", 1)[1].split(", ")
    again = train_flags.parse_args(["--config", str(path)])
    assert settings_of(again) == settings_of(args)


def test_a_new_run_writes_settings_that_reproduce_it_and_resume_keeps_them(tmp_path):
    models = tmp_path / "models"
    train_script.train(["--model", "MLPAE", "--image-size", "8", "--epochs", "1", "--lr", "0.004",
                        "--encoding-dim", "8", "--models-dir", str(models), "--log-dir", str(tmp_path / "log")])
    path = models / "MLPAE.toml"
    ckpt = torch.load(models / "Last_MLPAE.pth", weights_only=True)
    args = train_flags.parse_args(["--config", str(path)])
    saved = {k: v for k, v in {**ckpt["train_args"], **ckpt["config"]}.items() if k not in config_file.NOT_SETTINGS}
    assert settings_of(args) == saved   # the checkpoint's own record of the run
    marked = path.read_text() + "# this line stays\n"
    path.write_text(marked)
    train_script.train(["--config", str(path), "--resume", "--epochs", "2"])
    assert path.read_text() == marked and torch.load(models / "Last_MLPAE.pth", weights_only=True)["epoch"] == 2
    path.write_text(marked.replace("lr = 0.004", "lr = 0.1"))   # a file that disagrees with the run
    with pytest.raises(UserError, match="--lr 0.004.*from"):
        train_script.train(["--config", str(path), "--resume", "--epochs", "3"])


def test_command_line_overrides_the_file(tmp_path):
    path = tmp_path / "vae.toml"
    path.write_text('[data]\nimage-size = 16\n[training]\nepochs = 3\nlr = 0.01\n'
                    '[model]\nmodel = "VAE"\nlatent_dim = 8\n')
    args = train_flags.parse_args(["--config", str(path), "--lr", "0.5", "--latent-dim", "4"])
    plain = train_flags.parse_args(["--model", "VAE"])
    expected = {**vars(plain), "config": str(path), "image_size": 16, "epochs": 3, "lr": 0.5, "latent_dim": 4}
    assert vars(args) == expected


@pytest.mark.parametrize("text, words", [
    ('model = "VAE"\nlearning_rate = 0.1\n', ["unknown key 'learning_rate'"]),
    ('model = "VAE"\nlr = "fast"\n', ["lr:", "number"]),
    ('model = "VAE"\nepochs = 2.5\n', ["epochs:", "integer"]),
    ('model = "VAE"\nlr = -1\n', ["lr:", ">= 0"]),
    ('model = "VAE"\nflip = 1\n', ["flip:", "true or false"]),
    ('model = "diffusion"\nchannel_mults = 2\n', ["channel_mults:", "list"]),
    ('model = "VAE"\noptimizer = "rmsprop"\n', ["optimizer:", "not one of"]),
    ('model = "Transformer"\n', ["model:", "not one of"]),
    ('model = "VAE"\nlr = 0.1\n[training]\nlr = 0.2\n', ["'lr' is given twice"]),
])
def test_bad_files_are_one_line_errors_naming_the_key_and_file(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError) as error:
        train_flags.parse_args(["--config", str(path)])
    message = str(error.value)
    assert "\n" not in message and str(path) in message and all(w in message for w in words), message


def test_bad_file_exits_with_status_2_and_one_line(tmp_path):
    (tmp_path / "bad.toml").write_text('model = "VAE"\nbatch-size = "big"\n')
    result = run_script("train_script.py", "--config", "bad.toml", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        'error: bad.toml: batch_size: expected a number without quotes, got the string "big"']


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_builds_its_model(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # its data folder is not here: only the flags and the model are checked
    args = train_flags.parse_args(["--config", str(path)])
    assert tomllib.loads(path.read_text())["model"]["model"] == args.model   # the recipes name it in [model]
    module = registry.MODELS[args.model]
    shape = (args.channels or 3, args.image_size, args.image_size)
    # the recipe's condition: 3 classes, or 24 labels as multi-hot vectors or layout maps
    condition = args.condition if args.condition in ("labels", "layout") else "class"
    y = {"class": torch.tensor([0, 2]), "labels": torch.eye(24)[[0, 5]],
         "layout": torch.randint(0, 25, (2, *shape[1:]))}[condition]
    for run_args in contract.runs(module, args):   # both stages of a latent diffusion model
        model = registry.build_model(args.model, common.config_from_args(module.Config, run_args), shape,
                                     3 if condition == "class" else 24, condition)
        x = torch.rand(2, *shape)
        with torch.no_grad():
            loss = model.loss(x, y, generator=torch.Generator().manual_seed(0))["loss"]
        assert torch.isfinite(loss)
