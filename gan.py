"""Deep convolutional GAN (Radford et al. 2016, "Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks"), trained as pytorch/examples' dcgan: one D step, then
one G step per batch, each with its own Adam(lr 2e-4, beta1 0.5).

G maps z ~ N(0, I) to an image in [-1, 1] with transposed convolutions that double the size from
s0 x s0, S = s0 * 2^k (24 = 3 * 2^3, 28 = 7 * 2^2, 32 = 4 * 2^3, 64 = 4 * 2^4), BatchNorm and ReLU; D
mirrors it with strided convolutions and LeakyReLU(0.2) down to s0 x s0 and one logit. Options, each
named after its paper:
- the loss: non-saturating (Goodfellow et al. 2014, "Generative Adversarial Nets"; the default) or hinge
  (Lim & Ye 2017, "Geometric GAN"; Miyato et al. 2018);
- spectral normalisation of D's weights instead of its BatchNorm (Miyato et al. 2018, "Spectral
  Normalization for Generative Adversarial Networks");
- class conditioning when the data has classes: a label embedding joins z in G (Mirza & Osindero 2014,
  "Conditional Generative Adversarial Nets") and D is a projection discriminator (Miyato & Koyama 2018,
  "cGANs with Projection Discriminator");
- an exponential moving average of G's weights (Yazici et al. 2019, "The Unusual Effectiveness of
  Averaging in GAN Training"), which is what `sample` uses.

GAN losses say little about sample quality, so `selects_by_sample_quality`: Best and early stopping
follow FID when pytorch-fid's Inception weights are present, else FD_eval of the offline evaluator
(fid.py), every 2 epochs by default. Training stops with an error when a loss becomes NaN or D wins
completely for --divergence-steps steps in a row; Best is left as it was.

    python fid.py train-evaluator --data ./flowers      # once, for FD_eval when there are no Inception weights
    python train_script.py --model GAN --data ./flowers --fid-every 2 > log/train_GAN.out
    python random_generation.py --model GAN             # vis/random_images_GAN.png (EMA generator)
    python random_generation.py --model GAN --fid
    python train_script.py --model GAN --data ./flowers --conditional --run-name GAN_cond
    python random_generation.py --model GAN --checkpoint models/Best_GAN_cond.pth --class-label calendula
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import TrainingDiverged, UserError, option
from contract import GenerativeModel

# DCGAN's optimiser (Adam, lr 2e-4, beta1 0.5) and batch; Best by sample quality every 2 epochs, measured
# with FID when the Inception weights are present, else with the offline evaluator (fid.py --fid-features auto).
TRAIN_DEFAULTS = dict(epochs=100, lr=2e-4, adam_beta1=0.5, batch_size=64, patience=10, fid_every=2,
                      fid_features=["auto"])
LOSSES = ("nonsaturating", "hinge")
D_WON = 0.99   # D(x) above this and D(G(z)) below 1 - this: D tells every image apart


@dataclass
class Config:
    latent_dim: int = option(100, "size of z ~ N(0, I) (DCGAN: 100)", low=1)
    ngf: int = option(64, "channels of G's last hidden layer, doubled at each smaller size (DCGAN: 64)", low=1)
    ndf: int = option(64, "channels of D's first layer, doubled at each smaller size (DCGAN: 64)", low=1)
    loss: str = option("nonsaturating", "nonsaturating (Goodfellow et al. 2014) or hinge (Lim & Ye 2017)",
                       choices=LOSSES)
    spectral_norm: bool = option(False, "spectral normalisation of D's weights, instead of its BatchNorm "
                                        "(Miyato et al. 2018)")
    conditional: bool = option(False, "condition on the class when the data has several: label embedding in G "
                                      "(Mirza & Osindero 2014), projection D (Miyato & Koyama 2018)")
    ema_decay: float = option(0.999, "EMA decay of G's weights, which sampling uses (Yazici et al. 2019); 0: G itself",
                              low=0, high=1)
    divergence_steps: int = option(500, f"stop when D(x) > {D_WON} and D(G(z)) < {1 - D_WON:.2g} for this many steps "
                                        "in a row (D has won; G no longer learns); 0: never", low=0)


def size_plan(size):
    """(s0, k) with size = s0 * 2^k: halve while even and above 4 (24 -> 3, 3; 28 -> 7, 2; 32 -> 4, 3; 64 -> 4, 4)."""
    s0, k = size, 0
    while s0 % 2 == 0 and s0 > 4:
        s0, k = s0 // 2, k + 1
    if k == 0 or s0 > 7:
        raise UserError(f"GAN needs an image size s * 2^k with s <= 7 and k >= 1 (e.g. 24, 28, 32, 64), got {size}; "
                        "pass e.g. --image-size 24")
    return s0, k


def dcgan_init(module):
    """DCGAN's initialisation: weights ~ N(0, 0.02), BatchNorm scales ~ N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """G(z, y): z (B, latent_dim) [+ embedding of y] -> (B, C, S, S) in [-1, 1]."""

    def __init__(self, config, channels, size, num_classes):
        super().__init__()
        s0, k = size_plan(size)
        c = config.ngf * 2 ** (k - 1)
        self.label_emb = nn.Embedding(num_classes, config.latent_dim) if num_classes else None
        z_dim = config.latent_dim * (2 if num_classes else 1)
        layers = [nn.ConvTranspose2d(z_dim, c, s0, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
        # state size. (ngf * 2^(k-1)) x s0 x s0
        for _ in range(k - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c //= 2   # state size. c x 2s x 2s: ... ngf x S/2 x S/2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=False), nn.Tanh()]
        # state size. C x S x S
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, z, y=None):
        if self.label_emb is not None:
            z = torch.cat([z, self.label_emb(y)], dim=1)                         # (B, 2 latent_dim)
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """D(x, y): (B, C, S, S) in [-1, 1] -> (B,) logits; D's probability that x is real is sigmoid(logit).

    Unconditional: psi(phi(x)). Projection: psi(phi(x)) + embed(y)^T sum_pixels phi(x)."""

    def __init__(self, config, channels, size, num_classes):
        super().__init__()
        s0, k = size_plan(size)
        c = config.ndf
        layers = [nn.Conv2d(channels, c, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]   # no norm at the input
        # state size. ndf x S/2 x S/2
        for _ in range(k - 1):
            norm = nn.Identity() if config.spectral_norm else nn.BatchNorm2d(2 * c)
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), norm, nn.LeakyReLU(0.2, inplace=True)]
            c *= 2    # state size. c x s/2 x s/2: ... (ndf * 2^(k-1)) x s0 x s0
        self.phi = nn.Sequential(*layers)
        self.psi = nn.Conv2d(c, 1, s0, 1, 0, bias=False)                           # (B, 1, 1, 1)
        self.embed = nn.Embedding(num_classes, c) if num_classes else None
        self.apply(dcgan_init)
        if config.spectral_norm:   # W / sigma(W), sigma by one power iteration per training step
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Embedding)):
                    nn.utils.parametrizations.spectral_norm(m)

    def forward(self, x, y=None):
        h = self.phi(x)                                                            # (B, c, s0, s0)
        logits = self.psi(h).flatten()
        if self.embed is not None:
            logits = logits + (self.embed(y) * h.sum(dim=(2, 3))).sum(dim=1)        # + embed(y)^T phi(x)
        return logits


