"""Sample quality: FID as pytorch-fid computes it, KID, and an offline evaluator that needs no download.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium") is the Fréchet distance between Gaussians fitted to the 2048-d pool3 features of
InceptionV3 for real and generated images. The network here is pytorch-fid's FID variant of
InceptionV3 (the TensorFlow graph's weights, `pt_inception-2015-12-05-6726825d.pth`), written in plain
torch, and the preprocessing is pytorch-fid's: uint8 images, grey repeated to RGB, bilinear resize to
299 x 299, scaled to [-1, 1]. KID (Binkowski et al. 2018, "Demystifying MMD GANs") is the unbiased
MMD^2 with the cubic polynomial kernel, averaged over subsets: unlike FID it is unbiased in N, so it
is the number to trust for small sets. FID is biased by N: compare FIDs only at equal N (>= 2048).

The offline evaluator is a small CNN classifier trained on the dataset's own classes. Its pooled
features give a Fréchet distance reported as FD_eval (never called FID: it is not comparable with
published numbers), and its predictions give the class accuracy of class-conditional samples.

    python fid.py vis/samples/ ./flowers                    # FID and KID between two image folders (or .npz statistics)
    python fid.py ./flowers --save-stats flowers_24.npz     # cache the reference statistics (pytorch-fid's mu/sigma)
    python fid.py train-evaluator --data ./flowers          # models/Evaluator_flowers_24.pth and its val accuracy
    python fid.py vis/samples/ ./flowers --features evaluator
    python random_generation.py --model VAE --fid           # as many samples as validation images, FID and KID
    python train_script.py --model VAE --fid-every 5 --fid-samples 1000

Model contract (see README, "Writing a model"): a model with `conditional = True` accepts
`sample(n, generator, labels=LongTensor of n class indices)` and draws image i from class labels[i];
then samples are generated for the real images' labels (class proportions matched) and the evaluator
reports their class accuracy. A model with `selects_by_sample_quality = True` (no meaningful
validation loss, e.g. a GAN) has Best and early stopping chosen on the first metric of --fid-features.
"""
import argparse
import hashlib
import math
import sys
import time
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import UserError

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SIZE = 299
RELIABLE_N = 2048  # below this many images FID's bias in N dominates differences between models
SAMPLE_BATCH = 250


# ----------------------------------------------------------------------------------------------
# Fréchet distance and KID: pure functions of features
# ----------------------------------------------------------------------------------------------

