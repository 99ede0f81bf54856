"""evaluator.py and its wiring: accuracy and FD_eval ranking real below noise, the class accuracy of conditional
samples, an evaluator at chance warned about when trained, refused for choosing Best and warned about when
reported, the evaluator trained on first need by the exact command it prints, and Best chosen by FD_eval."""
import argparse
import dataclasses
import shlex
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import evaluator
import fid
import image_data
import registry
import train_script
from common import UserError
from conftest import write_image_folder
from contract import GenerativeModel


def write_separable_folder(root, per_class=15, size=16, seed=0):
    """Two classes an evaluator learns at once: dark noise and light noise."""
    rng = np.random.default_rng(seed)
    for name, low in (("dark", 0), ("light", 156)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(low, low + 100, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def write_identical_classes(root, classes=("a", "b", "c"), per_class=18, size=8):
    """Three classes of the same flat grey image: nothing to learn, so any evaluator predicts one class.
    With 18 per class no class holds more than 4 of the 11 validation images (seed 0): accuracy <= 0.364."""
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (128, 128, 128)).save(root / name / f"{i:03d}.png")
    return root


def metric_args(**overrides):
    return argparse.Namespace(**{"fid_features": ["evaluator"], "inception_weights": None, "evaluator": None,
                                 **overrides})


@pytest.fixture(scope="module")
def shapes_evaluator(tmp_path_factory):
    data = image_data.make_shapes(n=1200, image_size=12)
    net, val_accuracy = fid.train_evaluator(data, epochs=5, batch_size=32, lr=5e-3, width=8, log=lambda line: None)
    path = tmp_path_factory.mktemp("evaluator") / "Evaluator_shapes_12.pth"
    fid.save_evaluator(net, data, val_accuracy, 0, path, epochs=5)
    return data, path, val_accuracy


def test_evaluator_is_accurate_and_its_distance_ranks_real_below_noise(shapes_evaluator):
    data, path, val_accuracy = shapes_evaluator
    assert val_accuracy > 0.85
    extractor = fid.make_extractor("evaluator", evaluator_file=path, for_selection=True)
    train_idx, val_idx = image_data.split_indices(len(data.images), 0)
    real_val = extractor(data.images[val_idx], cache=False)
    real_train = extractor(data.images[train_idx[:len(val_idx)]], cache=False)
    noise = extractor(torch.randint(0, 256, data.images[val_idx].shape, dtype=torch.uint8), cache=False)
    real_vs_real = fid.frechet_distance(*fid.statistics(real_train), *fid.statistics(real_val))
    real_vs_noise = fid.frechet_distance(*fid.statistics(noise), *fid.statistics(real_val))
    assert 0 <= real_vs_real < real_vs_noise / 10
    with pytest.raises(UserError, match="trained on 3x12x12"):
        extractor(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(UserError, match="uint8 images.*fid.quantize"):
        extractor(image_data.to_float(data.images[val_idx]))


def test_evaluator_needs_classes(tmp_path):
    write_image_folder(tmp_path / "flat", per_class=4, size=8, classes=("only",))
    data = image_data.load_data(str(tmp_path / "flat"), 8)
    with pytest.raises(UserError, match="needs at least 2 classes"):
        fid.train_evaluator(data, epochs=1)


class ConditionalFake(nn.Module):
    """A 'model' that draws real images of the asked class: the conditional sampling contract."""
    condition, conditional = "class", True

    def __init__(self, data):
        super().__init__()
        self.data, self.asked = data, []
        self.weight = nn.Parameter(torch.zeros(1))

    def sample(self, n, generator=None, labels=None):
        self.asked.append(labels.clone())
        picks = [torch.nonzero(self.data.labels == int(c)).flatten() for c in labels]
        idx = torch.stack([p[torch.randint(len(p), (1,), generator=generator)][0] for p in picks])
        return image_data.to_float(self.data.images[idx])


def test_conditional_samples_match_class_proportions_and_are_classified(shapes_evaluator):
    data, path, _ = shapes_evaluator
    _, val_idx = image_data.split_indices(len(data.images), 0)
    quality = fid.SampleQuality([fid.make_extractor("evaluator", evaluator_file=path)], data.images[val_idx],
                                data.labels[val_idx], seed=0)
    model = ConditionalFake(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # 600 samples, more than the evaluator's 128 dimensions: no small-N warning
        metrics = quality(model)
    asked = torch.cat(model.asked)
    assert torch.equal(torch.bincount(asked, minlength=9), torch.bincount(data.labels[val_idx], minlength=9))
    assert metrics["accuracy_eval"] > 0.85 and metrics["FD_eval"] >= 0 and "KID_eval" in metrics
    assert torch.equal(torch.bincount(fid.matched_labels(torch.tensor([0, 0, 1, 2]), 8)), torch.tensor([4, 2, 2]))


# ---------------------------------------------------------------------------------------------- at chance

@pytest.fixture
def evaluator_at_chance(tmp_path, capsys):
    """`fid.py train-evaluator` on three classes of one image: (checkpoint path, what it printed)."""
    write_identical_classes(tmp_path / "same")
    path = tmp_path / "Evaluator_same_8.pth"
    fid.main(["train-evaluator", "--data", str(tmp_path / "same"), "--image-size", "8", "--epochs", "2",
              "--width", "4", "--out", str(path)])
    return path, capsys.readouterr()


def test_train_evaluator_warns_at_chance_and_the_checkpoint_records_it(evaluator_at_chance):
    path, printed = evaluator_at_chance
    ckpt = torch.load(path, weights_only=True)
    # independent: the val split's labels, and the one class a network that cannot tell images apart predicts
    _, val_idx = image_data.split_indices(54, 0)
    val_labels = torch.arange(3).repeat_interleave(18)[val_idx]
    net = evaluator.Evaluator((3, 8, 8), 3, 4)
    net.load_state_dict(ckpt["state"])
    predicted = int(net.eval()(torch.full((1, 3, 8, 8), 128 / 255)).argmax())
    assert ckpt["val_accuracy"] == pytest.approx(float((val_labels == predicted).float().mean()))
    assert ckpt["val_accuracy"] <= 1 / 3 + evaluator.CHANCE_MARGIN
    assert ckpt["near_chance"] is True and ckpt["chance"] == pytest.approx(1 / 3) and ckpt["epochs"] == 2
    warning = [line for line in printed.err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and f"{ckpt['val_accuracy']:.3f} on 3 classes" in warning[0]
    assert "chance 0.333 + 0.05" in warning[0] and "--epochs 4" in warning[0]
    assert "validation accuracy" in printed.out


def test_an_evaluator_at_chance_is_refused_for_choosing_best_and_only_warned_about_for_reporting(
        evaluator_at_chance, tmp_path, monkeypatch, capsys):
    path, _ = evaluator_at_chance
    with pytest.raises(UserError) as err:
        fid.load_evaluator(path, for_selection=True)
    assert "refusing to choose Best by FD_eval" in str(err.value) and "\n" not in str(err.value)
    assert f"python fid.py train-evaluator --data {tmp_path / 'same'} --image-size 8" in str(err.value)
    with pytest.raises(UserError, match="refusing"):
        fid.extractors_from_args(metric_args(evaluator=str(path)), "same", 8, for_selection=True)
    assert capsys.readouterr().err == ""
    [extractor] = fid.extractors_from_args(metric_args(evaluator=str(path)), "same", 8)   # reporting: a warning
    assert extractor.kind == "evaluator" and capsys.readouterr().err.startswith("warning: the evaluator")
    # only the first metric chooses Best: an evaluator reported after FID is warned about, not refused
    (tmp_path / "weights.pth").write_bytes(b"stub")
    monkeypatch.setattr(fid, "load_inception", lambda path, device: nn.Identity())   # no Inception needed here
    args = metric_args(fid_features=["inception", "evaluator"], evaluator=str(path),
                       inception_weights=str(tmp_path / "weights.pth"))
    extractors = fid.extractors_from_args(args, "same", 8, for_selection=True)
    assert [e.kind for e in extractors] == ["inception", "evaluator"]
    assert capsys.readouterr().err.startswith("warning: the evaluator")


# ---------------------------------------------------------------------------------------------- first need

def test_a_missing_evaluator_is_trained_on_first_need_by_the_command_it_prints_then_reused(tmp_path, monkeypatch,
                                                                                           capsys):
    data_dir = write_separable_folder(tmp_path / "data")
    dataset = image_data.load_data(str(data_dir), 8)
    models = tmp_path / "models"
    [extractor] = fid.extractors_from_args(metric_args(), str(data_dir), 8, "cpu", str(models), dataset=dataset,
                                           for_selection=True)
    path = models / "Evaluator_data_8.pth"
    out = capsys.readouterr().out.splitlines()
    command = f"python fid.py train-evaluator --data {data_dir} --image-size 8 --channels 3 --out {path}"
    assert out == [f"# no evaluator at {path}: training one ({command})"]
    assert path.is_file() and extractor.image_shape == (3, 8, 8)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["val_accuracy"] == 1.0 and ckpt["epochs"] == evaluator.Training().epochs

    # the printed command makes the same evaluator
    again = tmp_path / "again.pth"
    fid.main(shlex.split(command)[2:-2] + ["--out", str(again)])
    state = torch.load(again, weights_only=True)["state"]
    assert all(torch.equal(state[k], ckpt["state"][k]) for k in ckpt["state"])

    # the next run reuses it, and without the loaded data it loads the data itself
    capsys.readouterr()
    monkeypatch.setattr(evaluator, "train_evaluator", lambda *args, **kwargs: pytest.fail("trained again"))
    fid.extractors_from_args(metric_args(), str(data_dir), 8, "cpu", str(models))
    assert "no evaluator" not in capsys.readouterr().out
    monkeypatch.undo()
    path.unlink()
    fid.extractors_from_args(metric_args(fid_features=["auto"]), str(data_dir), 8, "cpu", str(models))
    assert path.is_file()


def test_first_need_keeps_the_clear_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))   # no Inception weights: auto is evaluator
    write_image_folder(tmp_path / "flat", per_class=4, size=8, classes=("only",))
    with pytest.raises(UserError, match="needs at least 2 classes.*or put pytorch-fid's weights at"):
        fid.extractors_from_args(metric_args(fid_features=["auto"]), str(tmp_path / "flat"), 8, "cpu",
                                 str(tmp_path / "models"))
    with pytest.raises(UserError, match="--evaluator 'typo.pth' does not exist"):
        fid.extractors_from_args(metric_args(evaluator="typo.pth"), str(tmp_path / "flat"), 8)
    assert capsys.readouterr().out == "" and not (tmp_path / "models").exists()


# ---------------------------------------------------------------------------------------------- Best by FD_eval

@dataclasses.dataclass
class FakeConfig:
    pass


class QualitySelected(GenerativeModel):
    """A GAN-like model: val_loss improves every epoch (meaningless), samples are always the same noise."""
    selects_by_sample_quality = True

    def __init__(self, config, image_shape, num_classes=1, condition="class"):
        super().__init__(config, image_shape)
        self.weight = nn.Parameter(torch.ones(1))
        self.register_buffer("calls", torch.zeros(()))

    def loss(self, x, y=None, generator=None):
        self.calls += 1
        return {"loss": (self.weight - 1).pow(2).sum() + 1 / self.calls}

    def sample(self, n, generator=None):
        return torch.rand(n, *self.image_shape, generator=generator)


def test_training_selects_and_early_stops_on_fd_eval_for_quality_selected_models(tmp_path, monkeypatch, capsys):
    write_separable_folder(tmp_path / "data", per_class=20)
    fake = types.SimpleNamespace(__name__="fake", Config=FakeConfig, TRAIN_DEFAULTS={}, Model=QualitySelected)
    monkeypatch.setitem(registry.MODELS, "fake", fake)
    argv = ["--model", "fake", "--data", str(tmp_path / "data"), "--image-size", "8", "--epochs", "10",
            "--patience", "2", "--fid-every", "1", "--fid-features", "evaluator", "--fid-samples", "12",
            "--models-dir", str(tmp_path / "models"), "--log-dir", str(tmp_path / "log")]
    train_script.train(argv)   # the evaluator is trained on first need
    out = capsys.readouterr().out
    first_need = f"# no evaluator at {tmp_path / 'models' / 'Evaluator_data_8.pth'}: training one"
    assert sum(line.startswith(first_need) for line in out.splitlines()) == 1
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    # samples never change, so FD_eval never improves: early stop after 1 + 2 evaluations, val_loss notwithstanding
    assert len(epochs) == 3 and all("FD_eval" in l and "KID_eval" in l for l in epochs)
    assert epochs[0].endswith("*best*") and "early stop: no new best FD_eval" in out
    history = torch.load(tmp_path / "models" / "Last_fake.pth", weights_only=True)["history"]
    assert history[0]["FD_eval"] == history[2]["FD_eval"] and history[2]["val_loss"] < history[0]["val_loss"]
