"""Flow matching (flow_matching.py) and the ODE samplers: the interpolant and its target, Euler and Heun on the
exact velocity field of a Gaussian, guidance, and a tiny model that learns."""
import math

import pytest
import torch

import flow_matching
import samplers
from common import UserError
from conftest import GuidanceSpy, make_optimizers
from unet import guidance_at, guided

TINY = dict(width=8, channel_mults=(1, 2), attention_levels=(1,))


def build(image_shape=(3, 8, 8), num_classes=1, **config):
    torch.manual_seed(0)
    return flow_matching.Model(flow_matching.Config(**{**TINY, **config}), image_shape, num_classes)


def test_the_loss_is_the_squared_error_to_eps_minus_x0_on_the_straight_line(monkeypatch):
    model = build(time_sampling="uniform").eval()
    seen = {}

    class Spy(torch.nn.Module):   # the network's input and its time, returning a known velocity
        def forward(self, x, t, y=None):
            seen["x"], seen["t"] = x, t
            return torch.full_like(x, 0.5)

    model.ema = Spy()
    x = torch.rand(4, 3, 8, 8)
    loss = model.loss(x, generator=torch.Generator().manual_seed(1))["loss"]
    g = torch.Generator().manual_seed(1)
    t, eps = torch.rand(4, generator=g), torch.randn(4, 3, 8, 8, generator=g)   # the same draws, in order
    x0 = 2 * x - 1
    expected_xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    assert torch.allclose(seen["x"], expected_xt) and torch.allclose(seen["t"], 1000 * t)
    assert torch.allclose(loss, (0.5 - (eps - x0)).pow(2).mean())


def test_logit_normal_times_have_the_logit_normal_law():
    model = build(logit_mean=0.5, logit_std=0.8)
    t = model.sample_times(200_000, torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert 0 < t.min() and t.max() < 1
    assert abs(logit.mean() - 0.5) < 0.01 and abs(logit.std() - 0.8) < 0.01


def gaussian_velocity(mu, s):
    """The exact velocity of x_t = (1 - t) x_0 + t eps for x_0 ~ N(mu, s^2): the marginal is N(m_t, sigma_t^2),
    m_t = (1 - t) mu, sigma_t^2 = (1 - t)^2 s^2 + t^2, and the flow x -> m_t + sigma_t (x - m_t') / sigma_t' keeps
    it, so v(x, t) = m_t' + sigma_t'/sigma_t (x - m_t) with ' = d/dt."""
    def velocity(x, t):
        m, sigma = (1 - t) * mu, math.sqrt((1 - t) ** 2 * s ** 2 + t ** 2)
        dsigma = (-(1 - t) * s ** 2 + t) / sigma
        return -mu + dsigma / sigma * (x - m)
    return velocity


@pytest.mark.parametrize("sampler", [samplers.euler, samplers.heun])
def test_the_samplers_move_standard_noise_to_the_target_gaussian(sampler):
    mu, s = 1.5, 0.3
    x1 = torch.randn(200_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    *_, x0 = sampler(gaussian_velocity(mu, s), x1, [1 - i / 100 for i in range(101)])
    assert abs(x0.mean() - mu) < 0.01 and abs(x0.std() - s) < 0.01


def test_heun_with_fewer_steps_is_closer_than_euler():
    mu, s = 1.5, 0.3
    x1 = torch.linspace(-2, 2, 9, dtype=torch.float64)
    exact = mu + s * x1   # the flow of a Gaussian is affine: x_1 = (x_0 - mu) / s
    steps = lambda n: [1 - i / n for i in range(n + 1)]   # noqa: E731
    *_, euler = samplers.euler(gaussian_velocity(mu, s), x1, steps(10))
    *_, heun = samplers.heun(gaussian_velocity(mu, s), x1, steps(5))    # 10 evaluations, as Euler's
    assert (heun - exact).abs().max() < 0.5 * (euler - exact).abs().max()


def test_a_tiny_model_overfits_one_batch_and_samples_in_range():
    model = build(num_classes=2)
    x = torch.rand(8, 3, 8, 8) * 0.5 + 0.25 * (torch.arange(8) % 2).view(8, 1, 1, 1)
    y = torch.arange(8) % 2
    optimizers = make_optimizers(model, lr=3e-3, grad_clip=1.0)

    def fixed_loss():
        with torch.no_grad():
            return model.train().loss(x, y, generator=torch.Generator().manual_seed(0))["loss"].item()

    first = fixed_loss()
    for _ in range(150):
        model.train_step(x, y, optimizers)
    assert fixed_loss() < 0.5 * first
    model.eval()
    frames = model.denoising_process(3, torch.Generator().manual_seed(0), frames=4, sampler="euler", steps=6)
    assert frames.shape == (4, 3, 3, 8, 8) and frames.min() >= 0 and frames.max() <= 1
    a = model.sample(2, torch.Generator().manual_seed(1), labels=torch.tensor([1, 1]), guidance=2.0)
    assert torch.equal(a, model.sample(2, torch.Generator().manual_seed(1), labels=torch.tensor([1, 1]),
                                       guidance=2.0))


def test_guidance_interval_guides_exactly_the_times_whose_noise_level_is_inside():
    assert [guidance_at(s, 3.0, (0.28, 5.42)) for s in (0.28, 0.29, 5.42, 5.5, math.inf)] == [1.0, 3.0, 3.0, 1.0, 1.0]
    assert guidance_at(math.inf, 3.0) == 3.0                   # no interval: every level
    model = build(num_classes=3).eval()
    calls = []
    model.ema = GuidanceSpy(model.ema, calls)
    # Euler, 4 steps: t = 1, 0.75, 0.5, 0.25, so sigma = t / (1 - t) = inf, 3, 1, 1/3
    for interval, guided_times in [(None, {1000, 750, 500, 250}), ((0.5, 3), {750, 500}), ((1, 3), {750}),
                                   ((0, math.inf), {1000, 750, 500, 250}), ((4, 9), set())]:
        calls.clear()
        model.sample(2, labels=torch.tensor([0, 1]), sampler="euler", steps=4, guidance=2.0,
                     guidance_interval=interval)
        assert calls == [(t, 4 if t in guided_times else 2) for t in (1000, 750, 500, 250)], interval
    with pytest.raises(UserError, match="pass --guidance W"):
        build(num_classes=3).sample(1, guidance_interval=(0.28, 5.42))
    with pytest.raises(UserError, match="0 <= LO < HI, got 5 1"):
        build(num_classes=3).sample(1, guidance=3.0, guidance_interval=(5.0, 1.0))


def test_guidance_and_bad_sampler_options():
    model = build(num_classes=3).eval()
    x, y, null = torch.randn(2, 3, 8, 8), torch.tensor([0, 2]), torch.tensor([3, 3])
    t = torch.full((2,), 400.0)
    with torch.no_grad():
        for p in model.ema.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        assert torch.allclose(guided(model.ema, x, t, y, 0.0), model.ema(x, t, null), atol=1e-5)
    with pytest.raises(UserError, match="unknown sampler 'ddim' for flow matching"):
        model.sample(1, sampler="ddim")
    with pytest.raises(UserError, match="--guidance needs a conditional model"):
        build(num_classes=1).sample(1, guidance=2.0)
