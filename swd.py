"""Sliced Wasserstein distance between image sets on Laplacian-pyramid patches (SWD; Karras et al. 2018,
"Progressive Growing of GANs for Improved Quality, Stability, and Variation", section 5 and appendix D).

FD_eval reads images through a classifier of the data's own classes, so it stops ranking models once their samples
have each class's colour and rough shape (about where real images score against each other: the floor). SWD
needs no trained network and knows no classes: it compares the local structure of the two sets, edges and
textures at each scale. For each level of a Laplacian pyramid (resolutions R, R/2, ... down to 16; the last level
is the blurred image itself), 32 random 7x7 neighbourhoods per image; each set's descriptors are normalised per
channel to zero mean and unit std (so a global shift or scaling of colour does not count: FD_eval sees that); then
SWD = mean over 4 x 128 random unit directions d of W1(<a, d>, <b, d>), the Wasserstein-1 distance of the two
sets' 1-D projections (equal sizes: sort both, mean |difference|). Reported x 1e3, per level and their mean.
Like FID it is biased by the number of images (two real sets score above 0, the more so the smaller they are):
compare SWDs only at equal N and with real images against real ones beside them.

    python train_script.py --model GAN --fid-every 2 --fid-features evaluator --swd   # SWD beside FD_eval each time
    python random_generation.py --model GAN --fid --fid-features evaluator --swd       # a checkpoint's samples
    python report.py --evaluators models/Evaluator_flowers_32.pth   # training images against validation: the floor
"""
import numpy as np
import torch
import torch.nn.functional as F

import common

PATCH = 7               # neighbourhood side
PATCHES_PER_IMAGE = 32  # ProGAN: 128 of each of 16,384 images; here sets of a few hundred images (a validation
                        # split), where 32 rank models as 128 do at a quarter of the cost (docs/results.md)
REPEATS, DIRECTIONS = 4, 128
MIN_RESOLUTION = 16     # the pyramid's coarsest level is the smallest resolution >= 16 (at least one level)
# cv2.pyrDown's 5x5 binomial filter; reflected borders as scipy.ndimage's "mirror" mode (d c b | a b c d | c b a)
BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
GAUSSIAN = torch.outer(BINOMIAL, BINOMIAL) / 256


def blur(x, kernel):
    """Depthwise 5x5 filter with reflected borders, (B, C, H, W) -> same."""
    c = x.shape[1]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel.to(x).expand(c, 1, 5, 5), groups=c)


def pyramid_down(x):
    return blur(x, GAUSSIAN)[:, :, ::2, ::2]                           # (B, C, ceil(H/2), ceil(W/2))


