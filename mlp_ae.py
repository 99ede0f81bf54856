"""MLP autoencoder: an image flattened to one vector, squeezed through a small code and back.

Every pixel goes into one vector, so the network ignores the image's spatial structure:
3*H*W -> 256 -> 128 -> encoding_dim -> 128 -> 256 -> 3*H*W, ReLU hidden layers, a sigmoid output
in [0, 1], trained on the mean squared error.

    python train_script.py --model MLPAE > log/train_MLPAE.out
    python visualization.py --model MLPAE
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import option
from contract import GenerativeModel

# This model's defaults for the common training flags.
TRAIN_DEFAULTS = dict(epochs=60, lr=2e-3, batch_size=16, lr_decay=0.5, lr_decay_every=20, patience=10)


@dataclass
class Config:
    encoding_dim: int = option(64, "size of the code between encoder and decoder", low=1)


class Autoencoder(GenerativeModel):
    """x -> encoder -> code -> decoder -> x_hat, trained on mean((x_hat - x)^2). conv_ae.py reuses it."""

    reconstructs = True
    preview = "reconstructions"

    def forward(self, x):
        return self.decoder(self.encoder(x))

    def reconstruct(self, x):
        return self(x)

    def loss(self, x, y=None, generator=None):
        return {"loss": F.mse_loss(self(x), x)}

    @torch.no_grad()
    def sample(self, n, generator=None, labels=None):
        """decoder(z), z ~ N(0, I): a plain autoencoder never shaped its codes like N(0, I), so this shows why it fails."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.config.encoding_dim, generator=generator, device=device)
        return self.decoder(z)


class Model(Autoencoder):
    def __init__(self, config, image_shape, num_classes=1, condition="class"):   # unconditional: both ignored
        super().__init__(config, image_shape)
        pixels = image_shape[0] * image_shape[1] * image_shape[2]
        self.encoder = nn.Sequential(
            nn.Flatten(),                                          # (B, C*H*W)
            nn.Linear(pixels, 256), nn.ReLU(),
            nn.Linear(256, 128), nn.ReLU(),
            nn.Linear(128, config.encoding_dim),                   # (B, encoding_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(config.encoding_dim, 128), nn.ReLU(),
            nn.Linear(128, 256), nn.ReLU(),
            nn.Linear(256, pixels), nn.Sigmoid(),                  # pixels in [0, 1]
            nn.Unflatten(1, tuple(image_shape)),                   # (B, C, H, W)
        )