def statistics(features):
    """Mean and covariance (float64, unbiased, as np.cov) of features (N, D)."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64, as pytorch-fid.

    # d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})
    A singular product has no finite square root: retry with eps added to both diagonals.
    Numerical error leaves a small imaginary part, dropped; a large one is an error.
    N images span at most N - 1 of the D feature dimensions. With fewer images than dimensions the
    square root is taken in the span of S1 + S2, which holds the ranges of both: Q^T S1 Q and Q^T S2 Q
    have the same Tr((S1 S2)^{1/2}), exactly, and sqrtm of 2048 x 2048 takes a minute on a 2-core CPU.
    At full rank this is pytorch-fid's computation unchanged.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"the two statistics have different dimensions ({mu1.shape[0]} and {mu2.shape[0]}); "
                        "compute both with the same feature extractor")
    diff = mu1 - mu2
    w, v = np.linalg.eigh(sigma1 + sigma2)
    span = v[:, w > w.max() * len(w) * np.finfo(np.float64).eps]          # Q: (D, r)
    s1, s2 = (sigma1, sigma2) if span.shape[1] == len(w) else (span.T @ sigma1 @ span, span.T @ sigma2 @ span)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # the finiteness check below decides
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise UserError(f"(S1 S2)^(1/2) has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}; "
                             "the statistics are too degenerate (too few images?)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kernel_inception_distance(features1, features2, num_subsets=100, subset_size=1000, seed=0):
    """KID: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, mean and std over random subsets.

    # MMD^2_u = 1/(m(m-1)) sum_{i!=j} [k(x_i,x_j) + k(y_i,y_j)] - 2/m^2 sum_{i,j} k(x_i,y_j)
    m = min(subset_size, N1, N2); subsets are drawn without replacement from a seeded generator.
    """
    x_all, y_all = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    d = x_all.shape[1]
    m = min(subset_size, len(x_all), len(y_all))
    if m < 2:
        raise UserError("KID needs at least 2 images in each set")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        k_xx, k_yy, k_xy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values.append(within - 2 * k_xy.mean())
    return float(np.mean(values)), float(np.std(values))


def warn_about_sizes(n1, n2):
    if n1 != n2:
        warnings.warn(f"the two sets differ in size ({n1} vs {n2}); FID is biased by N, compare only at equal N",
                      stacklevel=2)
    if min(n1, n2) < RELIABLE_N:
        warnings.warn(f"{min(n1, n2)} images (< {RELIABLE_N}): FID is biased upwards at small N; "
                      "compare FIDs only at the same N, and prefer KID", stacklevel=2)


# ----------------------------------------------------------------------------------------------
# InceptionV3, the FID variant (names and shapes of pytorch-fid's weight file)
# ----------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, TensorFlow's) -> ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def average_pool(x):
    # TensorFlow's average pool does not count the zero padding: count_include_pad=False
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avgpool -> 1x1, concatenated (Mixed_5b-d)."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(average_pool(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | maxpool/2 (Mixed_6a)."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """Factorised 7x7 as 1x7 and 7x1 convolutions (Mixed_6b-e)."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          double,
                          self.branch_pool(average_pool(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | maxpool/2 (Mixed_7a)."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Expanded filter bank: 1x3 and 3x1 side by side (Mixed_7b, Mixed_7c).

    The FID graph pools with an average (count_include_pad=False) in Mixed_7b but with a max in
    Mixed_7c, unlike the paper; pytorch-fid keeps that, and so does this: `max_pool=True` for 7c.
    """

    def __init__(self, in_channels, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else average_pool(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(single), self.branch3x3_2b(single),
                          self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
                          self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 up to pool3: (B, 3, 299, 299) in [-1, 1] -> (B, 2048).

    `fc` (the graph's 1008-way classifier) is there only so that the weight file loads strictly.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)         # (B, 32, 149, 149)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)                  # (B, 32, 147, 147)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)       # (B, 64, 147, 147), maxpool -> 73
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)                  # (B, 80, 73, 73)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)                 # (B, 192, 71, 71), maxpool -> 35
        self.Mixed_5b = InceptionA(192, pool_features=32)            # (B, 256, 35, 35)
        self.Mixed_5c = InceptionA(256, pool_features=64)            # (B, 288, 35, 35)
        self.Mixed_5d = InceptionA(288, pool_features=64)            # (B, 288, 35, 35)
        self.Mixed_6a = InceptionB(288)                              # (B, 768, 17, 17)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)            # (B, 768, 17, 17)
        self.Mixed_7a = InceptionD(768)                              # (B, 1280, 8, 8)
        self.Mixed_7b = InceptionE(1280)                             # (B, 2048, 8, 8)
        self.Mixed_7c = InceptionE(2048, max_pool=True)              # (B, 2048, 8, 8)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))                                    # pool3: (B, 2048)


def hub_weights_file():
    """Where the weight file is looked for and downloaded to: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME


def inception_weights(path=None):
    """The weight file: `path`, else the torch hub cache, else downloaded there from pytorch-fid's release."""
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"--inception-weights '{path}' does not exist")
        return Path(path)
    cached = hub_weights_file()
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(cached), hash_prefix="6726825d", progress=True)
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            raise UserError(f"FID needs the Inception weights and the download failed ({type(err).__name__}); "
                            f"download {FID_WEIGHTS_URL} to {cached}, or pass --inception-weights PATH") from err
    return cached


