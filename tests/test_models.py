"""Each model: architecture as specified, output shapes and ranges, a loss that falls on a fixed batch, VAE math."""
import math

import pytest
import torch

import image_data
import vae
from common import UserError
from registry import MODELS

AUTOENCODERS = ["MLPAE", "AE", "VAE"]


def build(name, image_shape=(3, 24, 24), num_classes=1, **config):
    module = MODELS[name]
    return module.Model(module.Config(**config), image_shape, num_classes)


@pytest.mark.parametrize("name", AUTOENCODERS)
@pytest.mark.parametrize("image_shape", [(3, 24, 24), (1, 28, 28), (3, 32, 32)])
def test_reconstructions_and_samples_have_the_data_shape_and_range(name, image_shape):
    torch.manual_seed(0)
    model = build(name, image_shape).eval()
    x = torch.rand(5, *image_shape)
    with torch.no_grad():
        recon = model.reconstruct(x)
        samples = model.sample(7, torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and samples.shape == (7, *image_shape)
    for out in (recon, samples):
        assert out.min() >= 0 and out.max() <= 1
    terms = model.loss(x)
    assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])


@pytest.mark.parametrize("name", AUTOENCODERS)
def test_loss_falls_on_a_fixed_batch(name):
    torch.manual_seed(0)
    model = build(name)
    x = image_data.to_float(image_data.make_shapes(n=16, image_size=24).images)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    first = None
    for _ in range(60):
        loss = model.loss(x, generator=generator)["loss"]
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = model.loss(x, generator=torch.Generator().manual_seed(0))["loss"].item()
    assert math.isfinite(final) and final < 0.5 * first


def test_samples_are_reproducible_from_the_seed():
    model = build("VAE").eval()
    a = model.sample(4, torch.Generator().manual_seed(3))
    b = model.sample(4, torch.Generator().manual_seed(3))
    c = model.sample(4, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mlp_autoencoder_follows_the_nn_lab_dimensions():
    model = build("MLPAE", (3, 24, 24), encoding_dim=64)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (1728, 256), (256, 128), (128, 64), (64, 128), (128, 256), (256, 1728)]


def test_conv_autoencoder_follows_the_nn_lab_shapes():
    model = build("AE", (3, 24, 24), encoding_dim=64)
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
             for m in list(model.encoder) + list(model.decoder) if isinstance(m, (torch.nn.ReLU, torch.nn.Linear))]
    model(torch.rand(2, 3, 24, 24))
    for h in hooks:
        h.remove()
    for expected in [(32, 24, 24), (64, 12, 12), (128, 6, 6), (64,), (64, 6, 6), (32, 12, 12)]:
        assert expected in shapes
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in model.encoder)
    with pytest.raises(UserError, match="divisible by 4"):
        build("AE", (3, 26, 26))


def test_vae_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6) * 0.5
    analytic = vae.kl_to_standard_normal(mu, logvar)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    z = q.sample((200_000,))                                            # (S, 4, 6)
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)       # E_q[log q(z) - log p(z)]
    assert torch.allclose(analytic, monte_carlo, rtol=0.02, atol=0.02)
    assert torch.allclose(analytic, torch.distributions.kl_divergence(q, p).sum(-1), atol=1e-5)
    assert torch.all(vae.kl_to_standard_normal(torch.zeros(2, 3), torch.zeros(2, 3)) == 0)


def test_vae_loss_is_per_image_sum_plus_beta_kl_averaged_over_the_batch():
    torch.manual_seed(0)
    model = build("VAE", beta=0.5).eval()
    x = torch.rand(3, 3, 24, 24)
    terms = model.loss(x, generator=torch.Generator().manual_seed(1))
    x_hat, mu, logvar = model(x, torch.Generator().manual_seed(1))
    per_image = ((x_hat - x) ** 2).sum(dim=(1, 2, 3))
    kl = (-0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1))
    assert torch.allclose(terms["reconstruction"], per_image.mean())
    assert torch.allclose(terms["kl"], kl.mean())
    assert torch.allclose(terms["loss"], (per_image + 0.5 * kl).mean())
