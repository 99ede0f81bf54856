"""The training loop: checkpoints, resume equivalence, early stopping, Ctrl-C, NaN, bad input."""
import random

import pytest
import torch

import common
import fid
import image_data
import registry
from common import UserError
from conftest import train


def test_checkpoint_round_trip_rebuilds_the_model_from_the_file_alone(tmp_path, tiny_data):
    model, _ = train(tmp_path, tiny_data, "--model", "VAE", "--epochs", "2", "--latent-dim", "16")
    path = tmp_path / "models" / "Last_VAE.pth"
    ckpt = torch.load(path, weights_only=True)
    for key in ("model", "config", "train_args", "image_shape", "class_names", "model_state", "optimizer_states",
                "scheduler_states", "epoch", "best_metric", "bad_validations", "rng", "history"):
        assert key in ckpt
    assert ckpt["config"] == {"latent_dim": 16, "beta": 1.0} and ckpt["image_shape"] == [3, 8, 8]
    assert ckpt["class_names"] == ["x", "y"] and ckpt["epoch"] == 2 and len(ckpt["history"]) == 2
    rebuilt, _ = registry.load_model(path, "VAE")
    model.eval(), rebuilt.eval()
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(model.reconstruct(x), rebuilt.reconstruct(x))
    with pytest.raises(UserError, match="holds a VAE model, not AE"):
        registry.load_model(path, "AE")


@pytest.mark.parametrize("name", ["VAE", "MLPAE"])
def test_resume_gives_the_same_weights_as_one_straight_run(tmp_path, tiny_data, name):
    straight, _ = train(tmp_path / "a", tiny_data, "--model", name, "--epochs", "4", "--flip", "--lr-decay", "0.5",
                        "--lr-decay-every", "1")
    train(tmp_path / "b", tiny_data, "--model", name, "--epochs", "2", "--flip", "--lr-decay", "0.5",
          "--lr-decay-every", "1")
    resumed, _ = train(tmp_path / "b", tiny_data, "--model", name, "--epochs", "4", "--resume")
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    a = torch.load(tmp_path / "a" / "models" / f"Last_{name}.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "models" / f"Last_{name}.pth", weights_only=True)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


@pytest.fixture
def tiny_evaluator(tmp_path, tiny_data):
    """An offline evaluator of tiny_data at 8x8 (one epoch, width 4), for runs that measure FD_eval."""
    data = image_data.load_data(str(tiny_data), 8)
    net, val_accuracy = fid.train_evaluator(data, epochs=1, width=4, log=lambda line: None)
    fid.save_evaluator(net, data, val_accuracy, 0, tmp_path / "ev.pth")
    return tmp_path / "ev.pth"


def test_resume_is_exact_when_sample_quality_is_measured(tmp_path, tiny_data, tiny_evaluator):
    """Building the evaluator draws random numbers (its layers' initial weights); the resumed run restores the saved
    random state after that, so it goes on drawing what the straight run drew (GAN: z and the augmentations)."""
    flags = ["--model", "GAN", "--ngf", "4", "--ndf", "4", "--fid-every", "1", "--fid-features", "evaluator",
             "--evaluator", tiny_evaluator, "--fid-samples", "8", "--swd"]
    straight, _ = train(tmp_path / "a", tiny_data, *flags, "--epochs", "3")
    train(tmp_path / "b", tiny_data, *flags, "--epochs", "1")
    resumed, _ = train(tmp_path / "b", tiny_data, "--model", "GAN", "--epochs", "3", "--resume")
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    histories = [torch.load(tmp_path / run / "models" / "Last_GAN.pth", weights_only=True)["history"]
                 for run in ("a", "b")]
    assert [h["FD_eval"] for h in histories[0]] == [h["FD_eval"] for h in histories[1]]
    assert [h["SWD"] for h in histories[0]] == [h["SWD"] for h in histories[1]]   # --swd came back from Last
    assert all(h["SWD"] > 0 for h in histories[0])


def test_measuring_sample_quality_leaves_the_training_as_it_is(tmp_path, tiny_data, tiny_evaluator):
    """Building the evaluator draws random numbers (its layers' initial weights) under common.rng_kept, so a run
    that measures FD_eval every epoch trains the same weights as one that never does."""
    flags = ["--model", "GAN", "--ngf", "4", "--ndf", "4", "--epochs", "2"]
    unmeasured, _ = train(tmp_path / "a", tiny_data, *flags, "--fid-every", "0")
    measured, _ = train(tmp_path / "b", tiny_data, *flags, "--fid-every", "1", "--fid-features", "evaluator",
                        "--evaluator", tiny_evaluator, "--fid-samples", "8", "--swd")
    for (key, a), b in zip(unmeasured.state_dict().items(), measured.state_dict().values()):
        assert torch.equal(a, b), key


def test_rng_kept_leaves_every_generator_where_it_was():
    torch.manual_seed(0), random.seed(0)
    expected = torch.rand(3), random.random()
    torch.manual_seed(0), random.seed(0)
    with common.rng_kept(torch.device("cpu")):
        torch.rand(5), random.random()
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_resume_restores_the_device_generator(tmp_path, tiny_data, monkeypatch):
    """On a GPU, noise made on the device draws from the device's own generator: checkpoints keep its state and
    --resume restores it. Played here by a stand-in generator that common.device_generator hands out for the CPU."""
    device_rng = torch.Generator().manual_seed(0)
    restored = []
    monkeypatch.setattr(common, "device_generator", lambda device: (
        device_rng.get_state, lambda state: restored.append(state) or device_rng.set_state(state)))
    train(tmp_path, tiny_data, "--model", "VAE", "--epochs", "1")
    saved = torch.load(tmp_path / "models" / "Last_VAE.pth", weights_only=True)["rng"]["cpu"]
    assert torch.equal(saved, device_rng.get_state())
    torch.rand(4, generator=device_rng)   # the generator moves on between the two commands
    train(tmp_path, tiny_data, "--model", "VAE", "--epochs", "2", "--resume")
    assert torch.equal(restored[0], saved)


def test_train_seed_changes_the_training_and_not_the_split(tmp_path, tiny_data, monkeypatch):
    split_seeds, split = [], image_data.split_indices
    monkeypatch.setattr(image_data, "split_indices", lambda n, seed=0: split_seeds.append(seed) or split(n, seed))
    runs = [train(tmp_path / name, tiny_data, "--model", "VAE", "--epochs", "1", *flags)[0].state_dict()
            for name, flags in [("a", ()), ("b", ("--train-seed", "0")), ("c", ("--train-seed", "1"))]]
    assert split_seeds == [0, 0, 0]   # every run splits by --seed
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])       # --train-seed 0 is --seed 0's training
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])   # another one trains otherwise


