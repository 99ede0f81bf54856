"""Nothing a user has is lost, and bad input gets one clear line: existing runs, Ctrl-C, changed data, numeric
flags, output folders, durable checkpoints, and the wording of the errors."""
import errno
import os

import pytest
import torch

import common
import contract
import registry
import train_flags
import train_script
from common import UserError
from conftest import run_script, train, write_image_folder


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_new_run_never_replaces_an_existing_one(tmp_path, tiny_data, capsys):
    train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "2")
    saved = files(tmp_path / "models")
    best = torch.load(tmp_path / "models" / "Last_MLPAE.pth", weights_only=True)["best_metric"]
    with pytest.raises(UserError) as err:
        train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "1")
    message = str(err.value)
    assert "run 'MLPAE' already exists" in message and f"epoch 2, best {best:.6g}" in message
    for way in ("--resume", "--run-name NEW", "--overwrite"):
        assert way in message
    assert files(tmp_path / "models") == saved                              # nothing touched
    train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "1", "--run-name", "second")   # both kept
    assert {"Best_MLPAE.pth", "Best_second.pth"} <= set(files(tmp_path / "models"))
    train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "1", "--overwrite")        # replaced on purpose
    assert torch.load(tmp_path / "models" / "Last_MLPAE.pth", weights_only=True)["epoch"] == 1
    assert "--overwrite: removed" in capsys.readouterr().out
    with pytest.raises(UserError, match="pass one of them"):
        train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "3", "--resume", "--overwrite")


def test_ctrl_c_keeps_the_last_finished_epoch_so_resume_is_exact(tmp_path, tiny_data, monkeypatch, capsys):
    flags = ["--model", "MLPAE", "--flip", "--lr-decay", "0.5", "--lr-decay-every", "1"]
    straight, _ = train(tmp_path / "a", tiny_data, *flags, "--epochs", "4")
    calls = {"n": 0}
    real_step = contract.GenerativeModel.train_step

    def interrupted_step(self, *args):
        calls["n"] += 1
        if calls["n"] == 11:   # in the 3rd epoch (4 batches an epoch), after two of its steps
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(contract.GenerativeModel, "train_step", interrupted_step)
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path / "b", tiny_data, *flags, "--epochs", "4")
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted in epoch 3" in err and "holds the end of epoch 2" in err
    assert torch.load(tmp_path / "b" / "models" / "Last_MLPAE.pth", weights_only=True)["epoch"] == 2
    monkeypatch.setattr(contract.GenerativeModel, "train_step", real_step)
    resumed, _ = train(tmp_path / "b", tiny_data, "--model", "MLPAE", "--epochs", "4", "--resume")
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


def test_resume_keeps_the_runs_epochs_and_patience_unless_given_again(tmp_path, tiny_data):
    last = tmp_path / "models" / "Last_MLPAE.pth"
    train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "2", "--patience", "9")
    train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "3", "--resume")   # --patience 9, not the default
    saved = torch.load(last, weights_only=False)
    assert (saved["epoch"], saved["train_args"]["epochs"], saved["train_args"]["patience"]) == (3, 3, 9)
    train(tmp_path, tiny_data, "--model", "MLPAE", "--resume")   # --epochs 3 again: nothing left to train
    saved = torch.load(last, weights_only=False)
    assert (saved["epoch"], saved["train_args"]["epochs"], saved["train_args"]["patience"]) == (3, 3, 9)


def test_ctrl_c_during_start_up_is_one_line_and_status_130(monkeypatch, capsys):
    def start_up():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        common.run_cli(start_up)
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("change", ["more images", "another class"])
def test_resume_refuses_changed_data(tmp_path, tiny_data, change):
    train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "1")
    extra = write_image_folder(tmp_path / "extra", per_class=2, size=16, classes=("x", "z"), seed=5)
    target = tiny_data / ("x" if change == "more images" else "z")
    target.mkdir(exist_ok=True)
    for i, source in enumerate(sorted((extra / ("x" if change == "more images" else "z")).iterdir())):
        os.replace(source, target / f"new_{i}.png")
    with pytest.raises(UserError, match="changed since .*Last_MLPAE.pth' was saved"):
        train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "2", "--resume")


