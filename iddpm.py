"""The pieces of improved DDPM (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models")
that ddpm.py uses with --learn-sigma and --timestep-sampler loss-aware, and the variational bound in bits per
dimension that validation reports (Ho et al. 2020, Sec. 3.3 and eq. 5):

    L_vlb = L_0 + L_1 + ... + L_{T-1} + L_T,   L_T = KL(q(x_T|x_0) || N(0, I)),
    L_{t-1} = KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t))  (Gaussians),   L_0 = -log p(x_0|x_1)  (discretised),

each in nats, divided by log 2 and the number of dimensions for bits per dimension.
"""
import math

import torch
import torch.nn as nn

LOSS_HISTORY = 10        # losses kept per step t by the loss-aware sampler
UNIFORM_SHARE = 0.001    # of the sampling probability spread uniformly over t, so no step is starved


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats:
    0.5 (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1)."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def standard_normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) of pixels x in [-1, 1] (256 levels, bins of width 2/255) under N(mean, e^(2 log_scale)), each bin
    [x - 1/255, x + 1/255] integrated, the end bins open to -inf and +inf (Ho et al. 2020, eq. 13). Elementwise."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = standard_normal_cdf(inv_std * (x - mean + 1 / 255))
    cdf_minus = standard_normal_cdf(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_minus = (1 - cdf_minus).clamp(min=1e-12).log()
    log_bin = (cdf_plus - cdf_minus).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_bin))


def learned_log_variance(v, log_beta, log_posterior_var):
    """Sigma_theta = exp(v log b_t + (1 - v) log b~_t), v in [0, 1] from the network's extra output."""
    return v * log_beta + (1 - v) * log_posterior_var


def vlb_term(x0, xt, t, true_mean, true_log_var, mean, log_var):
    """L_{t-1} per image in bits per dimension: the Gaussian KL for t > 0 (index), -log p(x_0|x_1) for t = 0."""
    kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1)
    return torch.where(t == 0, nll, kl) / math.log(2)


def prior_bpd(x0, sqrt_ab_T, ab_T):
    """L_T in bits per dimension: KL(N(sqrt(ab_T) x_0, (1 - ab_T) I) || N(0, I)), per image."""
    zeros = torch.zeros_like(x0)
    kl = normal_kl(sqrt_ab_T * x0, torch.full_like(x0, math.log(1 - ab_T)), zeros, zeros)
    return kl.flatten(1).mean(1) / math.log(2)


@torch.no_grad()
def bits_per_dim(model, x0, y, steps):
    """L_T + L_0 + (T - 1)/steps sum_k L_{t_k} in bits per dimension, averaged over the images x_0 (in [-1, 1]):
    the sum over `steps` fixed, evenly spaced t_k of 1 .. T-1 with fixed noise, so the estimate of L_vlb
    compares across epochs and across runs of the same T. `model` is a ddpm.Model; its EMA weights are used."""
    T = model.config.timesteps
    generator = torch.Generator(x0.device).manual_seed(0)
    total = prior_bpd(x0, model.sqrt_ab[-1], model.alphas_bar[-1].item())
    for step, scale in [(0, 1.0)] + [(round(1 + k * (T - 2) / max(steps - 1, 1)), (T - 1) / steps)
                                     for k in range(steps)]:
        t = torch.full((len(x0),), step, device=x0.device)
        xt = model.q_sample(x0, t, torch.randn(x0.shape, generator=generator, device=x0.device))
        out = model.ema(xt, t, y)
        eps_out, v = out.chunk(2, dim=1) if model.config.learn_sigma else (out, None)
        total = total + scale * model.vlb_terms(x0, xt, t, eps_out, v)
    return total.mean().item()


class LossAwareSampler(nn.Module):
    """Importance sampling of t (Nichol & Dhariwal 2021, Sec. 3.3): p_t proportional to sqrt(E[L_t^2]) over the
    last LOSS_HISTORY losses at each t, uniform until every t has them; each loss is weighted by 1 / (T p_t), so
    E_{t ~ p}[L_t / (T p_t)] = (1/T) sum_t L_t, the uniform objective. Its history is in the checkpoint."""

    def __init__(self, timesteps):
        super().__init__()
        self.register_buffer("history", torch.zeros(timesteps, LOSS_HISTORY))
        self.register_buffer("counts", torch.zeros(timesteps, dtype=torch.long))

    def probabilities(self):
        T = len(self.counts)
        if (self.counts < LOSS_HISTORY).any():
            return torch.full((T,), 1 / T, device=self.counts.device)
        weights = self.history.pow(2).mean(1).sqrt()
        return weights / weights.sum() * (1 - UNIFORM_SHARE) + UNIFORM_SHARE / T

    def sample(self, n, generator=None):
        """(t (n,), weights 1 / (T p_t) (n,))."""
        p = self.probabilities()
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        return t, 1 / (len(p) * p[t])

    @torch.no_grad()
    def record(self, t, losses):
        """Keep each step's last LOSS_HISTORY losses (oldest out first)."""
        for step, loss in zip(t.tolist(), losses.tolist()):
            if self.counts[step] == LOSS_HISTORY:
                self.history[step] = torch.roll(self.history[step], -1)
                self.history[step, -1] = loss
            else:
                self.history[step, self.counts[step]] = loss
                self.counts[step] += 1