def pyramid_up(x, size):
    """Zeros between the pixels, then the filter x 4 (each output pixel gets a quarter of the taps); cropped to
    `size` for odd sides."""
    b, c, h, w = x.shape
    up = x.new_zeros(b, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return blur(up, 4 * GAUSSIAN)[:, :, :size[0], :size[1]]


def laplacian_pyramid(images, levels):
    """[L_0, ..., L_{levels-1}]: L_i = G_i - up(G_{i+1}) with G_0 the images, G_{i+1} = down(G_i), and the last
    level G_{levels-1} itself; the images are L_0 + up(L_1 + up(...))."""
    gaussian = [images.float()]
    for _ in range(levels - 1):
        gaussian.append(pyramid_down(gaussian[-1]))
    return [g - pyramid_up(coarser, g.shape[-2:]) for g, coarser in zip(gaussian, gaussian[1:])] + [gaussian[-1]]


def resolutions(size):
    """The pyramid's resolutions for images of side `size`: size, size/2, ... >= MIN_RESOLUTION (at least one)."""
    levels = [size]
    while levels[-1] // 2 >= MIN_RESOLUTION:
        levels.append(levels[-1] // 2)
    return levels


def require_size(shape):
    """Images of `shape` (..., H, W) hold a neighbourhood, or a UserError says so."""
    if min(shape[-2:]) < PATCH:
        raise common.UserError(f"SWD takes {PATCH}x{PATCH} neighbourhoods of each image; images of "
                               f"{shape[-2]}x{shape[-1]} are too small: use --image-size {PATCH} or more, "
                               "or drop --swd")


def centres(shape, per_image, generator):
    """The centres (ys, xs) of `per_image` random PATCH x PATCH neighbourhoods of each image of `shape` (B, C, H, W),
    wholly inside it: (B, per_image, 1, 1, 1) each."""
    require_size(shape)
    b, _, h, w = shape
    r = PATCH // 2
    ys = torch.randint(r, h - r, (b, per_image, 1, 1, 1), generator=generator)
    xs = torch.randint(r, w - r, (b, per_image, 1, 1, 1), generator=generator)
    return ys, xs


def patches(level, per_image, generator):
    """`per_image` random PATCH x PATCH neighbourhoods of each image, wholly inside it: (B, C, H, W) ->
    (B per_image, C, PATCH, PATCH)."""
    ys, xs = centres(level.shape, per_image, generator)
    b, c = level.shape[:2]
    offsets = torch.arange(-(PATCH // 2), PATCH // 2 + 1)
    image = torch.arange(b)[:, None, None, None, None]
    channel = torch.arange(c)[None, None, :, None, None]
    found = level[image, channel, ys + offsets[:, None], xs + offsets]       # (B, per_image, C, PATCH, PATCH)
    return found.flatten(0, 1)


def descriptors(level, per_image, generator):
    """Neighbourhoods normalised per channel over the whole set, flattened: (B per_image, C PATCH^2)."""
    found = patches(level, per_image, generator).double()
    spread = found.std(dim=(0, 2, 3), keepdim=True, correction=0).clamp_min(1e-12)   # a flat channel stays 0
    return ((found - found.mean(dim=(0, 2, 3), keepdim=True)) / spread).flatten(1)


class SortedProjections:
    """A set a of (N, D) points projected on `repeats` x `directions` random unit directions and sorted, to compare
    other sets b of the same shape with: distance(b) = mean over the directions d of W1(<a, d>, <b, d>), the
    Wasserstein-1 distance of two equal-size empirical distributions (the sorted values paired in order, mean
    |difference|). a's side is computed once, for any number of b."""

    def __init__(self, a, generator, repeats=REPEATS, directions=DIRECTIONS):
        self.shape = a.shape
        self.directions = []
        for _ in range(repeats):
            dirs = torch.randn(a.shape[1], directions, generator=generator, dtype=a.dtype)
            self.directions.append(dirs / dirs.norm(dim=0, keepdim=True))   # (D, directions), unit columns
        self.sorted = [self.project(a, dirs) for dirs in self.directions]

    @staticmethod
    def project(x, dirs):
        return np.sort((x @ dirs).numpy(), axis=0)   # (N, directions); numpy's sort, several times torch's on the CPU

    def distance(self, b):
        if b.shape != self.shape:
            raise ValueError(f"SortedProjections compares sets of the same shape, not {tuple(self.shape)} and "
                             f"{tuple(b.shape)}")
        return float(np.mean([np.abs(a - self.project(b, dirs)).mean()
                              for a, dirs in zip(self.sorted, self.directions)]))


class SlicedWasserstein:
    """SWD x 1e3 of image sets against one real set (N, C, H, W), uint8 or float: calling it with a set of the same
    shape gives {"SWD_<res>": per level, ..., "SWD": their mean}. The real set's pyramid, descriptors and sorted
    projections are computed once (N 32 x 512 float64 values a level: 68 MB for 518 images), and each call draws
    what `swd` would draw, so every call equals `swd(real, fake, seed)`."""

    def __init__(self, real, seed=0):
        self.shape = tuple(real.shape)
        self.resolutions = resolutions(real.shape[-1])
        generator = torch.Generator().manual_seed(seed)
        self.levels = []   # per level: the generator's state for the other set's neighbourhoods, the real side
        for level in laplacian_pyramid(real, len(self.resolutions)):
            real_descriptors = descriptors(level, PATCHES_PER_IMAGE, generator)
            state = generator.get_state()
            centres(level.shape, PATCHES_PER_IMAGE, generator)   # the other set's draws come here, as in swd()
            self.levels.append((state, SortedProjections(real_descriptors, generator)))

    def __call__(self, fake):
        if tuple(fake.shape) != self.shape:
            raise common.UserError(f"SWD compares sets of the same shape, not {self.shape} and {tuple(fake.shape)}")
        result = {}
        for res, level, (state, real_side) in zip(self.resolutions, laplacian_pyramid(fake, len(self.resolutions)),
                                                  self.levels):
            generator = torch.Generator()
            generator.set_state(state)
            result[f"SWD_{res}"] = 1e3 * real_side.distance(descriptors(level, PATCHES_PER_IMAGE, generator))
        result["SWD"] = sum(result.values()) / len(self.levels)
        return result


def swd(real, fake, seed=0):
    """SWD x 1e3 between two uint8 (or float) image sets (N, C, H, W) of equal N: {"SWD_<res>": per level, ...,
    "SWD": their mean}. Deterministic in `seed`: per level, the real set's neighbourhoods are drawn, then the fake
    set's, then the directions."""
    return SlicedWasserstein(real, seed)(fake)
