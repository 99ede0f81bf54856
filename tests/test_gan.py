"""GAN (gan.py): shapes and ranges, one D and one G step, the losses' closed forms, EMA, conditioning,
divergence, and the CLI end to end on the bundled shapes data."""
import argparse

import pytest
import torch
import torch.nn.functional as F

import common
import contract
import fid
import gan
import train_script
from common import TrainingDiverged, UserError
from conftest import run_script

TINY = dict(latent_dim=8, ngf=4, ndf=4)


def build(image_shape=(3, 24, 24), num_classes=1, **config):
    torch.manual_seed(0)
    return gan.Model(gan.Config(**{**TINY, **config}), image_shape, num_classes)


def optimizers(model, lr=2e-4, betas=(0.5, 0.999)):
    args = argparse.Namespace(optimizer="adam", lr=lr, adam_beta1=betas[0], adam_beta2=betas[1], weight_decay=0.0)
    groups = model.parameter_groups()
    return contract.Optimizers({name: train_script.make_optimizer(m, args) for name, m in groups.items()}, groups)


@pytest.mark.parametrize("size, plan", [(24, (3, 3)), (28, (7, 2)), (32, (4, 3)), (64, (4, 4))])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("spectral_norm", [False, True])
def test_shapes_and_ranges_for_every_supported_size(size, plan, channels, spectral_norm):
    assert gan.size_plan(size) == plan
    model = build((channels, size, size), 3, conditional=True, spectral_norm=spectral_norm)
    images = model.eval().sample(5, torch.Generator().manual_seed(0))
    assert images.shape == (5, channels, size, size) and 0 <= images.min() and images.max() <= 1
    model.train()
    terms = model.loss(torch.rand(5, channels, size, size), torch.tensor([0, 1, 2, 0, 1]))
    assert model.discriminator(images * 2 - 1, torch.zeros(5, dtype=torch.long)).shape == (5,)
    assert set(terms) == {"loss", "loss_D", "loss_G", "D_x", "D_G_z"} and 0 < terms["D_x"] < 1


def test_unsupported_sizes_and_settings_are_one_line_errors():
    for size in (25, 36, 4):
        with pytest.raises(UserError, match="--image-size"):
            build((3, size, size))
    with pytest.raises(UserError, match="hinge"):
        build(loss="wasserstein")


def test_losses_match_their_closed_forms():
    real, fake = torch.randn(50), torch.randn(50)
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    # non-saturating (Goodfellow et al.): L_D = -E log D(x) - E log(1 - D(G(z))), L_G = -E log D(G(z))
    assert torch.allclose(gan.discriminator_loss(real, fake, "nonsaturating"),
                          -(d_real.log().mean() + (1 - d_fake).log().mean()), atol=1e-6)
    assert torch.allclose(gan.generator_loss(fake, "nonsaturating"), -d_fake.log().mean(), atol=1e-6)
    assert torch.allclose(gan.discriminator_loss(real, fake, "nonsaturating"),
                          F.binary_cross_entropy_with_logits(real, torch.ones(50))
                          + F.binary_cross_entropy_with_logits(fake, torch.zeros(50)))
    # hinge: L_D = E max(0, 1 - D(x)) + E max(0, 1 + D(G(z))), L_G = -E D(G(z))
    expected = sum(max(0.0, 1 - r) for r in real.tolist()) / 50 + sum(max(0.0, 1 + f) for f in fake.tolist()) / 50
    assert abs(float(gan.discriminator_loss(real, fake, "hinge")) - expected) < 1e-5
    assert torch.allclose(gan.generator_loss(fake, "hinge"), -fake.mean())


