"""Diffusion (ddpm.py): closed forms against independent computations, the samplers, guidance, EMA, CLI."""
import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import common
import ddpm
import registry
import samplers
import train_script
from common import UserError
from conftest import GuidanceSpy, make_optimizers, run_script, write_image_folder
from unet import GroupNorm32, attention, guided

TINY = dict(width=8, channel_mults=(1, 2), blocks_per_level=1, attention_levels=(1,))


def build(image_shape=(3, 8, 8), num_classes=1, **config):
    torch.manual_seed(0)
    return ddpm.Model(ddpm.Config(**{**TINY, **config}), image_shape, num_classes)


def randomize(model, scale=0.05):
    """Non-zero weights everywhere (the zero-initialised last convolutions would make eps_theta = 0)."""
    with torch.no_grad():
        for p in list(model.unet.parameters()) + list(model.ema.parameters()):
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def test_linear_schedule_is_ddpms_and_q_sample_has_the_closed_form_moments():
    model = build(timesteps=1000)
    betas = np.linspace(1e-4, 0.02, 1000)                               # Ho et al. 2020, Sec. 4
    alpha_bar = np.cumprod(1 - betas)
    assert np.allclose(model.alphas_bar.numpy(), alpha_bar, rtol=1e-5)
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    for t in (0, 250, 999):
        noise = torch.randn(20000, 3, 8, 8, generator=torch.Generator().manual_seed(t))
        xt = model.q_sample(x0.expand(20000, -1, -1, -1), torch.full((20000,), t), noise)
        assert torch.allclose(xt.mean(0), math.sqrt(alpha_bar[t]) * x0[0], atol=0.04)   # 5 standard errors
        assert abs(xt.var(0).mean().item() - (1 - alpha_bar[t])) < 0.01                 # pooled over pixels


