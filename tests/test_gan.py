"""GAN (gan.py, diffaugment.py): shapes and ranges, one D and one G step, the losses' closed forms, EMA,
conditioning, divergence, DiffAugment's transforms against their definitions, R1 against a gradient by hand,
--d-steps, SAGAN's self-attention against its sums by hand, and the CLI end to end on the bundled shapes data."""
import argparse

import pytest
import torch
import torch.nn.functional as F

import common
import contract
import diffaugment
import fid
import gan
import image_data
import registry
import train_flags
import train_script
from common import TrainingDiverged, UserError
from conftest import run_script, write_image_folder

TINY = dict(latent_dim=8, ngf=4, ndf=4, augment="")   # plain DCGAN; a test that augments says so


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
    with pytest.raises(UserError, match="--d-lr-scale must be above 0"):
        build(d_lr_scale=0.0)


def test_g_width_follows_the_image_size_unless_ngf_is_given():
    assert gan.Config().ngf == 32   # the default: half DCGAN's width at every size
    for size, width in [(16, 64), (24, 64), (28, 32), (32, 32), (64, 32)]:   # --ngf 0: 64 up to 24x24, 32 above
        _, k = gan.size_plan(size)
        net = build((3, size, size), ngf=0).generator.net
        assert (net[0].out_channels, net[-2].in_channels) == (width * 2 ** (k - 1), width)   # z -> 2^(k-1) width; last
    assert build((3, 24, 24), ngf=16).generator.net[-2].in_channels == 16
    assert build((3, 64, 64), ngf=16).generator.net[-2].in_channels == 16


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
    assert train_flags.parse_args(["--model", "GAN"]).adam_beta1 == 0.5
    assert train_flags.parse_args(["--model", "VAE"]).adam_beta1 == 0.9
    args = train_flags.parse_args(["--model", "GAN", "--adam-beta1", "0", "--adam-beta2", "0.9"])
    assert train_script.make_optimizer(model.generator, args).param_groups[0]["betas"] == (0.0, 0.9)
    assert train_flags.parse_args(["--model", "GAN"]).adam_beta2 == 0.999


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
    assert build((3, 24, 24), 3).conditional and not build((3, 24, 24), 3, conditional=False).conditional   # default on
    # one class per image only: multi-label and layout data give an unconditional GAN
    for kind in ("labels", "layout"):
        assert not gan.Model(gan.Config(**TINY), (3, 24, 24), 24, kind).conditional
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


def small_shapes_with_an_evaluator(tmp_path, monkeypatch):
    """The built-in shapes at 8x8, 120 images, and an evaluator trained on them in tmp_path/models."""
    data = image_data.make_shapes(n=120, image_size=8)
    net, accuracy = fid.train_evaluator(data, log=lambda line: None)   # the defaults: well above chance
    fid.save_evaluator(net, data, accuracy, 0, tmp_path / "models" / "Evaluator_shapes_8.pth")
    monkeypatch.setattr(image_data, "make_shapes", lambda **kwargs: data)


def test_a_diverged_run_exits_non_zero_and_keeps_best(tmp_path, monkeypatch, capsys):
    small_shapes_with_an_evaluator(tmp_path, monkeypatch)
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


@pytest.mark.parametrize("select_by, best_epoch, epochs_run", [("fd", 4, 4), ("swd", 1, 3)])
def test_select_by_chooses_best_and_early_stops_on_that_metric(tmp_path, monkeypatch, select_by, best_epoch,
                                                               epochs_run):
    small_shapes_with_an_evaluator(tmp_path, monkeypatch)
    # FD_eval falls at every measurement while SWD rises: the two metrics disagree on the best epoch
    readings = iter([{"FD_eval": 4.0 - e, "KID_eval": 0.0, "SWD": 20.0 + e} for e in range(4)])
    monkeypatch.setattr(fid.SampleQuality, "__call__", lambda self, model, device="cpu": next(readings))
    train_script.train(["--model", "GAN", "--image-size", "8", "--batch-size", "64", "--ngf", "4", "--ndf", "4",
                        "--epochs", "4", "--patience", "2", "--fid-every", "1", "--fid-features", "evaluator", "--swd",
                        "--select-by", select_by, "--models-dir", str(tmp_path / "models"),
                        "--log-dir", str(tmp_path / "log")])
    best = common.load_checkpoint(tmp_path / "models" / "Best_GAN.pth")
    last = common.load_checkpoint(tmp_path / "models" / "Last_GAN.pth")
    assert (best["epoch"], last["epoch"]) == (best_epoch, epochs_run)   # SWD: no new best at epochs 2, 3: stop
    assert best["best_metric"] == {"fd": 4.0 - best_epoch + 1, "swd": 20.0 + best_epoch - 1}[select_by]