def test_resume_refuses_a_changed_setting(tmp_path, tiny_data):
    train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "1")
    with pytest.raises(UserError, match="--image-size"):
        train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "2", "--resume", "--image-size", "12")
    with pytest.raises(UserError, match="--resume needs .*Last_AE.pth', which does not exist; drop --resume"):
        train(tmp_path, tiny_data, "--model", "AE", "--epochs", "2", "--resume")


def test_early_stopping_counts_validations_without_improvement(tmp_path, tiny_data, capsys):
    train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "10", "--lr", "0", "--patience", "2")
    out = capsys.readouterr().out
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 3 and "*best*" in epochs[0] and "early stop" in out


def test_stdout_has_one_parsable_line_per_epoch(tmp_path, tiny_data, capsys):
    train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "3", "--val-every", "2")
    lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
    assert len(lines) == 3
    for n, line in enumerate(lines, 1):
        tokens = line.split()
        assert tokens[:2] == ["epoch", str(n)] and tokens[2] == "train_loss" and float(tokens[3]) > 0
        assert ("val_loss" in tokens) == (n in (2, 3))  # every 2nd epoch and the last
        assert "lr" in tokens and tokens[-1].endswith("s") or tokens[-1] == "*best*"


def test_nan_loss_stops_with_an_error_and_keeps_best(tmp_path, tiny_data, monkeypatch, capsys):
    train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "1")
    best, last = tmp_path / "models" / "Best_MLPAE.pth", tmp_path / "models" / "Last_MLPAE.pth"
    saved = best.read_bytes(), last.read_bytes()
    import mlp_ae
    monkeypatch.setattr(mlp_ae.Autoencoder, "loss", lambda self, x, y=None, generator=None:
                        {"loss": (self(x) * float("nan")).mean()})
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "3", "--resume")
    assert exit_info.value.code == 1
    assert "training loss became nan" in capsys.readouterr().err
    assert (best.read_bytes(), last.read_bytes()) == saved


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable genlab checkpoint"):
        registry.load_model(tmp_path / "bad.pth")
