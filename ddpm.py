"""Denoising diffusion (Ho et al. 2020, "Denoising Diffusion Probabilistic Models") with DDIM sampling
(Song et al. 2021, "Denoising Diffusion Implicit Models"), EMA weights and class conditioning with
classifier-free guidance (Ho & Salimans 2021).

Forward process: q(x_t|x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I), ab_t = prod_{s<=t} (1 - b_s), images scaled
to [-1, 1]. A U-Net eps_theta(x_t, t, y) learns the added noise (Algorithm 1); sampling walks back from
x_T ~ N(0, I) with the ancestral sampler (Algorithm 2, T steps) or DDIM on a sub-sequence of steps.
Time steps are 0-based in the code: index t = 0 .. T-1 is the paper's t = 1 .. T.

    python train_script.py --model diffusion --data ./flowers > log/train_diffusion.out
    python random_generation.py --model diffusion                  # EMA weights, DDIM 50 steps
    python random_generation.py --model diffusion --sampler ddpm   # ancestral, T steps
    python random_generation.py --model diffusion --class-label calendula --guidance 3
    python visualization.py --model diffusion                      # vis/denoising_diffusion.png
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, option

TRAIN_DEFAULTS = dict(epochs=35, lr=6e-4, batch_size=32, lr_decay=0.5, lr_decay_every=15, patience=10, flip=True)
# DDIM's default noise eta: 1, fresh noise in each step, which corrects the errors of earlier steps (Karras et al.
# 2022, Sec. 4); our CPU-trained models on flowers 24^2 gave FD_eval 4.7 with eta = 1 against 8.1 with eta = 0
DDIM_ETA = 1.0


@dataclass
class Config:
    timesteps: int = option(1000, "T, the number of diffusion steps")
    schedule: str = option("linear", "noise schedule: linear (Ho et al. 2020), cosine (Nichol & Dhariwal 2021) "
                                     "or sigmoid (the NN Lab skeleton's shape)")
    width: int = option(32, "channels of the U-Net's first level")
    channel_mults: tuple = option((1, 2, 2), "channels of each U-Net level, as multiples of --width")
    blocks_per_level: int = option(1, "residual blocks per level on the way down (one more on the way up)")
    attention_levels: tuple = option((2,), "levels (0 = full resolution) with self-attention")
    dropout: float = option(0.0, "dropout in the residual blocks (DDPM used 0.1 for 800k steps on CIFAR-10)")
    grad_clip: float = option(1.0, "clip the gradient norm to this (Ho et al. 2020); 0 turns it off")
    ema_decay: float = option(0.999, "EMA decay of the weights used for sampling and validation")
    clip_x0: bool = option(True, "clip the predicted x_0 to [-1, 1] in each sampling step, as DDPM's code does")
    unconditional: bool = option(False, "ignore class labels even when the data has several classes")
    label_dropout: float = option(0.1, "probability of the null label in training (classifier-free guidance)")
    v_prediction: bool = option(False, "predict v = sqrt(ab) eps - sqrt(1-ab) x_0 (Salimans & Ho 2022)")
    min_snr_gamma: float = option(0.0, "weight the loss by min(SNR, gamma)/SNR (Hang et al. 2023, gamma 5); 0: off")


def beta_schedule(name, T):
    """b_1 .. b_T in float64, at most 0.999 (so ab_t > 0). Linear and sigmoid are scaled by 1000/T
    (Nichol & Dhariwal), so ab_T ~ 0 for any T."""
    scale = 1000 / T
    if name == "linear":      # b from 1e-4 to 0.02 at T = 1000
        b = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    elif name == "sigmoid":   # the skeleton's sigmoid(linspace(-6, 6, T)), spanning DDPM's range of b
        b = scale * (1e-4 + (0.02 - 1e-4) * torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)))
    elif name == "cosine":    # ab(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
        b = 1 - f[1:] / f[:-1]
    else:
        raise UserError(f"unknown --schedule {name}; choose linear, cosine or sigmoid")
    return b.clamp(max=0.999)


def timestep_embedding(t, freqs):
    """Sinusoidal embedding of t (Vaswani et al. 2017): [sin(t w_i), cos(t w_i)]. (B,) -> (B, 2 len(freqs))."""
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def group_norm(channels):
    """GroupNorm with at least 4 channels a group: one channel a group would erase each channel's mean per image,
    and with it the colour of the noise that eps_theta must predict."""
    return nn.GroupNorm(math.gcd(32, max(channels // 4, 1)), channels)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; + the projected time(+label) embedding; GroupNorm, SiLU, dropout, conv; + skip."""

    def __init__(self, c_in, c_out, emb_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.dropout = group_norm(c_out), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (DDPM's init)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]                       # (B, c_out, H, W) + (B, c_out, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels):
        super().__init__()
        self.norm, self.qkv = group_norm(channels), nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)   # 3 x (B, HW, C)
        a = F.scaled_dot_product_attention(q, k, v)                                   # softmax(q k^T / sqrt(C)) v
        return x + self.out(a.transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """eps_theta(x_t, t, y): levels of ResBlocks (+ attention) going down, a middle, and back up with skips."""

    def __init__(self, config, channels, num_labels):
        super().__init__()
        width, emb_dim = config.width, 4 * config.width
        self.register_buffer("freqs", torch.exp(-math.log(10000) * torch.arange(width // 2) / (width // 2)),
                             persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # labels 0 .. K-1 and K, the null label of classifier-free guidance
        self.label_emb = nn.Embedding(num_labels + 1, emb_dim) if num_labels else None
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        levels = [width * m for m in config.channel_mults]
        self.down, skips, c = nn.ModuleList(), [width], width
        for i, c_out in enumerate(levels):
            for _ in range(config.blocks_per_level):
                self.down.append(self._stage(c, c_out, emb_dim, config, i))
                c = c_out
                skips.append(c)
            if i < len(levels) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # (B, c, H/2, W/2)
                skips.append(c)
        self.middle = nn.ModuleList([ResBlock(c, c, emb_dim, config.dropout), Attention(c),
                                     ResBlock(c, c, emb_dim, config.dropout)])
        self.up = nn.ModuleList()
        for i, c_out in reversed(list(enumerate(levels))):
            for _ in range(config.blocks_per_level + 1):
                self.up.append(self._stage(c + skips.pop(), c_out, emb_dim, config, i))
                c = c_out
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, c, 3, padding=1)))
        self.head = nn.Sequential(group_norm(c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)

    @staticmethod
    def _stage(c_in, c_out, emb_dim, config, level):
        block = ResBlock(c_in, c_out, emb_dim, config.dropout)
        return nn.ModuleList([block, Attention(c_out)]) if level in config.attention_levels else nn.ModuleList([block])

    def forward(self, x, t, y=None):
        emb = self.time_mlp(timestep_embedding(t, self.freqs))                   # (B, 4 width)
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)                                        # the label joins the time embedding
        h = self.stem(x.contiguous(memory_format=torch.channels_last))
        skips = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, nn.Conv2d) else self._run(layer, h, emb)
            skips.append(h)
        h = self._run(self.middle, h, emb)
        for layer in self.up:
            if isinstance(layer, nn.Sequential):
                h = layer(h)                                                     # (B, c, 2H, 2W)
            else:
                h = self._run(layer, torch.cat([h, skips.pop()], dim=1), emb)
        return self.head(h)

    @staticmethod
    def _run(stage, h, emb):
        for m in stage:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h)
        return h