@pytest.mark.parametrize("argv, problem", [
    (["--model", "GAN", "--select-by", "swd"], "--select-by swd chooses Best on SWD, which is measured with --swd"),
    (["--model", "VAE", "--select-by", "swd", "--swd"], "the VAE model chooses Best on its val_loss")])
def test_select_by_swd_without_swd_or_for_a_loss_selected_model_is_a_one_line_error(argv, problem):
    with pytest.raises(UserError, match=problem):
        train_flags.parse_args(argv)


def test_cli_end_to_end_on_the_bundled_data(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))   # no Inception weights: the default metric is FD_eval
    tiny = ["--image-size", "12", "--epochs", "2", "--batch-size", "128", "--ngf", "8", "--ndf", "8"]   # conditional by default
    result = run_script("train_script.py", "--model", "GAN", *tiny, cwd=tmp_path)   # no evaluator yet: made first
    assert result.returncode == 0, result.stderr
    assert ("# no evaluator at models/Evaluator_shapes_12.pth: training one (python fid.py train-evaluator "
            "--data shapes --image-size 12 --channels 3)") in result.stdout
    epochs = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and all(k in epochs[0] for k in ("loss_D", "loss_G", "D_x", "D_G_z"))
    assert "FD_eval" not in epochs[0] and "FD_eval" in epochs[1] and epochs[1].endswith("*best*")   # every 2 epochs
    assert (tmp_path / "models" / "Best_GAN.pth").is_file()
    result = run_script("random_generation.py", "--model", "GAN", "--n", "9", "--class-label", "red_circle",
                        "--fid", "--swd", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "vis" / "random_images_GAN.png").is_file()
    last = result.stdout.strip().splitlines()[-2]   # the last is the memorisation check; measured as in training: FD_eval, with the class accuracy
    assert last.startswith("FD_eval ") and "accuracy_eval" in last and " SWD " in last
    assert "600 samples vs the 600" in last
    # The benchmark's sample sets measure as random_generation.py --seed S does
    result = run_script("benchmarks/gan_small_data.py", "sample-sets", "models/Best_GAN.pth",
                        "--evaluator", "models/Evaluator_shapes_12.pth", "--seeds", "0", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    fd, swd_value = last.split()[1], last.split()[last.split().index("SWD") + 1]
    assert f"models/Best_GAN.pth seed 0: FD_eval {fd} SWD {swd_value} (floor: " in result.stdout
    assert "minus the floor" in result.stdout


# -- DiffAugment (diffaugment.py) ------------------------------------------------------------------------------

def test_colour_transforms_match_their_definitions_per_pixel():
    x = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0)) * 2 - 1
    factors = torch.tensor([0.3, 1.7])
    for i in range(2):
        for r in range(4):
            for c in range(5):
                pixel, f = x[i, :, r, c], float(factors[i])
                grey = sum(pixel.tolist()) / 3            # saturation: towards the pixel's channel mean
                saturated = diffaugment.saturation(x, factors)[i, :, r, c]
                assert torch.allclose(saturated, grey + f * (pixel - grey), atol=1e-6)
                assert torch.allclose(diffaugment.brightness(x, factors)[i, :, r, c], pixel + f)
        mean = sum(x[i].flatten().tolist()) / x[i].numel()   # contrast: towards the image's mean
        assert torch.allclose(diffaugment.contrast(x, factors)[i], mean + float(factors[i]) * (x[i] - mean), atol=1e-6)
    assert torch.allclose(diffaugment.saturation(x, torch.ones(2)), x)
    assert torch.allclose(diffaugment.contrast(x, torch.ones(2)), x)