def load_inception(path=None, device="cpu"):
    """FIDInceptionV3 with pytorch-fid's weights, in eval mode. Never runs with random weights."""
    path = inception_weights(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = FIDInceptionV3()
        net.load_state_dict(state)
    except Exception as err:  # a foreign or truncated file: say which, not a traceback
        first_line = str(err).splitlines()[0][:120]
        raise UserError(f"'{path}' is not pytorch-fid's Inception weight file ({first_line})") from err
    return net.eval().to(device)


def quantize(images):
    """Float images in [0, 1] to uint8 as saving a PNG does (torchvision's save_image): floor(255 x + 0.5)."""
    return (images.detach().float().cpu() * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def inception_input(images):
    """uint8 (B, C, H, W) -> Inception's input (B, 3, 299, 299) in [-1, 1], as pytorch-fid.

    ToTensor's x / 255, grey repeated to RGB, bilinear resize (align_corners=False, no antialias), 2x - 1.
    """
    x = images.float() / 255
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


# ----------------------------------------------------------------------------------------------
# The offline evaluator: a small classifier of the dataset's own classes
# ----------------------------------------------------------------------------------------------

class Evaluator(nn.Module):
    """Three conv stages (w, 2w, 4w channels, two 3x3 convs each) -> global average pool -> linear.

    The pooled 4w-d vector is the feature for FD_eval; the linear layer gives class logits.
    """

    def __init__(self, image_shape, num_classes, width=32):
        super().__init__()
        self.image_shape, self.num_classes, self.width = tuple(image_shape), num_classes, width

        def stage(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                    nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(*stage(image_shape[0], width), nn.MaxPool2d(2),            # (B, w, H/2, W/2)
                                  *stage(width, 2 * width), nn.MaxPool2d(2),                # (B, 2w, H/4, W/4)
                                  *stage(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1),    # (B, 4w, 1, 1)
                                  nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x):
        """x in [0, 1] -> (B, 4w)."""
        return self.body(2 * x - 1)

    def forward(self, x):
        return self.head(self.features(x))


def evaluator_path(data, image_size, models_dir="models"):
    """Where the evaluator for a dataset lives: models/Evaluator_<data folder name>_<size>.pth."""
    return Path(models_dir) / f"Evaluator_{Path(str(data)).name}_{image_size}.pth"


@torch.no_grad()
def accuracy(net, images, labels, batch_size=256):
    net.eval()
    correct = sum(int((net(x).argmax(1) == y).sum())
                  for x, y in common.iterate_batches(images, labels, batch_size, shuffle=False))
    return correct / len(images)


def train_evaluator(data, epochs=15, batch_size=64, lr=2e-3, width=32, seed=0, device="cpu", log=print):
    """Train on the train split (the same 80/20 split as the models), report validation accuracy."""
    if len(data.class_names) < 2:
        raise UserError(f"the evaluator is a classifier and needs at least 2 classes, but '{data.source}' has one; "
                        "put the images in one sub-folder per class")
    common.seed_everything(seed)
    train_idx, val_idx = common.split_indices(len(data.images), seed)
    net = Evaluator(data.image_shape, len(data.class_names), width).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * math.ceil(len(train_idx) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    shuffle_rng = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        started, total = time.perf_counter(), 0.0
        net.train()
        for x, y in common.iterate_batches(data.images[train_idx], data.labels[train_idx], batch_size,
                                           shuffle_rng, flip=True):
            loss = F.cross_entropy(net(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(x)
        val_accuracy = accuracy(net.cpu(), data.images[val_idx], data.labels[val_idx])
        net.to(device)
        log(f"epoch {epoch} train_loss {total / len(train_idx):.4g} val_accuracy {val_accuracy:.4f} "
            f"time {time.perf_counter() - started:.1f}s")
    return net.cpu().eval(), val_accuracy


def save_evaluator(net, data, val_accuracy, seed, path):
    common.save_checkpoint({"kind": "genlab evaluator", "image_shape": list(net.image_shape),
                            "class_names": list(data.class_names), "width": net.width, "data": data.source,
                            "seed": seed, "val_accuracy": val_accuracy, "state": net.state_dict()}, path)


def load_evaluator(path):
    ckpt = common.load_checkpoint(path) if Path(path).is_file() else None
    if ckpt is None:
        raise UserError(f"no evaluator at '{path}'; train one: python fid.py train-evaluator --data DATA "
                        "--image-size S (with the model's data and size), or pass --evaluator PATH")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "genlab evaluator":
        raise UserError(f"'{path}' is not an evaluator made by `fid.py train-evaluator`")
    net = Evaluator(ckpt["image_shape"], len(ckpt["class_names"]), ckpt["width"])
    net.load_state_dict(ckpt["state"])
    return net.eval(), ckpt


# ----------------------------------------------------------------------------------------------
# Features, cached by content
# ----------------------------------------------------------------------------------------------

def file_fingerprint(path):
    stat = Path(path).stat()
    return f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


class FeatureExtractor:
    """uint8 images (N, C, H, W) -> features (N, D) float64 through `prepare` then `net`.

    `kind` names the metrics: 'inception' gives FID/KID, 'evaluator' gives FD_eval/KID_eval (and the
    class accuracy of conditional samples). Features of an image set are cached on disk under a hash of
    the extractor's weight file and the images' bytes, so an unchanged folder or validation split is
    never run through the network twice.
    """

    def __init__(self, kind, net, prepare, weights_file, image_shape=None, classifier=None, batch_size=50,
                 device="cpu"):
        self.kind, self.net, self.prepare, self.image_shape = kind, net, prepare, image_shape
        self.classifier = classifier  # the evaluator's logits, for the class accuracy of conditional samples
        self.fingerprint = file_fingerprint(weights_file)
        self.batch_size, self.device = batch_size, device

    @property
    def names(self):
        return ("FID", "KID") if self.kind == "inception" else ("FD_eval", "KID_eval")

    @torch.no_grad()
    def __call__(self, images, desc="features", cache=True):
        if images.dtype != torch.uint8:   # floats in [0, 1] would be read as near-black pixels, silently
            raise UserError(f"feature extraction takes uint8 images (0-255), got {images.dtype}; convert images "
                            "in [0, 1] with fid.quantize(images)")
        if self.image_shape is not None and tuple(images.shape[1:]) != tuple(self.image_shape):
            raise UserError(f"the evaluator was trained on {'x'.join(map(str, self.image_shape))} images, these are "
                            f"{'x'.join(map(str, images.shape[1:]))}; train one for this size and channels")
        images = images.contiguous()
        digest = hashlib.sha256(f"{self.kind}|{self.fingerprint}|{tuple(images.shape)}".encode())
        digest.update(images.numpy().tobytes())
        cache_file = Path(common.DEFAULT_CACHE_DIR) / "features" / f"{digest.hexdigest()[:32]}.npy"
        if cache and cache_file.exists():
            return np.load(cache_file)
        batches = range(0, len(images), self.batch_size)
        out = [self.net(self.prepare(images[i:i + self.batch_size]).to(self.device)).double().cpu().numpy()
               for i in tqdm(batches, desc=desc, unit="batch", leave=False, file=sys.stderr, disable=None)]
        features = np.concatenate(out)
        if cache:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache_file, features)
        return features


def make_extractor(kind, inception_weights_file=None, evaluator_file=None, device="cpu"):
    if kind == "inception":
        path = inception_weights(inception_weights_file)
        return FeatureExtractor("inception", load_inception(path, device), inception_input, path, device=device)
    net, ckpt = load_evaluator(evaluator_file)
    return FeatureExtractor("evaluator", net.features, common.to_float, evaluator_file, tuple(ckpt["image_shape"]),
                            classifier=net, batch_size=256)


# ----------------------------------------------------------------------------------------------
# Samples of a model against real images
# ----------------------------------------------------------------------------------------------

def matched_labels(real_labels, n, generator=None):
    """n class labels in the proportions of real_labels (exactly, when n == len(real_labels))."""
    order = torch.randperm(len(real_labels), generator=generator)
    return real_labels[order.repeat(math.ceil(n / len(real_labels)))[:n]]


@torch.no_grad()
def generate(model, n, generator, labels=None, batch_size=SAMPLE_BATCH, **sample_kwargs):
    """n samples as uint8 (N, C, H, W); a conditional model gets labels[i] for sample i."""
    model.eval()
    chunks = []
    for start in tqdm(range(0, n, batch_size), desc="sampling", leave=False, file=sys.stderr, disable=None):
        count = min(batch_size, n - start)
        if labels is not None:
            sample_kwargs["labels"] = labels[start:start + count]
        chunks.append(quantize(model.sample(count, generator, **sample_kwargs)))
    return torch.cat(chunks)


class SampleQuality:
    """Metrics of a model's samples against fixed real images (the validation split), for any extractor.

    Calling it generates `n_samples` images (labels drawn in the real images' class proportions for a
    conditional model), from a generator seeded by `seed` so successive calls differ only by the weights.
    """

    def __init__(self, extractors, real_images, real_labels, n_samples=None, seed=0, sample_kwargs=None):
        self.extractors, self.real_labels, self.seed = extractors, real_labels, seed
        self.n_samples = n_samples or len(real_images)
        self.sample_kwargs = sample_kwargs or {}
        self.real = [(e, e(real_images, desc=f"{e.kind} features of real images")) for e in extractors]
        self.metric = extractors[0].names[0]   # what Best is chosen on when the model selects by it

    def __call__(self, model, device="cpu"):
        was_training = model.training
        generator = torch.Generator(device).manual_seed(self.seed)
        conditional = getattr(model, "conditional", False)
        labels = matched_labels(self.real_labels, self.n_samples, torch.Generator().manual_seed(self.seed))
        fake = generate(model, self.n_samples, generator, labels.to(device) if conditional else None,
                        **self.sample_kwargs).cpu()
        metrics = {}
        for extractor, real_features in self.real:
            fake_features = extractor(fake, desc=f"{extractor.kind} features of samples", cache=False)
            warn_about_sizes(len(fake_features), len(real_features))
            fd_name, kid_name = extractor.names
            metrics[fd_name] = frechet_distance(*statistics(fake_features), *statistics(real_features))
            metrics[kid_name], metrics[kid_name + "_std"] = kernel_inception_distance(fake_features, real_features)
            if conditional and extractor.kind == "evaluator":
                metrics["accuracy_eval"] = accuracy(extractor.classifier, fake, labels)
        model.train(was_training)
        return metrics


def format_metrics(metrics):
    return " ".join(f"{k} {v:.5g}" for k, v in metrics.items() if not k.endswith("_std"))


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def add_metric_flags(parser):
    """The feature flags shared by fid.py, random_generation.py --fid and train_script.py --fid-every."""
    parser.add_argument("--fid-features", nargs="+", choices=("inception", "evaluator", "auto"),
                        default=["inception"],
                        help="inception: FID/KID (needs pytorch-fid's weights); evaluator: FD_eval/KID_eval and the "
                             "class accuracy of conditional samples, from `fid.py train-evaluator`; auto: inception "
                             "when its weights are here, else evaluator, never a download (default: %(default)s)")
    parser.add_argument("--inception-weights", default=None,
                        help=f"pytorch-fid's {FID_WEIGHTS_NAME} (default: the torch hub cache, downloaded if absent)")
    parser.add_argument("--evaluator", default=None,
                        help="evaluator checkpoint (default: models/Evaluator_<data>_<size>.pth)")


def resolve_features(kinds, inception_weights_file=None):
    """'auto' becomes 'inception' when the weight file is here (--inception-weights or the torch hub cache),
    else 'evaluator'; the other kinds stay as they are."""
    present = inception_weights_file is not None or hub_weights_file().is_file()
    return [("inception" if present else "evaluator") if kind == "auto" else kind for kind in kinds]


def extractors_from_args(args, data, image_size, device="cpu", models_dir="models"):
    kinds = resolve_features(args.fid_features, args.inception_weights)
    evaluator_file = args.evaluator or evaluator_path(data, image_size, models_dir)
    if "evaluator" in kinds and not Path(evaluator_file).is_file():   # say the exact command that makes it
        out = "" if Path(evaluator_file) == evaluator_path(data, image_size) else f" --out {evaluator_file}"
        where = f" (or put pytorch-fid's weights at {hub_weights_file()} for FID)" if "auto" in args.fid_features else ""
        raise UserError(f"no evaluator at '{evaluator_file}' for the sample-quality metric; train it first: "
                        f"python fid.py train-evaluator --data {data} --image-size {image_size}{out}{where}")
    return [make_extractor(kind, args.inception_weights, evaluator_file, device) for kind in kinds]


def features_or_stats(path, extractor, image_size):
    """A folder's features (N, D), or the (mu, sigma) of a .npz statistics file."""
    if str(path).endswith(".npz"):
        with np.load(path) as f:
            return None, (f["mu"], f["sigma"])
    channels = extractor.image_shape[0] if extractor.image_shape else 3
    data = common.load_data(str(path), image_size, channels)
    features = extractor(data.images, desc=f"features of {path}")
    return features, statistics(features)


def compare(argv):
    parser = argparse.ArgumentParser(prog="fid.py", description="FID and KID between two image folders or .npz "
                                     "statistics; or `fid.py train-evaluator --help`", allow_abbrev=False)
    parser.add_argument("paths", nargs="+", help="two folders or .npz files; one folder with --save-stats")
    parser.add_argument("--save-stats", default=None, help="write the folder's mu and sigma (pytorch-fid's .npz)")
    parser.add_argument("--features", choices=("inception", "evaluator"), default="inception")
    parser.add_argument("--image-size", type=int, default=24,
                        help="folders are first resized to SxS as training does, so real and generated images go "
                             "through the same pipeline (default: 24; 299 feeds Inception its native size)")
    parser.add_argument("--inception-weights", default=None, help=f"pytorch-fid's {FID_WEIGHTS_NAME}")
    parser.add_argument("--evaluator", default=None, help="with --features evaluator (default: "
                        "models/Evaluator_<second folder>_<size>.pth)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    args = parser.parse_args(argv)
    if len(args.paths) != (1 if args.save_stats else 2) or (args.save_stats and args.paths[0].endswith(".npz")):
        parser.error("give two paths, or one folder and --save-stats FILE")
    for path in args.paths:
        if not Path(path).exists():
            raise UserError(f"'{path}' does not exist; give a folder of images or a .npz statistics file")
    device = common.pick_device(args.device)
    evaluator_file = args.evaluator or evaluator_path(args.paths[-1], args.image_size)
    extractor = make_extractor(args.features, args.inception_weights, evaluator_file, device)
    results = [features_or_stats(p, extractor, args.image_size) for p in args.paths]
    if args.save_stats:
        features, (mu, sigma) = results[0]
        np.savez_compressed(args.save_stats, mu=mu, sigma=sigma)
        print(f"wrote {args.save_stats}: mu and sigma of {len(features)} images")
        return
    fd_name, kid_name = extractor.names
    (f1, stats1), (f2, stats2) = results
    if f1 is not None and f2 is not None:
        warn_about_sizes(len(f1), len(f2))
    print(f"{fd_name} {frechet_distance(*stats1, *stats2):.4f}")
    if f1 is not None and f2 is not None:
        kid, kid_std = kernel_inception_distance(f1, f2)
        print(f"{kid_name} {kid:.5f} std {kid_std:.5f}")


def train_evaluator_cli(argv):
    parser = argparse.ArgumentParser(prog="fid.py train-evaluator", description="Train the offline evaluator "
                                     "(a small CNN classifier) on a dataset's own classes", allow_abbrev=False)
    parser.add_argument("--data", default="shapes", help="a folder with one sub-folder per class, or 'shapes'")
    parser.add_argument("--image-size", type=int, default=24, help="the size the generative models use (default: 24)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None)
    parser.add_argument("--epochs", type=int, default=15, help="(default: 15)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak of a one-cycle schedule (default: 2e-3)")
    parser.add_argument("--width", type=int, default=32, help="channels of the first stage (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="the train/val split's seed, as train_script.py's")
    parser.add_argument("--out", default=None, help="default: models/Evaluator_<data>_<size>.pth")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    args = parser.parse_args(argv)
    data = common.load_data(args.data, args.image_size, args.channels)
    started = time.perf_counter()
    net, val_accuracy = train_evaluator(data, args.epochs, args.batch_size, args.lr, args.width, args.seed,
                                        common.pick_device(args.device), log=lambda line: print(line, flush=True))
    out = Path(args.out or evaluator_path(args.data, args.image_size))
    save_evaluator(net, data, val_accuracy, args.seed, out)
    print(f"wrote {out}: validation accuracy {val_accuracy:.4f} on {len(data.images) - int(0.8 * len(data.images))} "
          f"images, {len(data.class_names)} classes, {time.perf_counter() - started:.0f}s")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-evaluator"]:
        train_evaluator_cli(argv[1:])
    else:
        compare(argv)


if __name__ == "__main__":
    common.run_cli(main)
