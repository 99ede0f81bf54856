"""Latent diffusion (latent_diffusion.py): shapes of both stages, the latent scale, the stage-1 checks, CLI."""
from contextlib import nullcontext

import pytest
import torch

import common
import image_data
import latent_diffusion as ldm
import registry
import train_flags
import train_script
from common import UserError
from conftest import run_script, write_image_folder

TINY = ["--image-size", "8", "--batch-size", "16", "--ae-width", "8", "--latent-channels", "2", "--ae-downsample", "2",
        "--timesteps", "50", "--width", "8", "--channel-mults", "1", "2", "--attention-levels", "1"]


def config(**overrides):
    values = dict(ae_width=8, latent_channels=2, ae_downsample=2, timesteps=50, width=8, channel_mults=(1, 2),
                  attention_levels=(1,))
    return ldm.Config(**{**values, **overrides})


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A folder of 2 x 16 images and a stage-1 checkpoint trained on it for two epochs."""
    root = tmp_path_factory.mktemp("ldm")
    data = write_image_folder(root / "data", per_class=16, size=12, classes=("a", "b"))
    flags = ["--data", str(data), *TINY, "--models-dir", str(root / "models"), "--log-dir", str(root / "log")]
    train_script.train(["--model", "LDM", "--stage", "autoencoder", "--ae-epochs", "2", *flags])
    return root, data, flags


@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("channels", [1, 3])
def test_encode_decode_shapes_for_both_factors(factor, channels):
    torch.manual_seed(0)
    model = ldm.Model(config(stage="autoencoder", ae_downsample=factor, latent_channels=4), (channels, 16, 16))
    x = torch.rand(3, channels, 16, 16)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, 4, 16 // factor, 16 // factor)
    assert model.decode(mu).shape == x.shape
    recon = model.reconstruct(x)
    assert recon.min() >= 0 and recon.max() <= 1
    terms = model.eval().loss(x)
    assert set(terms) == {"loss", "reconstruction", "kl", "psnr"} and terms["loss"].ndim == 0
    assert torch.allclose(terms["psnr"], ldm.psnr(recon, x).mean())
    diffusion = ldm.Model(config(stage="diffusion", ae_downsample=factor, latent_channels=4,
                                 channel_mults=(1,) if factor == 4 else (1, 2)), (channels, 16, 16))
    assert diffusion.image_shape == (4, 16 // factor, 16 // factor)   # ddpm.Model runs on the latent shape
    with pytest.raises(UserError, match="divisible by 8"):
        ldm.Model(config(stage="diffusion", ae_downsample=4), (3, 12, 12))


def test_stage1_loss_is_l1_plus_a_small_kl_and_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = ldm.Model(config(stage="autoencoder", kl_weight=1e-3), (3, 8, 8)).eval()
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        terms = model.loss(x)
        mu, logvar = model.encode(x)
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * logvar).exp()),
                                               torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1).mean()
        l1 = (model.decode(mu) - x).abs().flatten(1).sum(1).mean()
    assert torch.allclose(terms["kl"], kl, rtol=1e-4) and torch.allclose(terms["reconstruction"], l1)
    assert torch.allclose(terms["loss"], l1 + 1e-3 * kl)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        model.loss(x, generator=torch.Generator().manual_seed(0))["loss"].backward()
        optimizer.step()
    assert model.eval().loss(x)["reconstruction"] < 0.6 * terms["reconstruction"]


def test_latent_scale_makes_training_latents_unit_variance_and_records_the_autoencoder(stage1):
    root, data_dir, _ = stage1
    data = image_data.load_data(str(data_dir), 8)
    train_idx, _ = image_data.split_indices(len(data.images), 0)
    model = ldm.Model(config(stage="diffusion", autoencoder=str(root / "models" / "Best_LDM_autoencoder.pth")),
                      data.image_shape, 2)
    model.prepare(data, data.images[train_idx])
    z = model.latents(image_data.to_float(data.images[train_idx]), torch.Generator().manual_seed(123))
    assert abs(z.var().item() - 1) < 0.05 and model.latent_scale.item() != 1
    ckpt = torch.load(root / "models" / "Best_LDM_autoencoder.pth", weights_only=True)
    assert model.first_stage["fingerprint"] == ldm.fingerprint(ckpt["model_state"])
    assert model.first_stage["image_shape"] == [3, 8, 8] and model.first_stage["val_psnr"] > 0
    for name, weight in ckpt["model_state"].items():
        assert torch.equal(model.autoencoder.state_dict()[name], weight)


def test_stage2_refuses_a_mismatched_or_missing_stage1_checkpoint(stage1, tmp_path):
    root, data_dir, flags = stage1
    stage2 = ["--model", "LDM", "--stage", "diffusion", "--epochs", "1", *flags]
    with pytest.raises(UserError, match="does not fit this run: it was trained on 3x8x8 images, not 3x16x16"):
        train_script.train([*stage2, "--image-size", "16"])
    with pytest.raises(UserError, match="it has --latent-channels 2, this run --latent-channels 3"):
        train_script.train([*stage2, "--latent-channels", "3"])
    other = write_image_folder(tmp_path / "other", per_class=8, size=12, classes=("a", "b"), seed=1)
    with pytest.raises(UserError, match="it was trained on --data"):
        train_script.train([*stage2, "--data", str(other)])
    with pytest.raises(UserError, match="train it first"):
        train_script.train([*stage2, "--run-name", "other"])
    train_script.train(["--model", "VAE", "--data", str(data_dir), "--image-size", "8", "--epochs", "1",
                        "--models-dir", str(tmp_path), "--run-name", "vae", "--log-dir", str(tmp_path / "log")])
    with pytest.raises(UserError, match="holds a VAE model, not a stage-1 LDM autoencoder"):
        train_script.train([*stage2, "--autoencoder", str(tmp_path / "Best_vae.pth")])


def test_samples_are_images_in_0_1_of_the_data_shape_for_both_samplers():
    torch.manual_seed(0)
    model = ldm.Model(config(stage="diffusion"), (3, 8, 8), 3).eval()
    with torch.no_grad():
        for p in model.ema.parameters():   # non-zero weights everywhere: eps_theta != 0
            p.add_(torch.randn_like(p) * 0.05)
    frames = model.denoising_process(2, torch.Generator().manual_seed(0), frames=3, steps=4)
    assert frames.shape == (3, 2, 3, 8, 8) and frames.min() >= 0 and frames.max() <= 1
    for options in ({"steps": 5}, {"sampler": "ddpm"}, {"labels": torch.tensor([2, 0, 1]), "guidance": 2.0}):
        images = model.sample(3, torch.Generator().manual_seed(1), **options)
        assert images.shape == (3, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(model.sample(2, torch.Generator().manual_seed(7), steps=4),
                       model.sample(2, torch.Generator().manual_seed(7), steps=4))


def test_cli_end_to_end_on_the_bundled_shapes(tmp_path, monkeypatch, capsys):
    flags = [*TINY, "--epochs", "1", "--ae-epochs", "1", "--batch-size", "256"]
    result = run_script("train_script.py", "--model", "LDM", *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "# stage 2 on the autoencoder models/Best_LDM_autoencoder.pth" in result.stdout
    assert result.stdout.count("val_loss") == 2
    stage1_line = next(line for line in result.stdout.splitlines() if line.startswith("epoch 1 "))
    tokens = stage1_line.split()
    assert 0 < float(tokens[tokens.index("val_psnr") + 1]) < 100   # stage 1 prints its validation PSNR
    for name in ("Best_LDM_autoencoder", "Last_LDM_autoencoder", "Best_LDM", "Last_LDM"):
        assert (tmp_path / "models" / f"{name}.pth").is_file()
    import random_generation
    import visualization
    monkeypatch.chdir(tmp_path)   # the rest in-process: the same code without another start-up

    def run(script, *argv):
        monkeypatch.setattr("sys.argv", [script.__name__, *argv])
        with pytest.raises(SystemExit) if "--checkpoint" in argv else nullcontext():
            common.run_cli(script.main)

    runs = list(ldm.stages(train_flags.parse_args(["--model", "LDM", *flags])))   # stage 1 fits: reused, said so
    assert [r.stage for r in runs] == ["diffusion"] and runs[0].autoencoder == "models/Best_LDM_autoencoder.pth"
    assert "# stage 1: reusing models/Best_LDM_autoencoder.pth" in capsys.readouterr().out
    runs = list(ldm.stages(train_flags.parse_args(["--model", "LDM", *flags, "--latent-channels", "3"])))
    assert [r.stage for r in runs] == ["autoencoder", "diffusion"] and runs[0].run_name == "LDM_autoencoder"
    assert "retraining models/Best_LDM_autoencoder.pth, as it has --latent-channels 2" in capsys.readouterr().out
    run(random_generation, "--model", "LDM", "--n", "4", "--steps", "3", "--class-label", "blue_square")
    run(visualization, "--model", "LDM", "--n", "4")
    for picture in ("random_images_LDM", "train_LDM", "valid_LDM", "denoising_LDM", "loss_LDM"):
        assert (tmp_path / "vis" / f"{picture}.png").is_file(), picture
    model, ckpt = registry.load_model("models/Best_LDM.pth", "LDM")   # the checkpoint alone
    stage1 = torch.load("models/Best_LDM_autoencoder.pth", weights_only=True)
    assert ckpt["model_state"]["_extra_state"]["fingerprint"] == ldm.fingerprint(stage1["model_state"])
    assert model.latent_scale.item() == ckpt["model_state"]["latent_scale"].item() != 1
    run(random_generation, "--model", "LDM", "--checkpoint", "models/Best_LDM_autoencoder.pth")
    assert "does not generate (an autoencoder stage)" in capsys.readouterr().err