def test_translation_shifts_by_the_given_pixels_with_zero_padding():
    x = torch.arange(1.0, 2 * 2 * 5 * 6 + 1).view(2, 2, 5, 6)
    shift = torch.tensor([[1, -2], [-3, 0]])                  # (dy, dx) per image
    out = diffaugment.translate(x, shift)
    for i, (dy, dx) in enumerate(shift.tolist()):
        for r in range(5):
            for c in range(6):
                inside = 0 <= r - dy < 5 and 0 <= c - dx < 6
                expected = x[i, :, r - dy, c - dx] if inside else torch.zeros(2)
                assert torch.equal(out[i, :, r, c], expected), (i, r, c)
    assert torch.equal(diffaugment.translate(x, torch.zeros(2, 2, dtype=torch.long)), x)


def test_cutout_zeroes_exactly_the_given_box_clipped_to_the_image():
    x = torch.rand(2, 3, 6, 6) + 1                            # no zeros of its own
    out = diffaugment.cut_out(x, torch.tensor([[1, 2], [-2, 4]]), side=3)
    boxes = [(range(1, 4), range(2, 5)), (range(1), range(4, 6))]   # the second clipped at the top and right
    for i, (rows, cols) in enumerate(boxes):
        for r in range(6):
            for c in range(6):
                expected = torch.zeros(3) if r in rows and c in cols else x[i, :, r, c]
                assert torch.equal(out[i, :, r, c], expected), (i, r, c)


def test_random_policies_draw_within_the_papers_ranges():
    size, generator = 16, torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, size, size, generator=generator) + 1
    moved = diffaugment.random_translation(x, generator=generator)
    limit = size // 8
    shifts = [(dy, dx) for dy in range(-limit, limit + 1) for dx in range(-limit, limit + 1)]
    found = [next(s for s in shifts if torch.equal(moved[i], diffaugment.translate(x[i:i + 1], torch.tensor([s]))[0]))
             for i in range(64)]   # StopIteration if an image moved further than S/8
    assert len(set(found)) > 10
    holes = diffaugment.random_cutout(x, generator=generator)[:, 0] == 0       # (64, S, S)
    rows, cols = holes.any(dim=2), holes.any(dim=1)
    assert torch.equal(holes, rows[:, :, None] & cols[:, None, :])             # one box per image
    assert rows.sum(1).max() == size // 2 and rows.sum(1).min() >= size // 4   # side S/2, at least half inside
    grey = torch.zeros(200, 3, 2, 2)
    brightened = diffaugment.random_color(grey, generator=generator)   # b ~ U(-1/2, 1/2): grey stays grey
    assert brightened.abs().max() <= 0.5 and brightened.min() < -0.4 and brightened.max() > 0.4


@pytest.mark.parametrize("transform", [
    lambda x: diffaugment.brightness(x, torch.tensor([0.2, -0.3], dtype=x.dtype)),
    lambda x: diffaugment.saturation(x, torch.tensor([0.5, 1.5], dtype=x.dtype)),
    lambda x: diffaugment.contrast(x, torch.tensor([0.7, 1.2], dtype=x.dtype)),
    lambda x: diffaugment.translate(x, torch.tensor([[1, -1], [0, 2]])),
    lambda x: diffaugment.cut_out(x, torch.tensor([[0, 1], [2, 2]]), 2),
])
def test_each_transform_is_differentiable_in_the_image(transform):
    x = torch.rand(2, 3, 5, 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(transform, (x,))   # analytic gradient against finite differences


def test_gradients_reach_the_generator_through_every_policy_and_off_is_the_identity():
    model = build(augment="color,translation,cutout")
    assert model.augment_policy == ("color", "translation", "cutout")
    z = model.noise(4, torch.Generator().manual_seed(0))
    model.generator_terms(z, None)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())
    x = torch.rand(4, 3, 24, 24)
    assert diffaugment.diff_augment(x, ()) is x
    plain = build().eval()
    assert torch.equal(plain.judge(x, None), plain.discriminator(x))
    augmented = model.eval()
    assert not torch.allclose(augmented.judge(x, None), augmented.discriminator(x))
    with pytest.raises(UserError, match="unknown --augment policy flip"):
        build(augment="color,flip")