class Model(nn.Module):
    def __init__(self, config, image_shape, num_classes=1):
        super().__init__()
        self.config, self.image_shape = config, tuple(image_shape)
        channels, height, width = image_shape
        factor = 2 ** (len(config.channel_mults) - 1)
        if height % factor or width % factor:
            raise UserError(f"diffusion with {len(config.channel_mults)} levels needs an image size divisible by "
                            f"{factor}, got {height}x{width}; pass e.g. --image-size 24 or fewer --channel-mults")
        self.num_classes = 0 if config.unconditional or num_classes < 2 else num_classes
        # channels_last (N, H, W, C in memory): oneDNN's CPU convolutions run 1.5-2x faster in this layout
        self.unet = UNet(config, channels, self.num_classes).to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False)   # sampling and validation use these weights
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

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
        }
        for name, value in schedule.items():
            self.register_buffer(name, value.float(), persistent=False)

    @property
    def conditional(self):
        return self.num_classes > 0

    def parameter_groups(self):
        return {"model": self.unet.parameters()}   # the EMA copy is not optimised

    def _denoiser(self):
        """Train mode: the weights being optimised. Eval mode (validation, sampling): their EMA."""
        return self.unet if self.training else self.ema

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
        """The loss of `loss` for x_0 already in diffusion space (pixels in [-1, 1], or latents)."""
        t = torch.randint(0, self.config.timesteps, (len(x0),), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        labels = None
        if self.num_classes:   # the null label with probability label_dropout
            drop = torch.rand(len(x0), generator=generator, device=x0.device) < self.config.label_dropout
            labels = torch.where(drop, self.num_classes, y)
        out = self._denoiser()(self.q_sample(x0, t, noise), t, labels)
        if self.config.v_prediction:   # v = sqrt(ab_t) eps - sqrt(1-ab_t) x_0
            target = self._at(self.sqrt_ab, t) * noise - self._at(self.sqrt_1m_ab, t) * x0
        else:
            target = noise
        per_image = (out - target).pow(2).mean(dim=(1, 2, 3))
        if self.config.min_snr_gamma > 0:   # min(SNR, gamma)/SNR for eps, min(SNR, gamma)/(SNR + 1) for v
            snr = self.snr[t]
            per_image = per_image * snr.clamp(max=self.config.min_snr_gamma) / (snr + self.config.v_prediction)
        return {"loss": per_image.mean()}

    def train_step(self, x, y, optimizers):
        """One Adam step on the online weights, then ema <- d ema + (1 - d) theta."""
        terms = self.loss(x, y)
        optimizer = optimizers["model"]
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.unet.parameters(), self.config.grad_clip, foreach=True)
        optimizer.step()
        self.update_ema()
        return terms

    @torch.no_grad()
    def update_ema(self):
        # warm-up: d = min(decay, (1 + n) / (10 + n)) after n updates, so early weights are forgotten fast
        n = self.ema_updates.item()
        decay = min(self.config.ema_decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.unet.parameters()), 1 - decay)
        self.ema_updates += 1

    def guided_output(self, xt, t, y, guidance):
        """Classifier-free guidance: out = out_u + w (out_c - out_u); w = 1 is the conditional model alone."""
        net = self._denoiser()
        if not self.num_classes:
            return net(xt, t)
        if guidance == 1:
            return net(xt, t, y)
        null = torch.full_like(y, self.num_classes)
        out_c, out_u = net(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return out_u + guidance * (out_c - out_u)

    def predict_x0_eps(self, xt, t, y, guidance):
        """(x0_hat, eps_hat) from the network's output, x0_hat clipped to [-1, 1] with clip_x0."""
        out = self.guided_output(xt, t, y, guidance)
        sa, s1a = self._at(self.sqrt_ab, t), self._at(self.sqrt_1m_ab, t)
        if self.config.v_prediction:
            x0 = sa * xt - s1a * out                                             # x_0 = sqrt(ab) x_t - sqrt(1-ab) v
        else:
            x0 = (xt - s1a * out) / sa                                           # (x_t - sqrt(1-ab) eps) / sqrt(ab)
        if self.config.clip_x0:
            x0 = x0.clamp(-1, 1)
        return x0, (xt - sa * x0) / s1a                                          # eps consistent with x0_hat

    def ddpm_step(self, xt, t, y, guidance, generator):
        """Algorithm 2: x_{t-1} ~ N(mu~_t(x_t, x0_hat), b~_t I); no noise at the last step."""
        x0, _ = self.predict_x0_eps(xt, t, y, guidance)
        mean, var = self.q_posterior(x0, xt, t)
        if t[0] == 0:
            return mean
        return mean + var.sqrt() * torch.randn(xt.shape, generator=generator, device=xt.device)

    def ddim_step(self, xt, t, t_prev, y, guidance, eta, generator):
        """Song et al. eq. 12: x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z, s < t,
        sigma = eta sqrt((1 - ab_s)/(1 - ab_t)) sqrt(1 - ab_t/ab_s). t_prev < 0 means s = 0, ab_0 = 1."""
        x0, eps = self.predict_x0_eps(xt, t, y, guidance)
        ab_t = self._at(self.alphas_bar, t)
        ab_s = self._at(self.alphas_bar, t_prev) if t_prev[0] >= 0 else torch.ones_like(ab_t)
        sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).sqrt()
        xs = ab_s.sqrt() * x0 + (1 - ab_s - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0 and t_prev[0] >= 0:
            xs = xs + sigma * torch.randn(xt.shape, generator=generator, device=xt.device)
        return xs

    @torch.no_grad()
    def denoising_process(self, n, generator=None, frames=10, sampler="ddim", steps=50, eta=DDIM_ETA, labels=None,
                          guidance=1.0):
        """Sample n images; returns (frames, n, C, H, W) in [0, 1]: x_T, ..., x_0, evenly spaced in the steps."""
        xs = self.reverse_process(n, generator, frames, sampler, steps, eta, labels, guidance)
        return ((xs + 1) / 2).clamp(0, 1)                                        # [-1, 1] -> [0, 1]

    @torch.no_grad()
    def reverse_process(self, n, generator=None, frames=10, sampler="ddim", steps=50, eta=DDIM_ETA, labels=None,
                        guidance=1.0):
        """(frames, n, C, H, W) in diffusion space: x_T, ..., x_0, evenly spaced in the steps.

        sampler 'ddpm' takes all T steps; 'ddim' takes min(steps, T) evenly spaced ones with noise `eta`
        (0: deterministic given x_T; 1 with all T steps: the DDPM sampler; default DDIM_ETA).
        `labels` (n class indices) conditions image i on class labels[i], else on class i mod K; `guidance` is w."""
        if sampler not in ("ddpm", "ddim"):
            raise UserError(f"unknown sampler '{sampler}'; choose ddpm or ddim")
        if steps < 1:
            raise UserError(f"--steps must be at least 1, got {steps}")
        if labels is not None and not self.conditional:
            raise UserError("this diffusion model is unconditional (one class, or --unconditional); drop --class-label")
        device = self.alphas_bar.device
        x = torch.randn(n, *self.image_shape, generator=generator, device=device)   # x_T ~ N(0, I)
        y = None
        if self.conditional:
            y = labels.to(device) if labels is not None else torch.arange(n, device=device) % self.num_classes
        T = self.config.timesteps
        if sampler == "ddpm":
            ts = list(range(T - 1, -1, -1))
        else:   # an evenly spaced sub-sequence tau of 0 .. T-1, from the top down
            steps = min(steps, T)
            ts = sorted({round(T - 1 - i * (T - 1) / max(steps - 1, 1)) for i in range(steps)}, reverse=True)
        keep = {round(len(ts) - i * len(ts) / max(frames - 1, 1)) for i in range(frames)}   # in 0 .. len(ts)
        kept = [x] if 0 in keep else []
        for i, t in enumerate(ts):
            t_batch = torch.full((n,), t, device=device, dtype=torch.long)
            if sampler == "ddpm":
                x = self.ddpm_step(x, t_batch, y, guidance, generator)
            else:
                t_prev = torch.full((n,), ts[i + 1] if i + 1 < len(ts) else -1, device=device, dtype=torch.long)
                x = self.ddim_step(x, t_batch, t_prev, y, guidance, eta, generator)
            if i + 1 in keep:
                kept.append(x)
        return torch.stack(kept)

    def sample(self, n, generator=None, sampler="ddim", steps=50, eta=DDIM_ETA, labels=None, guidance=1.0):
        """n images x_0 in [0, 1] (see denoising_process); with the EMA weights in eval mode."""
        return self.denoising_process(n, generator, 1, sampler, steps, eta, labels, guidance)[-1]
