"""Differentiable augmentation of what a GAN's discriminator sees (Zhao et al. 2020, "Differentiable Augmentation
for Data-Efficient GAN Training"; DiffAugment).

On a few thousand images D memorises the training set: D(x) on training images climbs away from D(x) on
held-out ones, its verdicts stop carrying information about the data distribution, and G stalls. DiffAugment
shows D only augmented images, T(x) for real x and T(G(z)) for generated ones, in both D's and G's updates.
Because the same random T meets both, G is not asked to produce augmented images: it matches p_data when
T(G(z)) matches T(x) in distribution for these T. G learns through T, so each transform is differentiable
in the image (only its random parameters are not).

The policies of `--augment`, as in the paper, on images in [-1, 1] (S x S), one random draw per image:
    color        brightness   x + b                    b ~ U(-1/2, 1/2)
                 saturation   m_px + s (x - m_px)      s ~ U(0, 2),     m_px the mean over channels at each pixel
                 contrast     m + c (x - m)            c ~ U(1/2, 3/2), m the image's mean
    translation  x shifted by (dy, dx), each an integer ~ U{-S/8, ..., S/8}; pixels shifted in are 0
    cutout       0 on a square of side S/2 centred on a uniform pixel (the part inside the image)

With ADA (Karras et al. 2020, "Training Generative Adversarial Networks with Limited Data"), each of these five
transforms applies to each image with probability p, which the GAN adapts during training; DiffAugment is p = 1.
"""
import torch
import torch.nn.functional as F

from common import UserError


# -- the transforms, given their parameters (one per image) ----------------------------------------------------

def brightness(x, b):
    """x + b: b (B,) added to every pixel of image i."""
    return x + b.view(-1, 1, 1, 1)


def saturation(x, s):
    """m_px + s (x - m_px), m_px the mean over channels at each pixel: s = 0 makes image i grey, s = 1 leaves it."""
    m_px = x.mean(dim=1, keepdim=True)                                    # (B, 1, H, W)
    return m_px + s.view(-1, 1, 1, 1) * (x - m_px)


def contrast(x, c):
    """m + c (x - m), m the mean of image i over channels and pixels."""
    m = x.mean(dim=(1, 2, 3), keepdim=True)                               # (B, 1, 1, 1)
    return m + c.view(-1, 1, 1, 1) * (x - m)


def translate(x, shift):
    """out[i, :, r, c] = x[i, :, r - dy_i, c - dx_i], 0 where that pixel is outside the image; shift (B, 2) holds
    (dy_i, dx_i)."""
    n, _, height, width = x.shape
    pad = int(shift.abs().max())
    padded = F.pad(x, (pad, pad, pad, pad))                               # (B, C, H + 2 pad, W + 2 pad)
    rows = torch.arange(height, device=x.device) - shift[:, :1] + pad     # (B, H): source row of each output row
    cols = torch.arange(width, device=x.device) - shift[:, 1:] + pad      # (B, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)   # (B, H, W, C) -> (B, C, H, W)


def cut_out(x, top_left, side):
    """x with 0 on the side x side square whose top-left pixel is top_left[i] = (r0, c0), clipped to the image."""
    height, width = x.shape[2:]
    rows = torch.arange(height, device=x.device) - top_left[:, :1]        # (B, H): row index inside the square
    cols = torch.arange(width, device=x.device) - top_left[:, 1:]         # (B, W)
    in_rows, in_cols = (rows >= 0) & (rows < side), (cols >= 0) & (cols < side)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])                   # (B, H, W)
    return x * keep[:, None].to(x.dtype)


# -- the random policies ---------------------------------------------------------------------------------------

def with_probability(p, drawn, identity, generator=None):
    """ADA: image i keeps its drawn parameter with probability p, else gets the identity's; p = 1 draws nothing."""
    if p >= 1:
        return drawn
    applies = torch.rand(len(drawn), generator=generator, device=drawn.device) < p
    return torch.where(applies.view(-1, *[1] * (drawn.dim() - 1)), drawn, identity)


def random_color(x, p=1.0, generator=None):
    def uniform(low, high, identity):
        drawn = low + (high - low) * torch.rand(len(x), generator=generator, device=x.device)
        return with_probability(p, drawn, identity, generator)
    x = brightness(x, uniform(-0.5, 0.5, identity=0.0))
    x = saturation(x, uniform(0, 2, identity=1.0))
    return contrast(x, uniform(0.5, 1.5, identity=1.0))


def random_translation(x, p=1.0, generator=None):
    limit = x.shape[2] // 8
    shift = torch.randint(-limit, limit + 1, (len(x), 2), generator=generator, device=x.device)
    return translate(x, with_probability(p, shift, 0, generator))


def random_cutout(x, p=1.0, generator=None):
    side = x.shape[2] // 2
    centre = torch.randint(0, x.shape[2], (len(x), 2), generator=generator, device=x.device)
    top_left = with_probability(p, centre - side // 2, -side, generator)   # identity: the square above-left of the image
    return cut_out(x, top_left, side)


POLICIES = {"color": random_color, "translation": random_translation, "cutout": random_cutout}


def parse_policy(text):
    """'color,translation,cutout' -> ('color', 'translation', 'cutout'); '' -> () (no augmentation)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in POLICIES]
    if unknown:
        raise UserError(f"unknown --augment policy {', '.join(unknown)}; choose among {', '.join(POLICIES)}, "
                        "comma-separated, or '' for none")
    return names


def diff_augment(x, policy, p=1.0, generator=None):
    """T(x): the policies in order, each with fresh random parameters per image, each transform applied with
    probability p (ADA; 1: always, DiffAugment); () is the identity."""
    for name in policy:
        x = POLICIES[name](x, p, generator)
    return x