# -- R1 and --d-steps ------------------------------------------------------------------------------------------

class LinearD(torch.nn.Module):
    """D(x) = w . x + b: grad_x D(x) = w for every image, so R1 = ||w||^2."""

    def __init__(self, numel):
        super().__init__()
        self.w, self.b = torch.nn.Parameter(torch.randn(numel)), torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, labels=None):
        return x.flatten(1) @ self.w + self.b


def test_r1_is_the_squared_gradient_norm_by_hand_and_d_minimises_it():
    d = LinearD(3 * 4 * 4)
    real = torch.rand(5, 3, 4, 4, requires_grad=True)
    penalty = gan.r1_penalty(d(real), real)
    assert torch.allclose(penalty, (d.w ** 2).sum())
    penalty.backward()                                        # differentiable in D's weights: d ||w||^2 / dw = 2 w
    assert torch.allclose(d.w.grad, 2 * d.w)


def test_lazy_r1_adds_gamma_over_two_times_the_interval_on_every_nth_d_step():
    model = build((3, 8, 8), r1_gamma=0.5, r1_every=3, divergence_steps=0)
    model.discriminator = LinearD(3 * 8 * 8)
    opts = optimizers(model, lr=0.0)                          # lr 0: w stays, so R1 stays ||w||^2
    expected = 3 * 0.5 / 2 * float((model.discriminator.w.detach() ** 2).sum())
    r1 = [float(model.train_step(torch.rand(2, 3, 8, 8), None, opts)["r1"]) for _ in range(7)]
    assert r1 == pytest.approx([expected, 0, 0, expected, 0, 0, expected])
    terms = model.discriminator_terms(torch.rand(2, 3, 8, 8) * 2 - 1, model.noise(2), None, penalise=True)
    assert torch.allclose(terms["loss"], terms["loss_D"] + expected)


def test_lecam_penalty_by_hand_and_its_anchors_are_emas_of_d_mean_logits():
    # relu(D(x) - a_F) = relu([1, -1, 3] + 0.5) = [1.5, 0, 3.5], relu(a_R - D(G(z))) = relu(0.5 - [0, -2]) = [0.5, 2.5]
    penalty = gan.lecam_penalty(torch.tensor([1.0, -1.0, 3.0]), torch.tensor([0.0, -2.0]), 0.5, -0.5)
    assert float(penalty) == pytest.approx((1.5 ** 2 + 3.5 ** 2) / 3 + (0.5 ** 2 + 2.5 ** 2) / 2)
    model = build((3, 8, 8), lecam=0.3, divergence_steps=0)
    model.discriminator = LinearD(3 * 8 * 8)
    anchors = None
    for step in range(3):
        real, z = torch.rand(4, 3, 8, 8) * 2 - 1, model.noise(4)
        terms = model.discriminator_terms(real, z, None)
        model.d_updates += 1
        with torch.no_grad():
            real_logits, fake_logits = model.discriminator(real), model.discriminator(model.generator(z))
        means = torch.stack([real_logits.mean(), fake_logits.mean()])
        anchors = means if anchors is None else 0.99 * anchors + 0.01 * means   # the first step sets them
        assert torch.allclose(model.lecam_anchors, anchors)
        assert torch.allclose(terms["lecam"], 0.3 * gan.lecam_penalty(real_logits, fake_logits, *anchors))
        assert torch.allclose(terms["loss"], terms["loss_D"] + terms["lecam"])