@pytest.mark.parametrize("loss", ["nonsaturating", "hinge"])
@pytest.mark.parametrize("spectral_norm", [False, True])
def test_one_d_step_lowers_the_d_loss_and_one_g_step_the_g_loss_on_a_fixed_batch(loss, spectral_norm):
    model = build((3, 24, 24), loss=loss, spectral_norm=spectral_norm)
    opts = optimizers(model)
    x = torch.rand(16, 3, 24, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = model.noise(16, torch.Generator().manual_seed(2))
    fake = model.generator(z).detach()

    def d_loss():
        return gan.discriminator_loss(model.discriminator(x), model.discriminator(fake), loss)

    before = d_loss()
    opts["discriminator"].zero_grad()
    before.backward()
    opts["discriminator"].step()
    assert d_loss() < before.detach()
    d_params = [p.clone() for p in model.discriminator.parameters()]

    def g_loss():
        return gan.generator_loss(model.discriminator(model.generator(z)), loss)

    before = g_loss()
    opts["generator"].zero_grad()
    before.backward()
    opts["generator"].step()
    assert g_loss() < before.detach()
    assert all(torch.equal(a, b) for a, b in zip(d_params, model.discriminator.parameters()))   # D untouched


def test_train_step_updates_both_networks_and_reports_the_terms():
    model = build()
    opts = optimizers(model)
    d_before = [p.clone() for p in model.discriminator.parameters()]
    g_before = [p.clone() for p in model.generator.parameters()]
    terms = model.train_step(torch.rand(8, 3, 24, 24), torch.zeros(8, dtype=torch.long), opts)
    assert set(terms) == {"loss", "loss_D", "loss_G", "D_x", "D_G_z"} and terms["loss"] == terms["loss_D"]
    assert not any(torch.equal(a, b) for a, b in zip(d_before, model.discriminator.parameters()))
    assert not any(torch.equal(a, b) for a, b in zip(g_before, model.generator.parameters()))
    assert opts["generator"].param_groups[0]["betas"] == (0.5, 0.999)   # DCGAN's Adam, from TRAIN_DEFAULTS
    assert train_script.parse_args(["--model", "GAN"]).adam_beta1 == 0.5
    assert train_script.parse_args(["--model", "VAE"]).adam_beta1 == 0.9
    args = train_script.parse_args(["--model", "GAN", "--adam-beta1", "0", "--adam-beta2", "0.9"])
    assert train_script.make_optimizer(model.generator, args).param_groups[0]["betas"] == (0.0, 0.9)
    assert train_script.parse_args(["--model", "GAN"]).adam_beta2 == 0.999


def test_ema_update_math():
    model = build(ema_decay=0.9)
    with torch.no_grad():
        for e, g in zip(model.ema.state_dict().values(), model.generator.state_dict().values()):
            if e.is_floating_point():
                e.fill_(1.0)
                g.fill_(3.0)
    model.ema_updates.fill_(100)   # past the warm-up: d = min(0.9, 101 / 110) = 0.9
    model.update_ema()
    # ema <- d ema + (1 - d) theta = 0.9 * 1 + 0.1 * 3; BatchNorm's running statistics alike
    for name, e in model.ema.state_dict().items():
        if e.is_floating_point():
            assert torch.allclose(e, torch.full_like(e, 1.2)), name
    assert int(model.ema_updates) == 101
    model.ema_updates.fill_(0)     # warm-up: d = min(0.9, 1 / 10) = 0.1
    model.update_ema()
    assert torch.allclose(next(model.ema.parameters()), torch.full_like(next(model.ema.parameters()), 0.1 * 1.2 + 2.7))
    no_ema = build(ema_decay=0.0)
    no_ema.update_ema()   # decay 0: the EMA is G itself
    for e, g in zip(no_ema.ema.parameters(), no_ema.generator.parameters()):
        assert torch.equal(e, g)


def test_conditional_generator_honours_labels():
    model = build((3, 24, 24), 3, conditional=True).eval()
    with torch.no_grad():   # at DCGAN's initialisation every image is close to grey: make the weights count
        for p in model.ema.parameters():
            p.normal_(0, 0.5)
    assert model.conditional and not build((3, 24, 24), 1, conditional=True).conditional
    assert not build((3, 24, 24), 3).conditional   # conditioning is opt-in
    labels = torch.tensor([2, 0, 1, 2])
    a = model.sample(4, torch.Generator().manual_seed(0), labels=labels)
    b = model.sample(4, torch.Generator().manual_seed(0), labels=torch.tensor([0, 0, 1, 1]))
    assert a.shape == (4, 3, 24, 24)
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[2], b[2])   # same z, label changes the image
    default = model.sample(4, torch.Generator().manual_seed(0))   # class i mod K
    assert torch.allclose(default, model.sample(4, torch.Generator().manual_seed(0), labels=torch.tensor([0, 1, 2, 0])))
    with pytest.raises(UserError, match="unconditional"):
        build().eval().sample(2, labels=torch.tensor([0, 1]))


