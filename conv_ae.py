"""Convolutional autoencoder: convolutions and pooling down to a small code, transposed convolutions back up.

C x H x W -> 32 x H/2 x W/2 -> 64 x H/4 x W/4 -> 128 x H/4 x W/4 -> Linear -> encoding_dim
          -> Linear -> 128 x H/4 x W/4 -> 64 x H/4 x W/4 -> 32 x H/2 x W/2 -> C x H x W
3x3 convolutions with ReLU, max pooling to go down, transposed convolutions to come back up,
a sigmoid output in [0, 1], trained on the mean squared error (mlp_ae.Autoencoder). H and W must be multiples of 4.

    python train_script.py --model AE > log/train_AE.out                        # Adam, the fast default
    python train_script.py --model AE --optimizer sgd --lr 1.0 --epochs 60 \\
        --lr-decay 1 > log/train_AE_SGD.out                                      # plain SGD, the slow baseline
    python visualization.py --model AE
"""
from dataclasses import dataclass

import torch.nn as nn

from common import UserError, option
from mlp_ae import Autoencoder

TRAIN_DEFAULTS = dict(epochs=15, lr=1e-3, batch_size=8, lr_decay=0.5, lr_decay_every=5, patience=5)


@dataclass
class Config:
    encoding_dim: int = option(64, "size of the code between encoder and decoder", low=1)


class Model(Autoencoder):
    def __init__(self, config, image_shape, num_classes=1, condition="class"):   # unconditional: both ignored
        super().__init__(config, image_shape)
        channels, height, width = image_shape
        if height % 4 or width % 4:
            raise UserError(f"AE needs an image size divisible by 4, got {height}x{width}; pass e.g. --image-size 24")
        bottom = (128, height // 4, width // 4)
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, H/2, W/2)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),        # (B, 64, H/4, W/4)
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),                        # (B, 128, H/4, W/4)
            nn.Flatten(),
            nn.Linear(128 * bottom[1] * bottom[2], config.encoding_dim),         # (B, encoding_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(config.encoding_dim, 128 * bottom[1] * bottom[2]), nn.ReLU(),
            nn.Unflatten(1, bottom),                                            # (B, 128, H/4, W/4)
            nn.Conv2d(128, 64, 3, padding=1), nn.ReLU(),                        # (B, 64, H/4, W/4)
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),      # (B, 32, H/2, W/2)
            nn.ConvTranspose2d(32, channels, 4, stride=2, padding=1),           # (B, C, H, W)
            nn.Sigmoid(),
        )