def discriminator_loss(real_logits, fake_logits, kind):
    """D's loss, minimised. With D = sigmoid(logit), -log D = softplus(-logit) and -log(1 - D) = softplus(logit)."""
    if kind == "hinge":   # L_D = E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))]
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    # L_D = -E[log D(x)] - E[log(1 - D(G(z)))]
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits, kind):
    """G's loss, minimised."""
    if kind == "hinge":   # L_G = -E[D(G(z))]
        return -fake_logits.mean()
    # non-saturating: L_G = -E[log D(G(z))], not E[log(1 - D(G(z)))], whose gradient vanishes when D wins
    return F.softplus(-fake_logits).mean()


class Model(GenerativeModel):
    selects_by_sample_quality = True   # Best and early stopping follow FID / FD_eval, not a loss
    sample_options = ()

    def __init__(self, config, image_shape, num_classes=1, condition="class"):
        super().__init__(config, image_shape)
        channels, height, width = image_shape
        if height != width:
            raise UserError(f"GAN needs square images, got {height}x{width}")
        if config.loss not in LOSSES:
            raise UserError(f"unknown --loss {config.loss}; choose {' or '.join(LOSSES)}")
        if config.conditional and condition != "class":
            raise UserError(f"the GAN conditions on one class per image, not on {condition}; drop --conditional, "
                            "or pass --condition class")
        self.num_classes = num_classes if config.conditional and num_classes > 1 else 0
        self.condition = "class" if self.num_classes else None
        self.generator = Generator(config, channels, height, self.num_classes)
        self.discriminator = Discriminator(config, channels, height, self.num_classes)
        self.init_ema("generator", config.ema_decay)   # sampling uses these weights, BatchNorm statistics included
        self.register_buffer("d_won_steps", torch.zeros((), dtype=torch.long))   # steps in a row that D won

    def parameter_groups(self):
        return {"discriminator": self.discriminator, "generator": self.generator}

    def noise(self, n, generator=None):
        """z ~ N(0, I), (n, latent_dim)."""
        return torch.randn(n, self.config.latent_dim, generator=generator, device=self.ema_updates.device)

    @staticmethod
    def report(loss_d, loss_g, real_logits, fake_logits):
        """What is logged: `loss` is D's (the NS loss is 2 log 2 - 2 JSD(data, G) when D is optimal), both
        losses, and D's mean probability that real images (D_x) and generated ones (D_G_z) are real."""
        return {"loss": loss_d, "loss_D": loss_d, "loss_G": loss_g,
                "D_x": torch.sigmoid(real_logits).mean(), "D_G_z": torch.sigmoid(fake_logits).mean()}

    def loss(self, x, y=None, generator=None):
        """Both losses on a batch without an update (validation: eval mode, so the EMA G; fixed noise)."""
        labels = y if self.conditional else None
        fake = (self.generator if self.training else self.ema)(self.noise(len(x), generator), labels)
        real_logits, fake_logits = self.discriminator(x * 2 - 1, labels), self.discriminator(fake, labels)
        return self.report(discriminator_loss(real_logits, fake_logits, self.config.loss),
                           generator_loss(fake_logits, self.config.loss), real_logits, fake_logits)

    def discriminator_terms(self, real, z, labels):
        """D's loss on real images and on G(z), generated without a graph: this step updates D only."""
        with torch.no_grad():
            fake = self.generator(z, labels)
        real_logits, fake_logits = self.discriminator(real, labels), self.discriminator(fake, labels)
        return {"loss": discriminator_loss(real_logits, fake_logits, self.config.loss),
                "D_x": torch.sigmoid(real_logits).mean(), "D_G_z": torch.sigmoid(fake_logits).mean()}

    def generator_terms(self, z, labels):
        return {"loss": generator_loss(self.discriminator(self.generator(z, labels), labels), self.config.loss)}

    def train_step(self, x, y, optimizers):
        """One D step on a real batch and as many generated images, then one G step on the same z."""
        real, labels = x * 2 - 1, (y if self.conditional else None)                 # [0, 1] -> [-1, 1]
        z = self.noise(len(x))
        # (1) Update D: minimise discriminator_loss on real images and G(z), for the real batch's labels
        d_terms = optimizers.step("discriminator", self.discriminator_terms, real, z, labels)
        # (2) Update G: minimise generator_loss, D's verdict on G(z)
        g_terms = optimizers.step("generator", self.generator_terms, z, labels)
        self.update_ema()
        terms = {"loss": d_terms["loss"], "loss_D": d_terms["loss"], "loss_G": g_terms["loss"],
                 "D_x": d_terms["D_x"], "D_G_z": d_terms["D_G_z"]}
        self.check_divergence(terms)
        return terms

    def check_divergence(self, terms):
        """TrainingDiverged on a NaN/inf loss, or when D has won completely for divergence_steps steps in a row."""
        loss_d, loss_g = float(terms["loss_D"]), float(terms["loss_G"])
        if not (math.isfinite(loss_d) and math.isfinite(loss_g)):
            raise TrainingDiverged(f"GAN diverged: loss_D {loss_d:.4g}, loss_G {loss_g:.4g}; Best is left as it "
                                   "was. Try a lower --lr or --spectral-norm.")
        won = float(terms["D_x"]) > D_WON and float(terms["D_G_z"]) < 1 - D_WON
        self.d_won_steps.fill_(int(self.d_won_steps) + 1 if won else 0)
        if self.config.divergence_steps and int(self.d_won_steps) >= self.config.divergence_steps:
            raise TrainingDiverged(f"GAN diverged: D won completely (D(x) > {D_WON}, D(G(z)) < {1 - D_WON:.2g}) "
                                   f"for {int(self.d_won_steps)} steps in a row, so G no longer learns; Best is "
                                   "left as it was. Try --spectral-norm, --loss hinge or a lower --lr.")

    @torch.no_grad()
    def sample(self, n, generator=None, labels=None):
        """n images in [0, 1]: (G_ema(z, y) + 1) / 2, z ~ N(0, I); y = labels, else class i mod K for image i."""
        if labels is not None and not self.conditional:
            raise UserError("this GAN is unconditional (trained without --conditional, or on one class); "
                            "drop --class-label")
        z = self.noise(n, generator)
        y = None
        if self.conditional:
            y = labels.to(z.device) if labels is not None else torch.arange(n, device=z.device) % self.num_classes
        return (self.ema(z, y) + 1) / 2