def test_d_steps_five_makes_five_d_updates_per_g_update():
    model = build(d_steps=5)
    opts = optimizers(model)
    g_first = next(model.generator.parameters())
    counts = []
    for call in range(1, 11):
        g_before = g_first.clone()
        model.train_step(torch.rand(4, 3, 24, 24), None, opts)
        counts.append(not torch.equal(g_before, g_first))    # did this call update G?
    assert counts == [False] * 4 + [True] + [False] * 4 + [True]
    d_steps = {int(s["step"]) for s in opts["discriminator"].state.values()}
    g_steps = {int(s["step"]) for s in opts["generator"].state.values()}
    assert d_steps == {10} and g_steps == {2} and int(model.ema_updates) == 2 and int(model.d_updates) == 10


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_g_step_computes_no_gradient_for_d_and_leaves_d_trainable(spectral_norm):
    model = build(spectral_norm=spectral_norm)
    opts = optimizers(model)
    d_before = [p.detach().clone() for p in model.discriminator.parameters()]
    opts.step("generator", model.generator_terms, model.noise(4), None)
    assert all(p.grad is None for p in model.discriminator.parameters())           # no work spent on D's weights
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())
    assert all(torch.equal(a, b) for a, b in zip(d_before, model.discriminator.parameters()))
    assert all(p.requires_grad for p in model.discriminator.parameters())         # D's own step still learns


def test_checkpoints_without_the_d_update_count_ada_p_and_lecam_anchors_still_load():
    state = {k: v for k, v in build().state_dict().items() if k not in ("d_updates", "ada_p", "lecam_anchors")}
    model = build(augment="translation")
    model.load_state_dict(state)   # strict
    assert int(model.d_updates) == 0 and float(model.ada_p) == 1.0 and not model.lecam_anchors.any()


# -- ADA -------------------------------------------------------------------------------------------------------

def test_ada_applies_each_transform_with_probability_p():
    x = torch.rand(2000, 1, 8, 8) + 1
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(diffaugment.diff_augment(x, tuple(diffaugment.POLICIES), 0.0, generator), x)   # p = 0: none
    holes = (diffaugment.random_cutout(x, 0.3, generator) == 0).flatten(1).any(dim=1)
    assert abs(holes.float().mean() - 0.3) < 0.04                     # binomial: 4 standard deviations is 0.041
    grey = torch.zeros(2000, 3, 2, 2)                                 # colour: only brightness moves a grey image
    moved = diffaugment.random_color(grey, 0.3, generator).flatten(1).any(dim=1)
    assert abs(moved.float().mean() - 0.3) < 0.04


class ConstantD(torch.nn.Module):
    """D(x) = c for every image: r_t = sign(c). 0 * x keeps G in the graph of G's loss, as a real D does (G's step
    freezes D's weights, so c alone would leave nothing to differentiate)."""

    def __init__(self, c):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(float(c)))

    def forward(self, x, labels=None):
        return self.c + 0 * x.sum(dim=(1, 2, 3))


def test_ada_raises_p_while_r_t_is_above_the_target_and_lowers_it_while_below():
    model = build((3, 8, 8), augment="translation", ada_target=0.6, ada_images=40, divergence_steps=0)
    assert float(model.ada_p) == 0.0
    model.discriminator = ConstantD(5.0)                            # r_t = 1 > 0.6: p += B / ada_images
    opts = optimizers(model, lr=0.0)
    ps = [float(model.train_step(torch.rand(8, 3, 8, 8), None, opts)["ada_p"]) for _ in range(6)]
    assert ps == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])      # clipped at 1
    model.discriminator.c.data.fill_(-5.0)                          # r_t = -1 < 0.6: p -= B / ada_images
    terms = model.train_step(torch.rand(4, 3, 8, 8), None, opts)
    assert float(terms["ada_p"]) == pytest.approx(0.9) and float(terms["ada_r"]) == -1.0
    with pytest.raises(UserError, match="pass --augment"):
        build(ada_target=0.6)


