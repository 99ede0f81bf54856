"""Does a model copy its training images? Its samples' distances to the nearest training image, against the same
distances of validation images, which the model never saw.

    python random_generation.py --model GAN --fid --n 518    # one line: the share of samples that are too close
    python report.py GAN diffusion --out reports/gan_vs_diffusion   # the same in a report, with the closest pairs

A validation image's distance to its nearest training image is what "new, but from the same distribution" looks
like on this data. A sample closer to a training image than 95% of validation images are (below the 5th percentile
of their nearest-training distances) is suspiciously close. Samples from the data's own distribution give about 5%;
an exact copy of a training image has distance 0, so a model that copies its data gives up to 100%. Distances
are Euclidean, in pixels (images in [0, 1]) and, when the offline evaluator is at hand, in its features, where an
image shifted by a pixel or two is still near its original.
"""
import math
from dataclasses import dataclass

import torch

import common
import image_data

QUANTILE = 0.05     # validation's 5th percentile of nearest-training distance is the threshold
REFERENCE_CHUNK = 2048   # training images compared at a time: the float copies of a large set never all in memory


@dataclass
class Check:
    """The memorisation check in one space (pixels or features)."""
    space: str
    share: float                     # of the samples, those below the threshold
    threshold: float                 # validation's QUANTILE of nearest-training distance
    sample_distances: torch.Tensor   # (N,) each sample's distance to its nearest training image
    nearest_train: torch.Tensor      # (N,) that training image's index
    validation_distances: torch.Tensor   # (M,)


def share_below_validation(sample_distances, validation_distances, quantile=QUANTILE):
    """(share of samples strictly below the validation distances' `quantile`, that quantile)."""
    threshold = torch.quantile(validation_distances.double(), quantile).item()
    return (sample_distances < threshold).double().mean().item(), threshold


def nearest(queries, references, scale=1.0):
    """Each row of `queries` (N, D): its Euclidean distance to the nearest row of `references` (M, D), times
    `scale`, and that row's index. Any dtype in (uint8 images, float features); computed in float64."""
    queries = queries.double()
    best = torch.full((len(queries),), math.inf, dtype=torch.float64)
    best_index = torch.zeros(len(queries), dtype=torch.long)
    for start in range(0, len(references), REFERENCE_CHUNK):
        distances, index = torch.cdist(queries, references[start:start + REFERENCE_CHUNK].double()).min(dim=1)
        closer = distances < best
        best[closer], best_index[closer] = distances[closer], index[closer] + start
    return best * scale, best_index


def check(samples, train, validation, features=None):
    """The check in pixels and, with `features` (a fid.FeatureExtractor, e.g. the offline evaluator), in its
    features. Images are uint8 (N, C, H, W). Returns a list of Check."""
    spaces = [("pixels", samples.flatten(1), train.flatten(1), validation.flatten(1), 1 / 255)]
    if features is not None:
        spaces.append((f"{features.kind} features", torch.from_numpy(features(samples, cache=False)),
                       torch.from_numpy(features(train)), torch.from_numpy(features(validation)), 1.0))
    checks = []
    for space, sample_vectors, train_vectors, validation_vectors, scale in spaces:
        sample_distances, nearest_train = nearest(sample_vectors, train_vectors, scale)
        validation_distances, _ = nearest(validation_vectors, train_vectors, scale)
        share, threshold = share_below_validation(sample_distances, validation_distances)
        checks.append(Check(space, share, threshold, sample_distances, nearest_train, validation_distances))
    return checks


def summary(checks):
    """One line for stdout."""
    n = len(checks[0].sample_distances)
    parts = [f"{round(c.share * n)} ({c.share:.1%}) in {c.space}" for c in checks]
    return (f"memorisation: of {n} samples, {' and '.join(parts)} are closer to a training image than "
            f"{1 - QUANTILE:.0%} of validation images are (data-like samples: about {QUANTILE:.0%}; copies: up to 100%)")


def closest_pairs(samples, train, pixel_check, k=8):
    """A grid of the k samples nearest to a training image (top row) above those training images (bottom row)."""
    order = pixel_check.sample_distances.argsort()[:k]
    return common.comparison_grid([image_data.to_float(samples[order]),
                                   image_data.to_float(train[pixel_check.nearest_train[order]])], nrow=k)
