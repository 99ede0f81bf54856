"""evaluator.py and its wiring: accuracy and FD_eval ranking real below noise, the class accuracy of conditional
samples, and Best chosen by FD_eval."""
import dataclasses
import types

import pytest
import torch
import torch.nn as nn

import common
import fid
import train_script
from common import UserError
from conftest import write_image_folder


@pytest.fixture(scope="module")
def shapes_evaluator(tmp_path_factory):
    data = common.make_shapes(n=1200, image_size=12)
    net, val_accuracy = fid.train_evaluator(data, epochs=5, batch_size=32, lr=5e-3, width=8, log=lambda line: None)
    path = tmp_path_factory.mktemp("evaluator") / "Evaluator_shapes_12.pth"
    fid.save_evaluator(net, data, val_accuracy, 0, path)
    return data, path, val_accuracy


def test_evaluator_is_accurate_and_its_distance_ranks_real_below_noise(shapes_evaluator):
    data, path, val_accuracy = shapes_evaluator
    assert val_accuracy > 0.85
    extractor = fid.make_extractor("evaluator", evaluator_file=path)
    train_idx, val_idx = common.split_indices(len(data.images), 0)
    real_val = extractor(data.images[val_idx], cache=False)
    real_train = extractor(data.images[train_idx[:len(val_idx)]], cache=False)
    noise = extractor(torch.randint(0, 256, data.images[val_idx].shape, dtype=torch.uint8), cache=False)
    real_vs_real = fid.frechet_distance(*fid.statistics(real_train), *fid.statistics(real_val))
    real_vs_noise = fid.frechet_distance(*fid.statistics(noise), *fid.statistics(real_val))
    assert 0 <= real_vs_real < real_vs_noise / 10
    with pytest.raises(UserError, match="trained on 3x12x12"):
        extractor(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(UserError, match="uint8 images.*fid.quantize"):
        extractor(common.to_float(data.images[val_idx]))


def test_evaluator_needs_classes(tmp_path):
    write_image_folder(tmp_path / "flat", per_class=4, size=8, classes=("only",))
    data = common.load_data(str(tmp_path / "flat"), 8)
    with pytest.raises(UserError, match="needs at least 2 classes"):
        fid.train_evaluator(data, epochs=1)


class ConditionalFake(nn.Module):
    """A 'model' that draws real images of the asked class: the conditional sampling contract."""
    conditional = True

    def __init__(self, data):
        super().__init__()
        self.data, self.asked = data, []
        self.weight = nn.Parameter(torch.zeros(1))

    def sample(self, n, generator=None, labels=None):
        self.asked.append(labels.clone())
        picks = [torch.nonzero(self.data.labels == int(c)).flatten() for c in labels]
        idx = torch.stack([p[torch.randint(len(p), (1,), generator=generator)][0] for p in picks])
        return common.to_float(self.data.images[idx])


def test_conditional_samples_match_class_proportions_and_are_classified(shapes_evaluator):
    data, path, _ = shapes_evaluator
    _, val_idx = common.split_indices(len(data.images), 0)
    quality = fid.SampleQuality([fid.make_extractor("evaluator", evaluator_file=path)], data.images[val_idx],
                                data.labels[val_idx], seed=0)
    model = ConditionalFake(data)
    with pytest.warns(UserWarning):
        metrics = quality(model)
    asked = torch.cat(model.asked)
    assert torch.equal(torch.bincount(asked, minlength=9), torch.bincount(data.labels[val_idx], minlength=9))
    assert metrics["accuracy_eval"] > 0.85 and metrics["FD_eval"] >= 0 and "KID_eval" in metrics
    assert torch.equal(torch.bincount(fid.matched_labels(torch.tensor([0, 0, 1, 2]), 8)), torch.tensor([4, 2, 2]))


# ---------------------------------------------------------------------------------------------- Best by FD_eval

@dataclasses.dataclass
class FakeConfig:
    pass


class QualitySelected(nn.Module):
    """A GAN-like model: val_loss improves every epoch (meaningless), samples are always the same noise."""
    selects_by_sample_quality = True

    def __init__(self, config, image_shape, num_classes=1):
        super().__init__()
        self.config, self.image_shape = config, tuple(image_shape)
        self.weight = nn.Parameter(torch.ones(1))
        self.register_buffer("calls", torch.zeros(()))

    def loss(self, x, y=None, generator=None):
        self.calls += 1
        return {"loss": (self.weight - 1).pow(2).sum() + 1 / self.calls}

    def sample(self, n, generator=None):
        return torch.rand(n, *self.image_shape, generator=generator)


def test_training_selects_and_early_stops_on_fd_eval_for_quality_selected_models(tmp_path, monkeypatch, capsys):
    write_image_folder(tmp_path / "data", per_class=20, size=16, classes=("x", "y"))
    data = common.load_data(str(tmp_path / "data"), 8)
    net, acc = fid.train_evaluator(data, epochs=1, width=4, log=lambda line: None)
    fid.save_evaluator(net, data, acc, 0, tmp_path / "models" / "Evaluator_data_8.pth")
    fake = types.SimpleNamespace(__name__="fake", Config=FakeConfig, TRAIN_DEFAULTS={}, Model=QualitySelected)
    monkeypatch.setitem(train_script.MODELS, "fake", fake)
    argv = ["--model", "fake", "--data", str(tmp_path / "data"), "--image-size", "8", "--epochs", "10",
            "--patience", "2", "--fid-every", "1", "--fid-features", "evaluator", "--fid-samples", "12",
            "--models-dir", str(tmp_path / "models"), "--log-dir", str(tmp_path / "log")]
    train_script.train(argv)
    out = capsys.readouterr().out
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    # samples never change, so FD_eval never improves: early stop after 1 + 2 evaluations, val_loss notwithstanding
    assert len(epochs) == 3 and all("FD_eval" in l and "KID_eval" in l for l in epochs)
    assert epochs[0].endswith("*best*") and "early stop: no new best FD_eval" in out
    history = torch.load(tmp_path / "models" / "Last_fake.pth", weights_only=True)["history"]
    assert history[0]["FD_eval"] == history[2]["FD_eval"] and history[2]["val_loss"] < history[0]["val_loss"]