@pytest.mark.parametrize("flags", [
    ["--augment", "color,translation,cutout", "--r1-gamma", "1", "--r1-every", "2", "--lecam", "0.3"],
    ["--spectral-norm", "--d-steps", "3", "--adam-beta1", "0", "--adam-beta2", "0.9", "--augment", "translation",
     "--ada-target", "0.6", "--ada-images", "100"],
    ["--d-lr-scale", "4", "--lr-decay-every", "1", "--lr-decay", "0.5"],
])
def test_cli_with_the_small_data_flags_trains_and_resumes_exactly(tmp_path, flags):
    data = write_image_folder(tmp_path / "data", per_class=20, size=16, classes=("x", "y"))

    def train(folder, *more):
        return train_script.train(["--model", "GAN", "--data", str(data), "--image-size", "8", "--batch-size", "8",
                                   "--ngf", "4", "--ndf", "4", "--fid-every", "0", "--models-dir",
                                   str(folder / "models"), "--log-dir", str(folder / "log"), *flags, *more])

    straight, _ = train(tmp_path / "a", "--epochs", "2")    # 32 training images: 4 D steps an epoch
    train(tmp_path / "b", "--epochs", "1")
    resumed, _ = train(tmp_path / "b", "--epochs", "2", "--resume")
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    assert int(straight.d_updates) == 8
    steps_per_g = straight.config.d_steps
    assert int(straight.ema_updates) == 8 // steps_per_g
    ckpt = torch.load(tmp_path / "b" / "models" / "Last_GAN.pth", weights_only=True)
    betas = ckpt["optimizer_states"]["discriminator"]["param_groups"][0]["betas"]
    assert tuple(betas) == ((0.0, 0.9) if "--spectral-norm" in flags else (0.5, 0.999))
    # TTUR: D's lr is --d-lr-scale times G's through the decays and the resume; the log shows --lr's own value
    lr_g, lr_d = (ckpt["optimizer_states"][g]["param_groups"][0]["lr"] for g in ("generator", "discriminator"))
    decay = 0.25 if "--lr-decay" in flags else 1.0   # two epochs, halved after each
    assert lr_g == pytest.approx(2e-4 * decay) and lr_d == pytest.approx(lr_g * (4 if "--d-lr-scale" in flags else 1))
    untimed = [{k: v for k, v in record.items() if "seconds" not in k}
               for run in ("a", "b") for record in torch.load(tmp_path / run / "models" / "Last_GAN.pth",
                                                               weights_only=True)["history"]]
    assert untimed[:2] == untimed[2:]
    assert ("train_r1" in untimed[0]) == ("--r1-gamma" in flags)
    assert ("train_ada_p" in untimed[0]) == ("--ada-target" in flags)
    assert ("train_lecam" in untimed[0]) == ("--lecam" in flags)
    assert [r["lr"] for r in untimed[:2]] == pytest.approx([2e-4, 2e-4 * decay ** 0.5])


# -- SAGAN's self-attention ------------------------------------------------------------------------------------

def test_self_attention_is_the_identity_while_gamma_is_zero():
    block = gan.SelfAttention(16)
    x = torch.randn(2, 16, 5, 6)
    assert float(block.gamma) == 0.0 and torch.equal(block(x), x)


