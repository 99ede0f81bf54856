"""Variational autoencoder (Kingma & Welling 2014, "Auto-Encoding Variational Bayes").

The encoder gives q(z|x) = N(mu, diag(sigma^2)) over a 64-d latent; z = mu + sigma * eps (the
reparameterisation trick) goes through the decoder. The loss is the negative ELBO with a Gaussian
decoder, per image and then averaged over the batch:

    loss = mean_batch[ sum_pixels (x_hat - x)^2  +  beta * KL(q(z|x) || N(0, I)) ]

so it is a number per image (a total over a batch of 16 is 16 times larger). `sample` decodes z ~ N(0, I),
which the KL term made meaningful.

    python train_script.py --model VAE > log/train_VAE.out
    python random_generation.py --model VAE
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from common import UserError, option
from contract import GenerativeModel

TRAIN_DEFAULTS = dict(epochs=20, lr=2e-3, batch_size=16, lr_decay=0.5, lr_decay_every=6, patience=5)


@dataclass
class Config:
    latent_dim: int = option(64, "size of the latent z", low=1)
    beta: float = option(1.0, "weight of the KL term (beta-VAE, Higgins et al. 2017); 1 is the ELBO", low=0)


def kl_to_standard_normal(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, I)) per row, in closed form: -0.5 * sum(1 + log sigma^2 - mu^2 - sigma^2)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


class Model(GenerativeModel):
    reconstructs = True
    preview = "reconstructions"

    def __init__(self, config, image_shape, num_classes=1, condition="class"):   # unconditional: both ignored
        super().__init__(config, image_shape)
        channels, height, width = image_shape
        if height % 4 or width % 4:
            raise UserError(f"VAE needs an image size divisible by 4, got {height}x{width}; pass e.g. --image-size 24")
        bottom = (128, height // 4, width // 4)
        features = bottom[0] * bottom[1] * bottom[2]
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.LeakyReLU(0.2),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.BatchNorm2d(64), nn.LeakyReLU(0.2),    # (B, 64, H/2, W/2)
            nn.Conv2d(64, 128, 4, stride=2, padding=1), nn.BatchNorm2d(128), nn.LeakyReLU(0.2),  # (B, 128, H/4, W/4)
            nn.Flatten(),
        )
        self.to_mu = nn.Linear(features, config.latent_dim)
        self.to_logvar = nn.Linear(features, config.latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(config.latent_dim, features), nn.LeakyReLU(0.2),
            nn.Unflatten(1, bottom),                                                             # (B, 128, H/4, W/4)
            nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), nn.BatchNorm2d(64), nn.LeakyReLU(0.2),  # (B, 64, H/2, W/2)
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.BatchNorm2d(32), nn.LeakyReLU(0.2),   # (B, 32, H, W)
            nn.Conv2d(32, channels, 3, padding=1), nn.Sigmoid(),                                 # (B, C, H, W) in [0, 1]
        )

    def encode(self, x):
        h = self.encoder(x)
        # log sigma^2 kept in [-30, 20], as diffusers' KL autoencoders do: exp() of a runaway value is inf, and the
        # loss, summed over every pixel of a large image, gives the first steps large enough updates to run away
        return self.to_mu(h), self.to_logvar(h).clamp(-30, 20)

    def forward(self, x, generator=None):
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device)
        z = mu + torch.exp(0.5 * logvar) * eps   # reparameterisation: z ~ q(z|x), differentiable in mu and sigma
        return self.decoder(z), mu, logvar

    def reconstruct(self, x):
        """The decoder of the posterior mean: the deterministic reconstruction."""
        return self.decoder(self.encode(x)[0])

    def loss(self, x, y=None, generator=None):
        x_hat, mu, logvar = self(x, generator)
        reconstruction = (x_hat - x).pow(2).flatten(1).sum(1).mean()   # summed over pixels, mean over images
        kl = kl_to_standard_normal(mu, logvar).mean()
        return {"loss": reconstruction + self.config.beta * kl, "reconstruction": reconstruction, "kl": kl}

    @torch.no_grad()
    def sample(self, n, generator=None, labels=None):
        """decoder(z), z ~ N(0, I): the prior the KL term pulled q(z|x) towards."""
        device = next(self.parameters()).device
        return self.decoder(torch.randn(n, self.config.latent_dim, generator=generator, device=device))
