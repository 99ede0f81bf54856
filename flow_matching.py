"""Flow matching with straight paths: rectified flow (Liu et al. 2023, "Flow Straight and Fast") and conditional
flow matching (Lipman et al. 2023, "Flow Matching for Generative Modeling"), as Stable Diffusion 3 trains it
(Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis").

Images x_0 are scaled to [-1, 1] and joined to noise eps ~ N(0, I) by the straight line

    x_t = (1 - t) x_0 + t eps,   t in [0, 1],

whose velocity dx_t/dt = eps - x_0 the network v_theta(x_t, t, y) (unet.py's U-Net) learns by least squares:

    loss = E_{t, x_0, eps} || v_theta(x_t, t, y) - (eps - x_0) ||^2.

The learnt field carries N(0, I) at t = 1 to the data at t = 0: sampling integrates dx/dt = v_theta(x, t) from 1
down to 0 with Euler's or Heun's method (samplers.py). t is drawn from a logit-normal distribution,
t = sigmoid(m + s n), n ~ N(0, 1), which spends more training on the middle of the path than the uniform one
(Esser et al., Sec. 3.1). Conditions, classifier-free guidance and the EMA weights are ddpm.py's.

    python train_script.py --model flow --data ./flowers > log/train_flow.out
    python random_generation.py --model flow                        # EMA weights, Heun, 10 steps (20 evaluations)
    python random_generation.py --model flow --sampler euler --steps 20
    python visualization.py --model flow                            # vis/denoising_flow.png
"""
import math
from dataclasses import dataclass

import torch

import samplers
from common import UserError, option
from contract import GenerativeModel
from ddpm import TRAIN_DEFAULTS as DDPM_TRAIN_DEFAULTS
from unet import (UNet, UNetConfig, as_condition, check_size, condition_for, drop_condition, guidance_at, guided,
                  sampling_condition)

TRAIN_DEFAULTS = dict(DDPM_TRAIN_DEFAULTS)
DEFAULT_STEPS = {"heun": 10, "euler": 20}   # integration steps of each sampler: 20 network evaluations either way
TIME_SCALE = 1000   # the U-Net's sinusoidal time embedding is made for steps 0 .. 1000: it sees 1000 t


@dataclass
class Config(UNetConfig):   # the U-Net's flags, and these
    time_sampling: str = option("logit-normal", "how training draws t: logit-normal (Esser et al. 2024) or uniform",
                                choices=("logit-normal", "uniform"))
    logit_mean: float = option(0.0, "m of the logit-normal t = sigmoid(m + s n)")
    logit_std: float = option(1.0, "s of the logit-normal t = sigmoid(m + s n)", low=0)
    ema_decay: float = option(0.999, "EMA decay of the weights used for sampling and validation", low=0, high=1)
    unconditional: bool = option(False, "ignore the data's conditions (classes, labels or layouts)")
    label_dropout: float = option(0.1, "probability of the null condition in training (classifier-free guidance)",
                                  low=0, high=1)


class Model(GenerativeModel):
    denoises = True
    sample_options = ("sampler", "steps", "guidance", "guidance_interval")

    def __init__(self, config, image_shape, num_classes=1, condition="class"):
        super().__init__(config, image_shape)
        check_size(config, *self.image_shape[1:])
        self.num_classes, self.condition = condition_for(condition, num_classes, config.unconditional)
        channels = self.image_shape[0]
        self.unet = UNet(config, channels, channels, self.num_classes, condition).to(memory_format=torch.channels_last)
        self.init_ema("unet", config.ema_decay)   # sampling and validation use these weights

    def parameter_groups(self):
        return {"model": self.unet}   # the EMA copy is not optimised

    def sample_times(self, n, generator=None, device="cpu"):
        """t in (0, 1): sigmoid(m + s n) with n ~ N(0, 1), or uniform."""
        if self.config.time_sampling == "uniform":
            return torch.rand(n, generator=generator, device=device)
        normal = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(self.config.logit_mean + self.config.logit_std * normal)

    def loss(self, x, y=None, generator=None):
        """|| v_theta((1 - t) x_0 + t eps, t) - (eps - x_0) ||^2, mean over pixels and images. With `generator`
        (validation), t, eps and dropped conditions come from it: the same at every validation."""
        x0 = x * 2 - 1                                                            # [0, 1] -> [-1, 1]
        t = self.sample_times(len(x0), generator, x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device)
        t_ = t[:, None, None, None]                                               # (B,) -> (B, 1, 1, 1)
        labels = None
        if self.conditional:
            labels = drop_condition(as_condition(y, self.condition), self.condition, self.num_classes,
                                    self.config.label_dropout, generator)
        v = (self.unet if self.training else self.ema)((1 - t_) * x0 + t_ * eps, t * TIME_SCALE, labels)
        return {"loss": (v - (eps - x0)).pow(2).mean()}

    def velocity(self, y, guidance, interval=None):
        """velocity(x, t) for samplers.py at a time t in [0, 1]: EMA weights in eval mode, guidance w at the noise
        levels sigma = t / (1 - t) in `interval` (all without one)."""
        net = self.unet if self.training else self.ema

        def velocity_at(x, t):
            w = guidance_at(t / (1 - t) if t < 1 else math.inf, guidance, interval)
            return guided(net, x, torch.full((len(x),), t * TIME_SCALE, device=x.device), y, w)
        return velocity_at

    @torch.no_grad()
    def denoising_process(self, n, generator=None, frames=10, labels=None, sampler="heun", steps=None, guidance=1.0,
                          guidance_interval=None):
        """Sample n images; returns (frames, n, C, H, W) in [0, 1], from the noise x_1 to the sample x_0, evenly
        spaced in the steps. sampler: 'heun' (2 network evaluations a step) or 'euler' (1);
        steps: evenly spaced in t, default DEFAULT_STEPS; labels: image i is drawn for the condition labels[i];
        guidance: classifier-free guidance's w (1: the conditional model alone), at the noise levels
        sigma = t / (1 - t) in guidance_interval = (lo, hi] (all without one)."""
        if sampler not in DEFAULT_STEPS:
            raise UserError(f"unknown sampler '{sampler}' for flow matching; choose {', '.join(DEFAULT_STEPS)}")
        steps = steps or DEFAULT_STEPS[sampler]
        if steps < 1:
            raise UserError(f"--steps must be at least 1, got {steps}")
        self.check_sampling(labels, guidance, guidance_interval)
        device = next(self.ema.parameters()).device
        x = torch.randn(n, *self.image_shape, generator=generator, device=device)   # x_1 ~ N(0, I)
        velocity = self.velocity(sampling_condition(labels, n, self.condition, self.num_classes,
                                                    self.image_shape[1:], device), guidance, guidance_interval)
        ts = [1 - i / steps for i in range(steps + 1)]
        states = (samplers.heun if sampler == "heun" else samplers.euler)(velocity, x, ts)
        return ((samplers.keep_frames(x, states, steps, frames) + 1) / 2).clamp(0, 1)

    def sample(self, n, generator=None, labels=None, **options):
        """n images x_0 in [0, 1] (see denoising_process), with the EMA weights in eval mode."""
        return self.denoising_process(n, generator, 1, labels, **options)[-1]