def test_divergence_stops_on_nan_and_when_d_wins_for_many_steps():
    model = build(divergence_steps=3)
    ok = {"loss_D": torch.tensor(1.0), "loss_G": torch.tensor(1.0), "D_x": torch.tensor(0.6), "D_G_z": torch.tensor(0.4)}
    won = {**ok, "D_x": torch.tensor(0.999), "D_G_z": torch.tensor(0.001)}
    with pytest.raises(TrainingDiverged, match="nan"):
        model.check_divergence({**ok, "loss_G": torch.tensor(float("nan"))})
    model.check_divergence(won)
    model.check_divergence(won)
    model.check_divergence(ok)   # a step D did not win resets the count
    model.check_divergence(won)
    model.check_divergence(won)
    with pytest.raises(TrainingDiverged, match="D won completely .* 3 steps"):
        model.check_divergence(won)
    never = build(divergence_steps=0)
    for _ in range(5):
        never.check_divergence(won)


def test_auto_features_are_fid_with_the_inception_weights_else_the_evaluator(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert fid.resolve_features(["auto"]) == ["evaluator"]
    assert fid.resolve_features(["auto", "inception"], "weights.pth") == ["inception", "inception"]
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / fid.FID_WEIGHTS_NAME).touch()
    assert fid.resolve_features(["auto"]) == ["inception"]


def test_a_diverged_run_exits_non_zero_and_keeps_best(tmp_path, monkeypatch, capsys):
    data = common.make_shapes(n=120, image_size=8)
    evaluator = tmp_path / "models" / "Evaluator_shapes_8.pth"
    net, accuracy = fid.train_evaluator(data, epochs=1, width=4, log=lambda line: None)
    fid.save_evaluator(net, data, accuracy, 0, evaluator)
    monkeypatch.setattr(common, "make_shapes", lambda **kwargs: data)
    argv = ["--model", "GAN", "--image-size", "8", "--batch-size", "32", "--ngf", "4", "--ndf", "4",
            "--fid-every", "1", "--fid-features", "evaluator", "--models-dir", str(tmp_path / "models"),
            "--log-dir", str(tmp_path / "log")]
    train_script.train(argv + ["--epochs", "1"])
    best, last = tmp_path / "models" / "Best_GAN.pth", tmp_path / "models" / "Last_GAN.pth"
    saved = best.read_bytes(), last.read_bytes()
    monkeypatch.setattr(gan, "generator_loss", lambda logits, kind: logits.mean() * float("nan"))
    with pytest.raises(SystemExit) as exit_info:
        train_script.train(argv + ["--epochs", "3", "--resume"])
    assert exit_info.value.code == 1
    assert "GAN diverged: loss_D" in capsys.readouterr().err
    assert (best.read_bytes(), last.read_bytes()) == saved


def test_cli_end_to_end_on_the_bundled_data(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))   # no Inception weights: the default metric is FD_eval
    tiny = ["--image-size", "12", "--epochs", "2", "--batch-size", "128", "--ngf", "8", "--ndf", "8", "--conditional"]
    result = run_script("train_script.py", "--model", "GAN", *tiny, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "python fid.py train-evaluator --data shapes --image-size 12" in result.stderr.strip().splitlines()[-1]
    result = run_script("fid.py", "train-evaluator", "--image-size", "12", "--epochs", "1", "--width", "4",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run_script("train_script.py", "--model", "GAN", *tiny, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    epochs = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and all(k in epochs[0] for k in ("loss_D", "loss_G", "D_x", "D_G_z"))
    assert "FD_eval" not in epochs[0] and "FD_eval" in epochs[1] and epochs[1].endswith("*best*")   # every 2 epochs
    assert (tmp_path / "models" / "Best_GAN.pth").is_file()
    result = run_script("random_generation.py", "--model", "GAN", "--n", "9", "--class-label", "red_circle",
                        "--fid", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "vis" / "random_images_GAN.png").is_file()
    last = result.stdout.strip().splitlines()[-1]   # measured as in training: FD_eval, with the class accuracy
    assert last.startswith("FD_eval ") and "accuracy_eval" in last and "600 samples vs the 600" in last