@pytest.mark.parametrize("flag, value", [
    ("--epochs", "0"), ("--epochs", "-1"), ("--batch-size", "0"), ("--lr", "nan"), ("--lr", "-1"), ("--seed", "-1"),
    ("--image-size", "0"), ("--val-every", "0"), ("--lr-decay-every", "0"), ("--patience", "0"),
    ("--grad-accum", "0"), ("--adam-beta1", "1"), ("--epochs", "two"), ("--encoding-dim", "0"),
])
def test_numeric_flags_are_checked_when_parsed(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_flags.parse_args(["--model", "MLPAE", flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"error: argument {flag}:") and value in err[0]


def test_model_flags_with_a_fixed_set_of_values_are_choices(capsys):
    for model, flag, value in [("diffusion", "--schedule", "cosin"), ("LDM", "--stage", "al"),
                               ("GAN", "--loss", "wasserstein"), ("LDM", "--ae-loss", "l2"),
                               ("LDM", "--ae-downsample", "3"), ("diffusion", "--label-dropout", "2")]:
        with pytest.raises(SystemExit):
            train_flags.parse_args(["--model", model, flag, value])
        assert f"error: argument {flag}:" in capsys.readouterr().err


@pytest.mark.parametrize("n", ["0", "-5"])
def test_visualization_refuses_a_bad_count(tmp_path, n):
    result = run_script("visualization.py", "--model", "AE", "--n", n, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: argument --n:")
    assert not (tmp_path / "vis").exists()


def test_output_folders_are_checked_before_training(tmp_path, tiny_data, monkeypatch):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(UserError, match="--models-dir .* is a file, not a folder"):
        train_script.train(["--model", "MLPAE", "--data", str(tiny_data), "--models-dir", str(tmp_path / "a_file")])
    with pytest.raises(UserError, match="cannot write to --models-dir"):
        train_script.train(["--model", "MLPAE", "--data", str(tiny_data), "--models-dir",
                            str(tmp_path / "a_file" / "models")])
    with pytest.raises(UserError, match="--log-dir"):
        train(tmp_path, tiny_data, "--model", "MLPAE", "--log-dir", str(tmp_path / "a_file"))
    assert not (tmp_path / "models" / "Last_MLPAE.pth").exists()


def test_a_failed_save_is_one_line_and_keeps_the_previous_file(tmp_path, tiny_data, monkeypatch):
    train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "1")
    saved = files(tmp_path / "models")
    real_save = torch.save

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="could not save .*No space left on device.*previous file, if any, is intact"):
        train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "2", "--resume")
    monkeypatch.setattr(torch, "save", real_save)
    assert files(tmp_path / "models") == saved                              # no partial file, no stray .tmp


def test_saves_are_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    common.save_checkpoint({"a": torch.ones(2)}, tmp_path / "ckpt.pth")
    assert events == ["fsync", "replace", "fsync"]                         # the file, the rename, the folder
    assert torch.equal(torch.load(tmp_path / "ckpt.pth", weights_only=True)["a"], torch.ones(2))


def test_stale_temporaries_of_a_killed_save_are_removed_by_the_next_run(tmp_path, tiny_data):
    models = tmp_path / "models"
    models.mkdir()
    stale = [models / "Best_MLPAE.pthab12cd.tmp", models / "Last_MLPAE.pth9x8y7z.tmp"]
    other = models / "Last_VAE.pthkeep.tmp"   # another run's save may be in flight: not ours to delete
    for path in stale + [other]:
        path.write_bytes(b"partial")
    train(tmp_path, tiny_data, "--model", "MLPAE", "--epochs", "1")
    assert not any(p.exists() for p in stale) and other.exists()


def test_incomplete_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"model": "VAE", "config": {}}, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="incomplete genlab checkpoint .*no train_args, image_shape"):
        registry.load_model(tmp_path / "partial.pth")


def test_sampling_flags_that_do_not_apply_are_errors(tmp_path):
    result = run_script("train_script.py", "--model", "VAE", "--image-size", "8", "--epochs", "1",
                        "--batch-size", "256", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for flags, words in [(["--guidance", "3"], "--guidance does not apply to the VAE model"),
                         (["--class-label", "0"], "--class-label needs a model conditioned on classes"),
                         (["--steps", "5"], "--steps does not apply to the VAE model"),
                         (["--out", "vis/x.txt"], "no picture extension")]:
        result = run_script("random_generation.py", "--model", "VAE", *flags, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert words in result.stderr.strip().splitlines()[-1]
