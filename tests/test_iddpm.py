"""Improved DDPM (iddpm.py and ddpm.py's --learn-sigma, --timestep-sampler loss-aware, val_bpd): the Gaussian KL,
the discretised decoder, the importance sampler and the learned variance, against independent computations."""
import math

import pytest
import torch

import ddpm
import iddpm
import samplers
from conftest import make_optimizers

TINY = dict(width=8, channel_mults=(1, 2), attention_levels=(1,), timesteps=40)


def build(**config):
    torch.manual_seed(0)
    return ddpm.Model(ddpm.Config(**{**TINY, **config}), (3, 8, 8))


def test_normal_kl_is_the_closed_form():
    m1, m2, lv1, lv2 = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    p = torch.distributions.Normal(m1, (0.5 * lv1).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    assert torch.allclose(iddpm.normal_kl(m1, lv1, m2, lv2), torch.distributions.kl_divergence(p, q), atol=1e-5)


@pytest.mark.parametrize("mean, log_scale", [(0.0, -1.0), (0.7, -3.0), (-0.95, -5.0), (0.3, 1.0)])
def test_the_discretised_likelihood_of_a_pixel_sums_to_one_over_its_256_values(mean, log_scale):
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)                 # the 256 levels of a pixel
    log_p = iddpm.discretized_gaussian_log_likelihood(x, torch.tensor(mean, dtype=torch.float64),
                                                      torch.tensor(log_scale, dtype=torch.float64))
    assert abs(log_p.exp().sum().item() - 1) < 1e-6
    # an inner bin is the Gaussian's mass between the bin's edges
    normal = torch.distributions.Normal(mean, math.exp(log_scale))
    inner = 100
    expected = normal.cdf(x[inner] + 1 / 255) - normal.cdf(x[inner] - 1 / 255)
    assert abs(log_p[inner].exp().item() - expected.item()) < 1e-9


def test_the_loss_aware_sampler_is_uniform_at_first_then_unbiased():
    sampler = iddpm.LossAwareSampler(5)
    assert torch.allclose(sampler.probabilities(), torch.full((5,), 0.2))
    table = torch.tensor([4.0, 1.0, 0.5, 2.0, 8.0])                    # a fixed loss per step
    for _ in range(iddpm.LOSS_HISTORY):
        sampler.record(torch.arange(5), table)
    p = sampler.probabilities()
    expected = table / table.sum() * (1 - iddpm.UNIFORM_SHARE) + iddpm.UNIFORM_SHARE / 5   # sqrt(mean L^2) = L
    assert torch.allclose(p, expected)
    t, weights = sampler.sample(400_000, torch.Generator().manual_seed(0))
    assert torch.allclose(weights, 1 / (5 * p[t]))
    assert abs((table[t] * weights).mean().item() - table.mean().item()) < 0.02   # E_p[L / (T p)] = mean L
    assert abs((t == 4).float().mean().item() - p[4].item()) < 0.005


def test_the_history_keeps_the_last_ten_losses():
    sampler = iddpm.LossAwareSampler(2)
    for k in range(13):
        sampler.record(torch.tensor([1]), torch.tensor([float(k)]))
    assert sampler.history[1].tolist() == [float(k) for k in range(3, 13)] and sampler.counts.tolist() == [0, 10]


def test_learned_variance_interpolates_and_the_vlb_trains_only_the_variance():
    model = build(learn_sigma=True)
    assert model.unet.head[-1].out_channels == 6
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.rand(4, 3, 8, 8)
    terms = model.loss(x, generator=torch.Generator().manual_seed(0))
    assert set(terms) == {"loss", "vb"} and terms["vb"] > 0
    # the KL of L_vlb reaches the network only through the variance channels: the eps ones are detached
    x0 = x * 2 - 1
    t = torch.tensor([5, 10, 20, 30])
    xt = model.q_sample(x0, t, torch.randn_like(x0))
    out = model.unet(xt, t).detach().requires_grad_(True)
    eps, v = out.chunk(2, dim=1)
    model.vlb_terms(x0, xt, t, eps.detach(), v).sum().backward()
    assert out.grad[:, :3].abs().max() == 0 and out.grad[:, 3:].abs().max() > 0
    # Sigma = exp(v log b + (1 - v) log b~) at v = 0 and 1
    log_b, log_b_tilde = torch.tensor(-3.0), torch.tensor(-5.0)
    assert iddpm.learned_log_variance(torch.tensor(1.0), log_b, log_b_tilde) == log_b
    assert iddpm.learned_log_variance(torch.tensor(0.0), log_b, log_b_tilde) == log_b_tilde


def test_respaced_ancestral_step_uses_the_learned_variance_of_the_respaced_schedule():
    model = build(learn_sigma=True).eval()
    ab = model.alphas_bar
    x, frac = torch.randn(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.3)
    x0 = torch.zeros_like(x)
    denoise = lambda xt, t: (x0, torch.zeros_like(xt), frac)   # noqa: E731
    out = next(samplers.ddpm(denoise, x, ab, [30, 10], torch.Generator().manual_seed(0)))
    b = 1 - ab[30] / ab[10]                                             # the respaced beta
    b_tilde = (1 - ab[10]) / (1 - ab[30]) * b
    mean = (1 - b).sqrt() * (1 - ab[10]) / (1 - ab[30]) * x             # x0_hat = 0
    std = (0.5 * (0.3 * b.log() + 0.7 * b_tilde.log())).exp()
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, mean + std * z, atol=1e-5)


def test_bits_per_dim_is_finite_and_falls_as_a_tiny_model_learns():
    model = build(learn_sigma=True, timestep_sampler="loss-aware")
    x = torch.rand(8, 3, 8, 8) * 0.5 + 0.25
    labels = torch.zeros(8, dtype=torch.long)
    first = model.eval().validation_metrics(x, labels)["bpd"]
    model.train()
    optimizers = make_optimizers(model, lr=3e-3, grad_clip=1.0)
    for _ in range(60):
        model.train_step(x, labels, optimizers)
    assert model.timestep_sampler.counts.sum() > 0
    after = model.eval().validation_metrics(x, labels)["bpd"]
    assert math.isfinite(first) and 0 < after < first