def test_posterior_matches_bayes_rule_for_two_gaussians():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): multiply the two Gaussians in float64."""
    model = build(timesteps=100, schedule="cosine")
    betas = model.betas.double()
    alpha_bar = torch.cumprod(1 - betas, 0)
    x0, xt = torch.randn(4, 3, 8, 8).double(), torch.randn(4, 3, 8, 8).double()
    for t in (1, 10, 50, 99):
        ab_prev = alpha_bar[t - 1]
        precision = 1 / (1 - ab_prev) + (1 - betas[t]) / betas[t]       # prior precision + likelihood precision
        mean = (ab_prev.sqrt() * x0 / (1 - ab_prev) + (1 - betas[t]).sqrt() * xt / betas[t]) / precision
        got_mean, got_var = model.q_posterior(x0.float(), xt.float(), torch.full((4,), t))
        assert torch.allclose(got_mean.double(), mean, atol=1e-4)
        assert torch.allclose(got_var.flatten().double(), (1 / precision).expand(4), rtol=1e-4)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("timesteps", [1000, 50])
def test_alpha_bar_falls_monotonically_to_about_zero(schedule, timesteps):
    alpha_bar = build(timesteps=timesteps, schedule=schedule).alphas_bar
    assert torch.all(alpha_bar[1:] < alpha_bar[:-1]) and alpha_bar[0] > 0.9
    assert alpha_bar[-1] < 1e-3


def test_ddim_with_eta_zero_is_deterministic_given_x_T():
    model = randomize(build(timesteps=40))
    x_T = torch.randn(4, 3, 8, 8)
    ts = list(range(39, -1, -4)) + [-1]
    runs = []
    for seed in (1, 2):   # different generators: with eta = 0 they must not matter
        *_, x = samplers.ddim(model.denoiser(None, 1.0), x_T, model.alphas_bar, ts, 0.0,
                              torch.Generator().manual_seed(seed))
        runs.append(x)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], x_T)
    a = model.sample(3, torch.Generator().manual_seed(5), steps=10, eta=0.0)
    assert torch.equal(a, model.sample(3, torch.Generator().manual_seed(5), steps=10, eta=0.0))


@pytest.mark.parametrize("clip_x0", [True, False])
def test_ddim_on_all_steps_with_eta_one_is_the_ddpm_update(clip_x0):
    model = randomize(build(timesteps=30, clip_x0=clip_x0), scale=0.2)
    denoise = model.denoiser(None, 1.0)
    x = torch.randn(4, 3, 8, 8)
    for t in (29, 15, 1, 0):
        ddpm_x = next(samplers.ddpm(denoise, x, model.alphas_bar, [t, t - 1], torch.Generator().manual_seed(t)))
        ddim_x = next(samplers.ddim(denoise, x, model.alphas_bar, [t, t - 1], 1.0, torch.Generator().manual_seed(t)))
        assert torch.allclose(ddpm_x, ddim_x, atol=1e-5), t
        # and Algorithm 2 itself: the posterior mean of the predicted x_0 plus sqrt(b~_t) z
        x0, _, _ = denoise(x, torch.full((4,), t))
        mean, var = model.q_posterior(x0, x, torch.full((4,), t))
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        assert torch.allclose(ddpm_x, mean + (var.sqrt() * z if t > 0 else 0), atol=1e-5), t
    if clip_x0:   # whole chains too (unclipped, this random network's chains amplify float rounding)
        ddpm_samples = model.sample(2, torch.Generator().manual_seed(0), sampler="ddpm")
        ddim_samples = model.sample(2, torch.Generator().manual_seed(0), steps=30, eta=1.0)
        assert torch.allclose(ddpm_samples, ddim_samples, atol=1e-4)


@pytest.mark.parametrize("options, factor", [({}, 0.25), ({"v_prediction": True}, 0.65)])
def test_a_tiny_model_overfits_one_batch(options, factor):
    model = build(timesteps=100, **options)
    x = torch.rand(8, 3, 8, 8) * 0.5 + 0.25 * (torch.arange(8) % 2).view(8, 1, 1, 1)
    optimizers = make_optimizers(model, lr=3e-3, grad_clip=1.0)

    def fixed_loss():
        with torch.no_grad():
            return model.train().loss(x, generator=torch.Generator().manual_seed(0))["loss"].item()

    first = fixed_loss()
    for _ in range(150):
        model.train_step(x, None, optimizers)
    assert fixed_loss() < factor * first   # v's target at large t is about x_0: slower for a tiny net


@pytest.mark.parametrize("v_prediction", [False, True])
def test_min_snr_weighting_is_min_snr_gamma_over_snr(v_prediction):
    """Hang et al. 2023: w_t = min(SNR_t, gamma) / SNR_t for eps, / (SNR_t + 1) for v; same t and noise."""
    plain = build(timesteps=100, v_prediction=v_prediction, min_snr_gamma=0.0)
    weighted = build(timesteps=100, v_prediction=v_prediction, min_snr_gamma=5.0)
    x = torch.rand(6, 3, 8, 8)
    per_image = []
    for i in range(6):   # one image at a time gives the per-image mse of the unweighted loss
        g = torch.Generator().manual_seed(i)
        per_image.append(plain.loss(x[i:i + 1], generator=g)["loss"])
    t = torch.stack([torch.randint(0, 100, (1,), generator=torch.Generator().manual_seed(i)) for i in range(6)])[:, 0]
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-3, 0.2, 100, dtype=torch.float64), 0)[t]
    snr = alpha_bar / (1 - alpha_bar)
    w = snr.clamp(max=5) / (snr + 1 if v_prediction else snr)
    expected = (torch.stack(per_image).double() * w).mean()
    got = torch.stack([weighted.loss(x[i:i + 1], generator=torch.Generator().manual_seed(i))["loss"]
                       for i in range(6)]).double().mean()
    assert torch.allclose(got, expected, rtol=1e-4)


def test_guidance_zero_is_the_unconditional_prediction_and_one_the_conditional():
    model = randomize(build(num_classes=3, timesteps=20))
    x, t, y = torch.randn(5, 3, 8, 8), torch.randint(0, 20, (5,)), torch.tensor([0, 1, 2, 0, 1])
    null = torch.full((5,), 3)
    with torch.no_grad():
        assert torch.allclose(guided(model.ema, x, t, y, 0.0), model.ema(x, t, null), atol=1e-5)
        assert torch.allclose(guided(model.ema, x, t, y, 1.0), model.ema(x, t, y), atol=1e-5)
        cond, uncond = model.ema(x, t, y), model.ema(x, t, null)
        assert torch.allclose(guided(model.ema, x, t, y, 3.0), uncond + 3 * (cond - uncond), atol=1e-4)
    assert not build(num_classes=3, unconditional=True).conditional and not build(num_classes=1).conditional
    with pytest.raises(UserError, match="unconditional"):
        build(num_classes=1).sample(2, labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(UserError, match="--guidance needs a conditional model"):
        build(num_classes=1).sample(2, guidance=3.0)


def test_guidance_interval_is_in_sigma_sqrt_of_one_minus_ab_over_ab():
    model = build(num_classes=3, timesteps=20).eval()
    calls = []
    model.ema = GuidanceSpy(model.ema, calls)
    sigma = lambda t: math.sqrt((1 - float(model.alphas_bar[t])) / float(model.alphas_bar[t]))
    assert samplers.spaced(20, 4) == [19, 13, 6, 0, -1]                       # DDIM's 4 evaluations
    # an interval within 1% of sigma_13 (another noise level, e.g. sqrt(1 - ab) or ab / (1 - ab), falls outside)
    model.sample(2, labels=torch.tensor([0, 1]), steps=4, guidance=2.0,
                 guidance_interval=(0.99 * sigma(13), 1.01 * sigma(13)))
    assert calls == [(19, 2), (13, 4), (6, 2), (0, 2)]


def test_attention_is_softmax_of_scaled_scores_times_values_by_hand_masked_or_not():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64), \
        torch.randn(2, 3, 4, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [False, False, True]])[:, None, :]   # (2, 1, 3): keys each image sees
    for m in (None, mask):
        out = attention(q, k, v, m)
        for b in range(2):
            keep = [True] * 3 if m is None else mask[b, 0].tolist()
            for i in range(5):
                scores = [float(q[b, i] @ k[b, j]) / 2 for j in range(3)]   # q . k / sqrt(C), C = 4
                e = [math.exp(score) if keep[j] else 0.0 for j, score in enumerate(scores)]
                expected = sum(e[j] / sum(e) * v[b, j] for j in range(3))
                assert torch.allclose(out[b, i], expected, atol=1e-12)
        # and the fused kernel that other devices use agrees with it
        assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m), atol=1e-12)
    with torch.autocast("cpu", torch.bfloat16):
        low = attention(q.float(), k.float(), v.float(), mask)
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), attention(q, k, v, mask).float(), atol=0.05)


def test_group_norm_32_is_group_norm_in_float32_cast_back_to_the_input_dtype():
    torch.manual_seed(0)
    norm = GroupNorm32(2, 4)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(3, 4, 5, 5).to(memory_format=torch.channels_last) * 10 + 3
    # by hand: each image's group of 2 channels standardised by its own mean and (biased) variance, then affine
    g = x.reshape(3, 2, 2 * 25)
    standard = ((g - g.mean(2, keepdim=True)) / (g.var(2, unbiased=False, keepdim=True) + 1e-5).sqrt()).reshape(x.shape)
    expected = standard * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
    assert torch.allclose(norm(x), expected, atol=1e-5)
    low = x.bfloat16()
    out = norm(low)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.nn.functional.group_norm(low.float(), 2, norm.weight, norm.bias).bfloat16())


@pytest.mark.parametrize("image_shape", [(1, 28, 28), (3, 24, 24), (3, 32, 32), (3, 64, 64)])
def test_shapes_and_range_for_one_or_three_channels(image_shape):
    model = build(image_shape, num_classes=2, width=8, channel_mults=(1, 2, 2), attention_levels=(2,)).eval()
    frames = model.denoising_process(2, torch.Generator().manual_seed(0), frames=4, steps=3)
    assert frames.shape == (4, 2, *image_shape) and frames.min() >= 0 and frames.max() <= 1
    assert model.loss(torch.rand(2, *image_shape), torch.tensor([0, 1]))["loss"].ndim == 0
    with pytest.raises(UserError, match="divisible by 4"):
        build((3, 26, 26), channel_mults=(1, 2, 2))


def test_ema_follows_the_weights_with_warm_up():
    model = build()
    optimizers = make_optimizers(model, lr=1e-2)
    assert all(not p.requires_grad for p in model.ema.parameters())
    model.train_step(torch.rand(4, 3, 8, 8), None, optimizers)   # first update: decay 1/10
    for online, ema in zip(model.unet.parameters(), model.ema.parameters()):
        assert torch.allclose(ema, online, atol=1e-2)
    assert model.ema_updates.item() == 1


def test_checkpoint_round_trip_keeps_both_weights_and_the_ema_count(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=12, size=10, classes=("a", "b"))
    argv = ["--model", "diffusion", "--data", str(data), "--image-size", "8", "--batch-size", "8", "--epochs", "2",
            "--timesteps", "20", "--width", "8", "--channel-mults", "1", "2", "--attention-levels", "1",
            "--models-dir", str(tmp_path / "models"), "--log-dir", str(tmp_path / "log")]
    model, _ = train_script.train(argv)
    rebuilt, ckpt = registry.load_model(tmp_path / "models" / "Last_diffusion.pth", "diffusion")
    assert rebuilt.conditional and ckpt["class_names"] == ["a", "b"]
    assert rebuilt.ema_updates.item() == 6   # 3 batches x 2 epochs
    for name, a in model.state_dict().items():
        assert torch.equal(a, rebuilt.state_dict()[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(rebuilt.unet.parameters(), rebuilt.ema.parameters()))


def test_cli_end_to_end_on_the_bundled_shapes(tmp_path, monkeypatch, capsys):
    flags = ["--image-size", "8", "--epochs", "1", "--batch-size", "64", "--timesteps", "50", "--width", "8",
             "--channel-mults", "1", "2", "--attention-levels", "1"]
    result = run_script("train_script.py", "--model", "diffusion", *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "val_loss" in result.stdout and (tmp_path / "models" / "Best_diffusion.pth").is_file()
    result = run_script("random_generation.py", "--model", "diffusion", "--n", "8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "vis" / "random_images_diffusion.png").is_file()
    import random_generation
    import visualization
    monkeypatch.chdir(tmp_path)   # the other runs in-process: the same code without a second start-up

    def run(script, *argv):
        monkeypatch.setattr("sys.argv", [script.__name__, *argv])
        with pytest.raises(SystemExit) if "rose" in argv else nullcontext():
            common.run_cli(script.main)

    run(random_generation, "--model", "diffusion", "--n", "4", "--sampler", "ddpm", "--class-label", "red_circle",
        "--guidance", "3", "--out", "vis/red.png")
    run(visualization, "--model", "diffusion")
    assert (tmp_path / "vis" / "red.png").is_file() and (tmp_path / "vis" / "denoising_diffusion.png").is_file()
    run(random_generation, "--model", "diffusion", "--class-label", "rose")
    assert "unknown --class-label 'rose'; the classes are: 0 red_circle, 1 red_square" in capsys.readouterr().err


def test_dpm_solver_pp_with_one_step_is_ddim():
    """First-order DPM-Solver++ is DDIM (Lu et al. 2022): x_s = sigma_s/sigma_t x_t - alpha_s (e^-h - 1) x0_hat."""
    model = randomize(build(timesteps=50, clip_x0=False), scale=0.2)
    denoise, x = model.denoiser(None, 1.0), torch.randn(4, 3, 8, 8)
    for ts in ([49, -1], [49, 0], [30, 12]):
        dpm = next(samplers.dpm_solver_pp_2m(denoise, x, model.alphas_bar, ts))
        ddim = next(samplers.ddim(denoise, x, model.alphas_bar, ts, 0.0))
        assert torch.allclose(dpm, ddim, atol=1e-5), ts
    assert torch.allclose(model.sample(2, torch.Generator().manual_seed(0), sampler="dpmpp", steps=1),
                          model.sample(2, torch.Generator().manual_seed(0), steps=1, eta=0.0), atol=1e-6)


def gaussian_denoiser(alphas_bar, mu, s):
    """The exact denoiser of x_0 ~ N(mu, s^2 I): E[x_0|x_t] = mu + s^2 sqrt(ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)."""
    def denoise(xt, t):
        ab = alphas_bar.double()[t].view(-1, 1)
        x0 = mu + s ** 2 * ab.sqrt() * (xt - ab.sqrt() * mu) / (ab * s ** 2 + 1 - ab)
        return x0, (xt - ab.sqrt() * x0) / (1 - ab).sqrt(), None
    return denoise


def test_dpm_solver_pp_converges_to_ddim_eta_zero_with_many_steps():
    """Both solve the same probability-flow ODE: with many steps they agree, and DPM-Solver++(2M), second order,
    is nearer the converged answer than DDIM, first order, at the same number of evaluations."""
    alphas_bar = build(timesteps=1000).alphas_bar.double()
    denoise = gaussian_denoiser(alphas_bar, 0.5, 0.2)
    x = torch.randn(2000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    *_, reference = samplers.ddim(denoise, x, alphas_bar, samplers.spaced(1000, 1000), 0.0)
    assert abs(reference.mean() - 0.5) < 0.01 and abs(reference.std() - 0.2) < 0.01   # the data's law
    *_, dpm_many = samplers.dpm_solver_pp_2m(denoise, x, alphas_bar, samplers.time_uniform(1000, 999))
    assert (dpm_many - reference).abs().max() < 5e-3
    grid = samplers.time_uniform(1000, 100)
    *_, dpm = samplers.dpm_solver_pp_2m(denoise, x, alphas_bar, grid)
    *_, ddim = samplers.ddim(denoise, x, alphas_bar, grid, 0.0)
    assert (dpm - reference).abs().mean() < 0.5 * (ddim - reference).abs().mean()


def test_dpm_solver_pp_steps_are_time_uniform_and_its_last_step_first_order():
    assert samplers.time_uniform(1000, 4) == [999, 749, 500, 250, -1]   # round(999 - i 999/4), then ab = 1
    model = randomize(build(timesteps=100, clip_x0=False), scale=0.2)
    calls = []
    real = model.denoiser(None, 1.0)
    denoise = lambda x, t: calls.append(int(t[0])) or real(x, t)   # noqa: E731
    x = torch.randn(2, 3, 8, 8)
    ts = samplers.time_uniform(100, 5)
    states = list(samplers.dpm_solver_pp_2m(denoise, x, model.alphas_bar, ts))
    assert len(states) == 5 and calls == ts[:-1]                         # one evaluation a step
    first_order_last = next(samplers.ddim(real, states[-2], model.alphas_bar, ts[-2:], 0.0))
    assert torch.allclose(states[-1], first_order_last, atol=1e-5)
