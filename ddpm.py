"""Denoising diffusion (Ho et al. 2020, "Denoising Diffusion Probabilistic Models") with DDIM (Song et al. 2021,
"Denoising Diffusion Implicit Models") and DPM-Solver++ (Lu et al. 2022) sampling, EMA weights, conditions with
classifier-free guidance (Ho & Salimans 2021), and improved DDPM's learned variance and loss-aware sampling of t
(Nichol & Dhariwal 2021) as options; validation reports the variational bound in bits per dimension.

Forward process: q(x_t|x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I), ab_t = prod_{s<=t} (1 - b_s), images scaled
to [-1, 1]. unet.UNet eps_theta(x_t, t, y) learns the added noise (Algorithm 1); sampling walks back from
x_T ~ N(0, I) with one of samplers.py's algorithms. Time steps are 0-based in the code: index t = 0 .. T-1 is
the paper's t = 1 .. T.

    python train_script.py --model diffusion --data ./flowers > log/train_diffusion.out
    python random_generation.py --model diffusion                       # EMA weights, DDIM 50 steps
    python random_generation.py --model diffusion --sampler dpmpp --steps 20
    python random_generation.py --model diffusion --sampler ddpm        # ancestral, all T steps
    python random_generation.py --model diffusion --class-label calendula --guidance 3
    python visualization.py --model diffusion                           # vis/denoising_diffusion.png
"""
import math
from dataclasses import dataclass

import torch

import iddpm
import samplers
from common import UserError, option
from contract import GenerativeModel
from unet import (UNet, UNetConfig, as_condition, check_size, condition_for, drop_condition, guidance_at, guided,
                  sampling_condition)

TRAIN_DEFAULTS = dict(epochs=35, lr=6e-4, batch_size=32, lr_decay=0.5, lr_decay_every=15, patience=10, flip=True,
                      grad_clip=1.0)
# The default number of network evaluations of each sampler (None: all T steps).
DEFAULT_STEPS = {"ddim": 50, "dpmpp": 20, "ddpm": None}
# DDIM's default noise: eta = 1, fresh noise in each step, which corrects the errors of earlier steps (Karras et al.
# 2022, Sec. 4); eta = 0 is the deterministic sampler. docs/results.md compares the two.
DDIM_ETA = 1.0
HYBRID_LAMBDA = 0.001   # L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, Sec. 3.1)
BPD_IMAGES, BPD_STEPS = 64, 20   # val_bpd: on this many validation images, at this many fixed steps (see bpd)


@dataclass
class Config(UNetConfig):   # the U-Net's flags, and these
    timesteps: int = option(1000, "T, the number of diffusion steps", low=2)
    schedule: str = option("linear", "noise schedule: linear (Ho et al. 2020), cosine (Nichol & Dhariwal 2021) "
                                     "or sigmoid (sigmoid(linspace(-6, 6, T)) spanning the linear schedule's range)",
                           choices=("linear", "cosine", "sigmoid"))
    ema_decay: float = option(0.999, "EMA decay of the weights used for sampling and validation", low=0, high=1)
    clip_x0: bool = option(True, "clip the predicted x_0 to [-1, 1] in each sampling step, as DDPM's code does")
    unconditional: bool = option(False, "ignore the data's conditions (classes, labels or layouts)")
    label_dropout: float = option(0.1, "probability of the null condition in training (classifier-free guidance)",
                                  low=0, high=1)
    v_prediction: bool = option(False, "predict v = sqrt(ab) eps - sqrt(1-ab) x_0 (Salimans & Ho 2022)")
    learn_sigma: bool = option(False, "also learn the variance, Sigma = exp(v log b_t + (1 - v) log b~_t), with the "
                                      "hybrid loss L_simple + 0.001 L_vlb (Nichol & Dhariwal 2021)")
    timestep_sampler: str = option("uniform", "how training draws t: uniform, or loss-aware importance sampling "
                                              "(Nichol & Dhariwal 2021)", choices=("uniform", "loss-aware"))
    min_snr_gamma: float = option(5.0, "weight the loss by min(SNR, gamma)/SNR (Hang et al. 2023); 0: off, the plain "
                                       "eps-MSE of Ho et al. (docs/results.md compares them)", low=0)