def test_self_attention_matches_the_papers_sums_by_hand():
    torch.manual_seed(0)
    block = gan.SelfAttention(16)                             # C/8 = 2 channels for f and g
    with torch.no_grad():
        block.gamma.fill_(1.0)
        for conv in (block.f, block.g, block.h):
            conv.weight.normal_(0, 0.5)
    x = torch.randn(2, 16, 3, 4)
    w_f, w_g, w_h = (conv.weight[:, :, 0, 0].detach() for conv in (block.f, block.g, block.h))
    expected = torch.empty_like(x)
    for b in range(2):
        xs = x[b].flatten(1).T                                # (N, C): x_i, positions row by row
        f, g, h = xs @ w_f.T, xs @ w_g.T, xs @ w_h.T          # f(x_i), g(x_i), h(x_i)
        for j in range(12):
            s = torch.stack([f[i] @ g[j] for i in range(12)])  # s_ij = f(x_i)^T g(x_j), i = 1..N
            beta = s.exp() / s.exp().sum()                     # beta_{j,i}, a softmax over i
            assert beta.max() > 2 * beta.min()                 # not uniform: the weights matter
            o = sum(beta[i] * h[i] for i in range(12))         # o_j = sum_i beta_{j,i} h(x_i)
            expected[b, :, j // 4, j % 4] = 1.0 * o + xs[j]   # y_j = gamma o_j + x_j
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("attention, channels, spectral_norm", [(12, 4, False), (6, 8, True)])
def test_attention_sits_at_its_size_in_g_and_d_and_both_gammas_learn(attention, channels, spectral_norm):
    assert gan.attention_sizes(24) == [6, 12] and gan.attention_sizes(64) == [8, 16, 32] and gan.attention_sizes(8) == []
    model = build((3, 24, 24), attention=attention, spectral_norm=spectral_norm)
    blocks, seen = {}, {}
    for name in ("generator", "discriminator"):
        [blocks[name]] = [m for m in getattr(model, name).modules() if isinstance(m, gan.SelfAttention)]   # one each
        blocks[name].register_forward_hook(lambda m, inputs, out, name=name: seen.update({name: inputs[0].shape}))
        sn = torch.nn.utils.parametrize.is_parametrized(blocks[name].f)
        assert sn == (spectral_norm and name == "discriminator")   # only D's convolutions are spectrally normalised
    images = model.generator(model.noise(5))
    assert images.shape == (5, 3, 24, 24) and model.discriminator(images).shape == (5,)
    assert seen == {"generator": (5, channels, attention, attention), "discriminator": (5, channels, attention, attention)}
    model.train_step(torch.rand(8, 3, 24, 24), None, optimizers(model))
    assert all(float(block.gamma) != 0 for block in blocks.values())   # each got a gradient and one Adam step
    assert not any(isinstance(m, gan.SelfAttention) for m in build().modules())   # off by default


def test_an_attention_size_that_is_no_feature_map_is_one_line_error(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=4, size=24, classes=("x",))
    result = run_script("train_script.py", "--model", "GAN", "--data", data, "--image-size", "24", "--attention", "16",
                        cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == ["error: --attention 16 is not a feature-map size of this GAN at 24x24; "
                                          "choose among 6, 12 (or 0: off)"]
    with pytest.raises(UserError, match=r"--attention 4 .* at 8x8; choose 0 \(off\), or a larger --image-size"):
        build((3, 8, 8), attention=4)


def test_checkpoint_with_attention_round_trips_and_older_configs_load_without_it(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=8, size=16, classes=("x", "y"))
    model, _ = train_script.train(["--model", "GAN", "--data", str(data), "--image-size", "16", "--batch-size", "8",
                                   "--epochs", "1", "--ngf", "4", "--ndf", "4", "--attention", "8", "--fid-every", "0",
                                   "--models-dir", str(tmp_path / "models"), "--log-dir", str(tmp_path / "log")])
    rebuilt, ckpt = registry.load_model(tmp_path / "models" / "Last_GAN.pth", "GAN")
    assert ckpt["config"]["attention"] == 8 and rebuilt.config.attention == 8
    for name, a in model.state_dict().items():
        assert torch.equal(a, rebuilt.state_dict()[name]), name
    assert any(float(m.gamma) != 0 for m in rebuilt.ema.modules() if isinstance(m, gan.SelfAttention))
    model.eval(), rebuilt.eval()
    assert torch.equal(model.sample(4, torch.Generator().manual_seed(0)),
                       rebuilt.sample(4, torch.Generator().manual_seed(0)))
    older = {k: v for k, v in ckpt["config"].items() if k != "attention"}   # saved before --attention existed
    assert common.config_from_dict(gan.Config, older).attention == 0
