"""Samplers, one function per algorithm, as in k-diffusion; each yields the state after each step, so the caller
keeps the last (a sample) or several (a denoising picture, `keep_frames`).

Discrete-time diffusion (ddpm.py, latent_diffusion.py): `ddpm`, `ddim`, `dpm_solver_pp_2m` take
    denoise(x_t, t) -> (x0_hat, eps_hat, v)   the model's prediction at integer step t (B,), with v the learned
                                              variance interpolation of improved DDPM in [0, 1] (or None)
    x                                         x_T ~ N(0, I), (B, C, H, W)
    alphas_bar                                ab_t for t = 0 .. T-1 (the paper's t = 1 .. T)
    ts                                        the steps to visit, descending; the last entry is where it stops,
                                              -1 meaning ab = 1 (x_0 itself)
and make one network evaluation per step of `ts`.
Flow matching (flow_matching.py): `euler`, `heun` integrate dx/dt = velocity(x, t) over times `ts` from 1 (noise)
down to 0 (data).
"""
import sys

import torch
from tqdm import tqdm


def ab_at(alphas_bar, t):
    """ab_t, with ab = 1 for t = -1 (the clean data)."""
    return alphas_bar[t] if t >= 0 else torch.ones((), device=alphas_bar.device)


def spaced(T, steps, final=-1):
    """`steps` evenly spaced steps from T-1 down to 0 (the DDIM paper's tau), then `final`."""
    steps = max(1, min(steps, T))
    return [round(T - 1 - i * (T - 1) / max(steps - 1, 1)) for i in range(steps)] + [final]


def time_uniform(T, steps):
    """DPM-Solver's time-uniform steps for a discrete model, as diffusers spaces them ("linspace"): the first
    `steps` of steps + 1 evenly spaced points from T-1 down to 0, then -1 (ab = 1)."""
    return [round(T - 1 - i * (T - 1) / steps) for i in range(steps)] + [-1]


def _batch(t, x):
    return torch.full((len(x),), t, device=x.device, dtype=torch.long)


@torch.no_grad()
def ddpm(denoise, x, alphas_bar, ts, generator=None):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) on any sub-sequence (Nichol & Dhariwal 2021, Sec. 4):
    x_s ~ N(mu~(x_t, x0_hat), Sigma) with the respaced b = 1 - ab_t / ab_s and the posterior
        mu~ = sqrt(ab_s) b / (1 - ab_t) x0_hat + sqrt(1 - b) (1 - ab_s) / (1 - ab_t) x_t,
        b~ = (1 - ab_s) / (1 - ab_t) b,
    Sigma = b~ (fixed), or exp(v log b + (1 - v) log b~) with a learned v. No noise into s = -1 (ab = 1)."""
    for t, s in zip(ts[:-1], ts[1:]):
        x0, _, v = denoise(x, _batch(t, x))
        ab_t, ab_s = ab_at(alphas_bar, t), ab_at(alphas_bar, s)
        b = 1 - ab_t / ab_s
        x = ab_s.sqrt() * b / (1 - ab_t) * x0 + (1 - b).sqrt() * (1 - ab_s) / (1 - ab_t) * x
        if s >= 0:
            b_tilde = (1 - ab_s) / (1 - ab_t) * b
            log_var = b_tilde.log() if v is None else v * b.log() + (1 - v) * b_tilde.log()
            x = x + (0.5 * log_var).exp() * torch.randn(x.shape, generator=generator, device=x.device)
        yield x


@torch.no_grad()
def ddim(denoise, x, alphas_bar, ts, eta=1.0, generator=None):
    """Song et al. 2021, eq. 12: x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z, with
    sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s). eta = 0: deterministic given x_T; eta = 1 on
    every step: the DDPM sampler."""
    for t, s in zip(ts[:-1], ts[1:]):
        x0, eps, _ = denoise(x, _batch(t, x))
        ab_t, ab_s = ab_at(alphas_bar, t), ab_at(alphas_bar, s)
        sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).sqrt()
        x = ab_s.sqrt() * x0 + (1 - ab_s - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0 and s >= 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        yield x


@torch.no_grad()
def dpm_solver_pp_2m(denoise, x, alphas_bar, ts):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), the multistep second-order solver of the diffusion ODE
    in the data prediction D = x0_hat, with alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda = log(alpha / sigma):
        first order (DDIM):  x_s = (sigma_s / sigma_t) x_t - alpha_s (e^-h - 1) D_t,       h = lambda_s - lambda_t
        second order:        the same with D_t + (D_t - D_prev) / (2 r),                   r = h_prev / h
    The first step has no previous D and is first order; so is a step into ab = 1 (sigma = 0, where lambda is
    infinite and the update is x_s = D_t), as diffusers' DPMSolverMultistepScheduler takes its last step."""
    d_prev, h_prev = None, None
    for t, s in zip(ts[:-1], ts[1:]):
        d, _, _ = denoise(x, _batch(t, x))
        if s < 0:
            x = d
        else:
            ab_t, ab_s = ab_at(alphas_bar, t), ab_at(alphas_bar, s)
            h = 0.5 * (ab_s / (1 - ab_s)).log() - 0.5 * (ab_t / (1 - ab_t)).log()
            d_hat = d if d_prev is None else d + (d - d_prev) / (2 * h_prev / h)
            x = ((1 - ab_s) / (1 - ab_t)).sqrt() * x - ab_s.sqrt() * torch.expm1(-h) * d_hat
            d_prev, h_prev = d, h
        yield x


@torch.no_grad()
def euler(velocity, x, ts):
    """Euler's method: x_s = x_t + (s - t) v(x_t, t). One network evaluation a step."""
    for t, s in zip(ts[:-1], ts[1:]):
        x = x + (s - t) * velocity(x, t)
        yield x


@torch.no_grad()
def heun(velocity, x, ts):
    """Heun's second-order method (as EDM's Algorithm 1, Karras et al. 2022): an Euler step, then the average of
    the slopes at both ends. The velocity is defined at t = 0 too, so every step is corrected: 2 network
    evaluations a step."""
    for t, s in zip(ts[:-1], ts[1:]):
        d = velocity(x, t)
        x = x + (s - t) * (d + velocity(x + (s - t) * d, s)) / 2
        yield x


def keep_frames(x, states, steps, frames):
    """Run a sampler (states: an iterator of `steps` states after x) with a progress bar on stderr, keeping
    `frames` states evenly spaced from x to the last: (frames, B, ...)."""
    keep = {round(steps - i * steps / max(frames - 1, 1)) for i in range(frames)}   # in 0 .. steps
    kept = [x] if 0 in keep else []
    for i, x in enumerate(tqdm(states, total=steps, desc="sampling", unit="step", leave=False, file=sys.stderr,
                               disable=None), 1):
        if i in keep:
            kept.append(x)
    return torch.stack(kept)