def beta_schedule(name, T):
    """b_1 .. b_T in float64, at most 0.999 (so ab_t > 0). Linear and sigmoid are scaled by 1000/T
    (Nichol & Dhariwal), so ab_T ~ 0 for any T."""
    scale = 1000 / T
    if name == "linear":      # b from 1e-4 to 0.02 at T = 1000
        b = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    elif name == "sigmoid":   # sigmoid(linspace(-6, 6, T)), spanning DDPM's range of b
        b = scale * (1e-4 + (0.02 - 1e-4) * torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)))
    elif name == "cosine":    # ab(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
        b = 1 - f[1:] / f[:-1]
    else:
        raise UserError(f"unknown --schedule {name}; choose linear, cosine or sigmoid")
    return b.clamp(max=0.999)


class Model(GenerativeModel):
    denoises = True
    sample_options = ("sampler", "steps", "eta", "guidance", "guidance_interval")

    def __init__(self, config, image_shape, num_classes=1, condition="class"):
        super().__init__(config, image_shape)
        check_size(config, *self.image_shape[1:])
        # num_classes: the classes, or the label names of multi-hot labels and layouts
        self.num_classes, self.condition = condition_for(condition, num_classes, config.unconditional)
        channels = self.image_shape[0]
        # channels_last (N, H, W, C in memory): the layout oneDNN's CPU convolutions run fastest in
        out_channels = 2 * channels if config.learn_sigma else channels   # eps, and v of the learned variance
        self.unet = UNet(config, channels, out_channels, self.num_classes, condition).to(
            memory_format=torch.channels_last)
        self.init_ema("unet", config.ema_decay)   # sampling and validation use these weights
        if config.timestep_sampler == "loss-aware":
            self.timestep_sampler = iddpm.LossAwareSampler(config.timesteps)

        b = beta_schedule(config.schedule, config.timesteps)
        ab = torch.cumprod(1 - b, dim=0)                                        # ab_t = prod_{s<=t} (1 - b_s)
        ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])           # ab_{t-1}, ab_0 = 1
        schedule = {
            "betas": b,
            "alphas_bar": ab,
            "sqrt_ab": ab.sqrt(),                                                # mean of q(x_t|x_0) is sqrt(ab_t) x_0
            "sqrt_1m_ab": (1 - ab).sqrt(),                                       # its std is sqrt(1 - ab_t)
            "posterior_var": b * (1 - ab_prev) / (1 - ab),                       # b~_t = (1-ab_{t-1}) / (1-ab_t) b_t
            "posterior_c0": b * ab_prev.sqrt() / (1 - ab),                       # mu~_t = c0 x_0 + ct x_t
            "posterior_ct": (1 - b).sqrt() * (1 - ab_prev) / (1 - ab),
            "snr": ab / (1 - ab),                                                # SNR(t) = ab_t / (1 - ab_t)
            "log_betas": b.log(),
            # log b~_t with b~_0 = 0 replaced by b~_1, as improved DDPM's code does: the range of Sigma at t = 0
            "log_posterior_var": torch.cat([b[1:2] * (1 - ab[:1]) / (1 - ab[1:2]), b[1:] * (1 - ab[:-1]) / (1 - ab[1:])
                                            ]).log(),
        }
        for name, value in schedule.items():
            self.register_buffer(name, value.float(), persistent=False)

    def parameter_groups(self):
        return {"model": self.unet}   # the EMA copy is not optimised

    @staticmethod
    def _at(values, t):
        return values[t][:, None, None, None]                                    # (B,) -> (B, 1, 1, 1)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, a draw of q(x_t|x_0)."""
        return self._at(self.sqrt_ab, t) * x0 + self._at(self.sqrt_1m_ab, t) * noise

    def q_posterior(self, x0, xt, t):
        """q(x_{t-1}|x_t, x_0) = N(mu~_t, b~_t I), returned as (mu~_t, b~_t), with
        mu~_t = sqrt(ab_{t-1}) b_t / (1 - ab_t) x_0 + sqrt(a_t) (1 - ab_{t-1}) / (1 - ab_t) x_t."""
        mean = self._at(self.posterior_c0, t) * x0 + self._at(self.posterior_ct, t) * xt
        return mean, self._at(self.posterior_var, t)

    def loss(self, x, y=None, generator=None):
        """Algorithm 1: t ~ U{1..T}, eps ~ N(0, I), || eps - eps_theta(sqrt(ab_t) x_0 + sqrt(1-ab_t) eps, t) ||^2.

        With `generator` (validation), t, eps and dropped labels come from it: the same at every validation."""
        return self.loss_x0(x * 2 - 1, y, generator)                            # [0, 1] -> [-1, 1]

    def loss_x0(self, x0, y=None, generator=None):
        """The loss of `loss` for x_0 already in diffusion space (pixels in [-1, 1], or latents); with learn_sigma
        plus lambda T L_t (L_vlb = sum_t L_t, estimated at one t), and with the loss-aware sampler each image's loss
        weighted by 1 / (T p_t). Validation draws t uniformly, so its numbers compare across runs."""
        importance = self.training and self.config.timestep_sampler == "loss-aware"
        if importance:
            t, weights = self.timestep_sampler.sample(len(x0), generator)
        else:
            t = torch.randint(0, self.config.timesteps, (len(x0),), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        labels = None
        if self.conditional:
            labels = drop_condition(as_condition(y, self.condition), self.condition, self.num_classes,
                                    self.config.label_dropout, generator)
        xt = self.q_sample(x0, t, noise)
        out = (self.unet if self.training else self.ema)(xt, t, labels)
        terms = {}
        if self.config.learn_sigma:
            out, v = out.chunk(2, dim=1)
            # L_vlb trains the variance only: the mean's gradient is stopped (Nichol & Dhariwal 2021, Sec. 3.1)
            terms["vb"] = self.vlb_terms(x0, xt, t, out.detach(), v)
        if self.config.v_prediction:   # v = sqrt(ab_t) eps - sqrt(1-ab_t) x_0
            target = self._at(self.sqrt_ab, t) * noise - self._at(self.sqrt_1m_ab, t) * x0
        else:
            target = noise
        per_image = (out - target).pow(2).mean(dim=(1, 2, 3))
        if self.config.min_snr_gamma > 0:   # min(SNR, gamma)/SNR for eps, min(SNR, gamma)/(SNR + 1) for v
            snr = self.snr[t]
            per_image = per_image * snr.clamp(max=self.config.min_snr_gamma) / (snr + self.config.v_prediction)
        if self.config.learn_sigma:
            per_image = per_image + HYBRID_LAMBDA * self.config.timesteps * terms["vb"]
        if importance:
            self.timestep_sampler.record(t, per_image.detach())
            per_image = per_image * weights
        return {"loss": per_image.mean(), **{k: v.mean() for k, v in terms.items()}}

    def vlb_terms(self, x0, xt, t, out, v=None):
        """L_{t-1} per image in bits per dimension, for p(x_{t-1}|x_t) = N(mu~(x_t, x0_hat), Sigma): Sigma learned
        from v, else b~_t."""
        x0_hat = self.predict(xt, t, out, clip=False)[0]
        mean, _ = self.q_posterior(x0_hat, xt, t)
        true_mean, _ = self.q_posterior(x0, xt, t)
        fixed = self._at(self.log_posterior_var, t)
        log_var = fixed if v is None else iddpm.learned_log_variance((v + 1) / 2, self._at(self.log_betas, t), fixed)
        return iddpm.vlb_term(x0, xt, t, true_mean, fixed, mean, log_var)

    def validation_metrics(self, images, labels):
        """val_bpd: the variational bound in bits per dimension of the first BPD_IMAGES validation images, with
        BPD_STEPS fixed steps (iddpm.bits_per_dim)."""
        y = as_condition(labels[:BPD_IMAGES], self.condition) if self.conditional else None
        return {"bpd": iddpm.bits_per_dim(self, images[:BPD_IMAGES] * 2 - 1, y, BPD_STEPS)}

    def predict(self, xt, t, out, clip=True):
        """(x0_hat, eps_hat, v) from the network's output; x0_hat clipped to [-1, 1] with clip_x0 (and `clip`), and
        eps_hat consistent with it. v is the learned variance's interpolation in [0, 1] (None: the variance is
        fixed)."""
        v = None
        if out.shape[1] != xt.shape[1]:   # learn_sigma: eps (or v-prediction) and the variance's v in [-1, 1]
            out, v = out.chunk(2, dim=1)
            v = (v + 1) / 2
        sa, s1a = self._at(self.sqrt_ab, t), self._at(self.sqrt_1m_ab, t)
        if self.config.v_prediction:
            x0 = sa * xt - s1a * out                                             # x_0 = sqrt(ab) x_t - sqrt(1-ab) v
        else:
            x0 = (xt - s1a * out) / sa                                           # (x_t - sqrt(1-ab) eps) / sqrt(ab)
        if self.config.clip_x0 and clip:
            x0 = x0.clamp(-1, 1)
        return x0, (xt - sa * x0) / s1a, v

    def denoiser(self, y, guidance, interval=None):
        """denoise(x_t, t) -> (x0_hat, eps_hat, v) for samplers.py: EMA weights in eval mode, guidance w at the
        noise levels sigma = sqrt((1 - ab_t) / ab_t) in `interval` (all without one)."""
        net = self.unet if self.training else self.ema
        # sigma_t for every step, read once and only for an interval: no host sync per step otherwise
        sigmas = ((1 - self.alphas_bar) / self.alphas_bar).sqrt().tolist() if interval is not None else None

        def denoise(xt, t):
            w = guidance if sigmas is None else guidance_at(sigmas[int(t[0])], guidance, interval)
            return self.predict(xt, t, guided(net, xt, t, y, w))
        return denoise

    def to_images(self, x):
        """Diffusion space to images in [0, 1]: [-1, 1] -> [0, 1]."""
        return ((x + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def denoising_process(self, n, generator=None, frames=10, labels=None, sampler="ddim", steps=None, eta=DDIM_ETA,
                          guidance=1.0, guidance_interval=None):
        """Sample n images; returns (frames, n, C, H, W) in [0, 1]: x_T, ..., x_0, evenly spaced in the steps.

        sampler: 'ddim' (steps evenly spaced, noise eta: 0 deterministic given x_T, 1 DDPM-like), 'dpmpp'
        (DPM-Solver++(2M), time-uniform steps) or 'ddpm' (ancestral; all T steps unless `steps`). steps: network
        evaluations, default DEFAULT_STEPS. labels: image i is drawn for the condition labels[i] (default: class
        i mod K, or the null condition for labels and layouts); guidance: classifier-free guidance's w (1: the
        conditional model alone), at the noise levels sigma = sqrt((1 - ab_t) / ab_t) in guidance_interval =
        (lo, hi] (all without one)."""
        if sampler not in DEFAULT_STEPS:
            raise UserError(f"unknown sampler '{sampler}'; choose {', '.join(DEFAULT_STEPS)}")
        T = self.config.timesteps
        steps = steps or DEFAULT_STEPS[sampler] or T
        if steps < 1:
            raise UserError(f"--steps must be at least 1, got {steps}")
        self.check_sampling(labels, guidance, guidance_interval)
        device = self.alphas_bar.device
        x = torch.randn(n, *self.image_shape, generator=generator, device=device)   # x_T ~ N(0, I)
        y = sampling_condition(labels, n, self.condition, self.num_classes, self.image_shape[1:], device)
        denoise = self.denoiser(y, guidance, guidance_interval)
        if sampler == "dpmpp":
            ts = samplers.time_uniform(T, min(steps, T))
            states = samplers.dpm_solver_pp_2m(denoise, x, self.alphas_bar, ts)
        else:
            ts = samplers.spaced(T, steps)
            states = (samplers.ddim(denoise, x, self.alphas_bar, ts, eta, generator) if sampler == "ddim" else
                      samplers.ddpm(denoise, x, self.alphas_bar, ts, generator))
        return self.to_images(samplers.keep_frames(x, states, len(ts) - 1, frames))

    def sample(self, n, generator=None, labels=None, **options):
        """n images x_0 in [0, 1] (see denoising_process), with the EMA weights in eval mode."""
        return self.denoising_process(n, generator, 1, labels, **options)[-1]
