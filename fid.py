"""Sample quality: FID as pytorch-fid computes it, KID, and FD_eval from an evaluator that needs no download.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium") is the Fréchet distance between Gaussians fitted to the 2048-d pool3 features of the FID
InceptionV3 for real and generated images (inception.py: pytorch-fid's network, weight file and
preprocessing). KID (Binkowski et al. 2018, "Demystifying MMD GANs") is the unbiased MMD^2 with the cubic
polynomial kernel, averaged over subsets: unlike FID it is unbiased in N, so it is the number to trust for
small sets. FID is biased by N: compare FIDs only at equal N (>= 2048). Both need at least 2 images per set.

The offline evaluator (evaluator.py) is a small CNN classifier trained on the dataset's own classes. Its
features give FD_eval and KID_eval (never called FID: not comparable with published numbers), and its
predictions the class accuracy of class-conditional samples. The metric flags train it on first need.
Here: the metrics, the cached feature extractor, SampleQuality, the metric flags, and the two CLIs:

    python fid.py vis/samples/ ./flowers                    # FID and KID between two image folders (or .npz statistics)
    python fid.py ./flowers --save-stats flowers_24.npz     # cache the reference statistics (pytorch-fid's mu/sigma)
    python fid.py train-evaluator --data ./flowers          # models/Evaluator_flowers_24.pth and its val accuracy
    python fid.py train-segmenter --data objects --image-size 32   # the layout evaluator (segmenter.py)
    python fid.py vis/samples/ ./flowers --features evaluator
    python random_generation.py --model VAE --fid           # as many samples as validation images, FID and KID
    python train_script.py --model VAE --fid-every 5 --fid-samples 1000

Model contract (see README, "Writing a model"): a model with `conditional = True` accepts
`sample(n, generator, labels=LongTensor of n class indices)` and draws image i from class labels[i];
then samples are generated for the real images' labels (class proportions matched) and the evaluator
reports their class accuracy. A model with `selects_by_sample_quality = True` (no meaningful
validation loss, e.g. a GAN) has Best and early stopping chosen on the first metric of --fid-features.
"""
import dataclasses
import hashlib
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from tqdm import tqdm

import common
import image_data
import swd
from common import UserError
# the network and the evaluator moved to their own files; their names stay reachable as fid.<name>
from evaluator import (Evaluator, Training, accuracy, chance_problem, evaluator_path, load_evaluator,  # noqa: F401
                       save_evaluator, train_evaluator, train_on_first_need, warn)
from inception import (FID_WEIGHTS_NAME, FID_WEIGHTS_URL, fid_inception_v3, hub_weights_file,  # noqa: F401
                       inception_input, inception_weights, load_inception)
from segmenter import mean_iou, read_layouts, save_segmenter, segmenter_on_first_need, segmenter_path, train_segmenter

RELIABLE_N = 2048  # below this many images FID's bias in N dominates differences between models
SAMPLE_BATCH = 250


# ----------------------------------------------------------------------------------------------
# Fréchet distance and KID: pure functions of features
# ----------------------------------------------------------------------------------------------

def require_two(n, what):
    # the unbiased covariance divides by N - 1: one image gives NaN statistics (and a NaN FID), not an error
    if n < 2:
        raise UserError(f"{what} has {n} image{'' if n == 1 else 's'}; FID and KID need at least 2 images per set")


def statistics(features):
    """Mean and covariance (float64, unbiased, as np.cov) of features (N, D), N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    require_two(len(features), "the feature set")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64, as pytorch-fid.

    # d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})
    A singular product has no finite square root: retry with eps added to both diagonals.
    Numerical error leaves a small imaginary part, dropped; a large one is an error.
    N images span at most N - 1 of the D feature dimensions. With fewer images than dimensions the
    square root is taken in the span of S1 + S2, which holds the ranges of both: Q^T S1 Q and Q^T S2 Q
    have the same Tr((S1 S2)^{1/2}), exactly, and sqrtm of a 2048 x 2048 product is slow on a CPU.
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
    m = min(subset_size, N1, N2); subsets are drawn without replacement from a seeded generator (one subset, the
    whole of both sets, when m = N1 = N2: std 0).
    """
    x_all, y_all = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    d = x_all.shape[1]
    m = min(subset_size, len(x_all), len(y_all))
    if m < 2:
        raise UserError("KID needs at least 2 images in each set")
    if m == len(x_all) == len(y_all):
        # every subset is the whole of both sets in another order, and MMD^2_u does not depend on the order: all
        # subsets give the same value, so one is computed (a 100-fold saving at the usual N <= 1000)
        num_subsets = 1
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        k_xx, k_yy, k_xy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values.append(within - 2 * k_xy.mean())
    return float(np.mean(values)), float(np.std(values))


def warn_about_sizes(n1, n2, dim=RELIABLE_N):
    """Warn when the two sets differ in size, or hold fewer images than the features have dimensions (`dim`:
    2048 for Inception, 128 for the offline evaluator), where a Fréchet distance's bias in N dominates."""
    if n1 != n2:
        warnings.warn(f"the two sets differ in size ({n1} vs {n2}); Fréchet distances are biased by N, compare "
                      "only at equal N", stacklevel=2)
    if min(n1, n2) < dim:
        warnings.warn(f"{min(n1, n2)} images (< {dim}, the features' dimension): the Fréchet distance is biased "
                      "upwards at small N; compare it only at the same N, and prefer KID", stacklevel=2)


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


def make_extractor(kind, inception_weights_file=None, evaluator_file=None, device="cpu", for_selection=False):
    """'inception' or 'evaluator' features; `for_selection`: the evaluator's FD_eval will choose Best."""
    if kind == "inception":
        path = inception_weights(inception_weights_file)
        return FeatureExtractor("inception", load_inception(path, device), inception_input, path, device=device)
    net, ckpt = load_evaluator(evaluator_file, for_selection)
    return FeatureExtractor("evaluator", net.features, image_data.to_float, evaluator_file, tuple(ckpt["image_shape"]),
                            classifier=net, batch_size=256)


def quantize(images):
    """Float images in [0, 1] to uint8 as saving a PNG does (torchvision's save_image): floor(255 x + 0.5)."""
    return (images.detach().float().cpu() * 255 + 0.5).clamp(0, 255).to(torch.uint8)


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

    Calling it generates `n_samples` images, for a conditional model with the real images' conditions (drawn in
    their proportions), from a generator seeded by `seed`, so successive calls differ only by the weights.
    With the evaluator, `accuracy_eval` is the accuracy of conditional samples (the class, or the labels of
    multi-hot conditions); with `sliced_wasserstein`, `SWD` (swd.py: class-free, needs no network); with a
    `segmenter`, layout-conditional samples get `miou_eval`, the mean IoU of the layouts read off them, and
    `miou_real`, the same for the real images (the ceiling).
    """

    def __init__(self, extractors, real_images, real_labels, n_samples=None, seed=0, sample_kwargs=None,
                 segmenter=None, sliced_wasserstein=False):
        self.extractors, self.real_labels, self.seed, self.segmenter = extractors, real_labels, seed, segmenter
        self.n_samples = n_samples or len(real_images)
        require_two(len(real_images), "the real image set (the validation split)")   # before any features
        require_two(self.n_samples, "the generated set (--fid-samples)")
        # SWD pairs equal sets: the first min(N, M) of each; the real side computed once
        self.swd_pairs = min(self.n_samples, len(real_images))
        self.sliced_wasserstein = (swd.SlicedWasserstein(real_images[:self.swd_pairs], seed) if sliced_wasserstein
                                   else None)
        self.sample_kwargs = sample_kwargs or {}
        self.real = [(e, e(real_images, desc=f"{e.kind} features of real images")) for e in extractors]
        self.metric = extractors[0].names[0]   # what Best is chosen on when the model selects by it
        if segmenter is not None:
            self.miou_real = mean_iou(read_layouts(segmenter, real_images), real_labels, segmenter.num_labels)

    def __call__(self, model, device="cpu"):
        was_training = model.training
        generator = torch.Generator(device).manual_seed(self.seed)
        labels = matched_labels(self.real_labels, self.n_samples, torch.Generator().manual_seed(self.seed))
        fake = generate(model, self.n_samples, generator, labels.to(device) if model.conditional else None,
                        **self.sample_kwargs).cpu()
        metrics = {}
        for extractor, real_features in self.real:
            fake_features = extractor(fake, desc=f"{extractor.kind} features of samples", cache=False)
            metrics.update(feature_distances(extractor, fake_features, real_features))
            if model.condition in ("class", "labels") and extractor.kind == "evaluator":
                metrics["accuracy_eval"] = accuracy(extractor.classifier, fake, labels)
        if model.condition == "layout" and self.segmenter is not None:
            metrics["miou_eval"] = mean_iou(read_layouts(self.segmenter, fake), labels, self.segmenter.num_labels)
            metrics["miou_real"] = self.miou_real
        if self.sliced_wasserstein is not None:
            metrics["SWD"] = self.sliced_wasserstein(fake[:self.swd_pairs])["SWD"]
        model.train(was_training)
        return metrics


def feature_distances(extractor, fake_features, real_features):
    """The Fréchet distance and KID (with its std) of two sets of `extractor`'s features, under its metric names
    (FID/KID or FD_eval/KID_eval), after the warnings about the sets' sizes."""
    warn_about_sizes(len(fake_features), len(real_features), fake_features.shape[1])
    fd_name, kid_name = extractor.names
    kid, kid_std = kernel_inception_distance(fake_features, real_features)
    return {fd_name: frechet_distance(*statistics(fake_features), *statistics(real_features)), kid_name: kid,
            kid_name + "_std": kid_std}


def sample_quality(args, data_name, image_size, dataset, real_images, real_labels, condition, device="cpu",
                   models_dir="models", for_selection=False, n_samples=None, seed=0, sample_kwargs=None):
    """SampleQuality with --fid-features' extractors (a missing evaluator trained first) and, for a
    layout-conditional model, the layout evaluator (likewise), and SWD with --swd; `sample_kwargs` go to the
    model's sample()."""
    extractors = extractors_from_args(args, data_name, image_size, device, models_dir, dataset, for_selection)
    segmenter = None
    if condition == "layout":
        segmenter = segmenter_on_first_need(segmenter_path(data_name, image_size, models_dir), data_name, image_size,
                                            dataset, device)
    return SampleQuality(extractors, real_images, real_labels, n_samples, seed, sample_kwargs, segmenter,
                         getattr(args, "swd", False))


def format_metrics(metrics):
    return " ".join(f"{k} {v:.5g}" for k, v in metrics.items() if not k.endswith("_std"))


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

DEVICE_HELP = "where the network runs; auto: cuda, else mps, else cpu (default: %(default)s)"
INCEPTION_WEIGHTS_HELP = f"pytorch-fid's {FID_WEIGHTS_NAME} (default: the torch hub cache, downloaded if absent)"


def add_metric_flags(parser):
    """The feature flags shared by fid.py, random_generation.py --fid and train_script.py --fid-every."""
    parser.add_argument("--fid-features", nargs="+", choices=("inception", "evaluator", "auto"),
                        default=["inception"],
                        help="inception: FID/KID (needs pytorch-fid's weights); evaluator: FD_eval/KID_eval and the "
                             "class accuracy of conditional samples, from the offline evaluator; auto: inception "
                             "when its weights are here, else evaluator, never a download (default: %(default)s)")
    parser.add_argument("--inception-weights", default=None, help=INCEPTION_WEIGHTS_HELP)
    parser.add_argument("--evaluator", default=None,
                        help="evaluator checkpoint (default: models/Evaluator_<data>_<size>.pth, trained there with "
                             "`fid.py train-evaluator`'s defaults the first time it is needed)")
    parser.add_argument("--swd", action="store_true",
                        help="also the sliced Wasserstein distance of Laplacian-pyramid patches (SWD, swd.py): "
                             "needs no network, knows no classes, so it still ranks samples past FD_eval's floor")


def resolve_features(kinds, inception_weights_file=None):
    """'auto' becomes 'inception' when the weight file is here (--inception-weights or the torch hub cache),
    else 'evaluator'; the other kinds stay as they are."""
    present = inception_weights_file is not None or hub_weights_file().is_file()
    return [("inception" if present else "evaluator") if kind == "auto" else kind for kind in kinds]


def extractors_from_args(args, data, image_size, device="cpu", models_dir="models", dataset=None,
                         for_selection=False):
    """The extractors of --fid-features for the data named `data` (--data) at `image_size`.

    A missing evaluator at the default path is trained there first; `dataset`, the same data already
    loaded (image_data.ImageData), saves decoding it again. `for_selection`: the first metric chooses Best,
    so an evaluator at chance is refused for it.
    """
    kinds = resolve_features(args.fid_features, args.inception_weights)
    evaluator_file = Path(args.evaluator or evaluator_path(data, image_size, models_dir))
    if "evaluator" in kinds and not evaluator_file.is_file():
        if args.evaluator:   # a path the user typed is a typo to report, not a request to train
            raise UserError(f"--evaluator '{args.evaluator}' does not exist; leave it out to train one at "
                            f"{evaluator_path(data, image_size, models_dir)}")
        try:
            train_on_first_need(evaluator_file, data, image_size, dataset, getattr(args, "channels", None), device)
        except UserError as err:   # e.g. data with one class: with 'auto', FID is the way out
            if "auto" not in args.fid_features:
                raise
            raise UserError(f"{err} (or put pytorch-fid's weights at {hub_weights_file()} for FID)") from err
    return [make_extractor(kind, args.inception_weights, evaluator_file, device, for_selection and i == 0)
            for i, kind in enumerate(kinds)]


def compare(argv):
    parser = common.ArgumentParser(prog="fid.py", description="FID and KID between two image folders or .npz "
                                   "statistics; or `fid.py train-evaluator --help`, `fid.py train-segmenter --help`")
    parser.add_argument("paths", nargs="+", help="two folders or .npz files; one folder with --save-stats")
    parser.add_argument("--save-stats", default=None,
                        help="write the one folder's mu and sigma to this .npz, pytorch-fid's format (default: none)")
    parser.add_argument("--features", choices=("inception", "evaluator"), default="inception",
                        help="inception: FID and KID; evaluator: FD_eval and KID_eval (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=24,
                        help="folders are first resized to SxS as training does, so real and generated images go "
                             "through the same pipeline (default: 24; 299 feeds Inception its native size)")
    parser.add_argument("--inception-weights", default=None, help=INCEPTION_WEIGHTS_HELP)
    parser.add_argument("--evaluator", default=None, help="the evaluator for --features evaluator (default: "
                        "models/Evaluator_<second folder>_<size>.pth)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help=DEVICE_HELP)
    args = parser.parse_args(argv)
    if len(args.paths) != (1 if args.save_stats else 2) or (args.save_stats and args.paths[0].endswith(".npz")):
        parser.error("give two paths, or one folder and --save-stats FILE")
    for path in args.paths:
        if not Path(path).exists():
            raise UserError(f"'{path}' does not exist; give a folder of images or a .npz statistics file")
    device = common.pick_device(args.device)
    evaluator_file = args.evaluator or evaluator_path(args.paths[-1], args.image_size)
    extractor = make_extractor(args.features, args.inception_weights, evaluator_file, device)
    channels = extractor.image_shape[0] if extractor.image_shape else 3
    folders = [None if p.endswith(".npz") else image_data.load_data(p, args.image_size, channels) for p in args.paths]
    for path, data in zip(args.paths, folders):   # every folder counted before any features are computed
        if data is not None:
            require_two(len(data.images), f"'{path}'")
    features = [None if data is None else extractor(data.images, desc=f"features of {path}")
                for path, data in zip(args.paths, folders)]
    stats = [npz_statistics(path) if f is None else statistics(f) for path, f in zip(args.paths, features)]
    if args.save_stats:
        np.savez_compressed(args.save_stats, mu=stats[0][0], sigma=stats[0][1])
        print(f"wrote {args.save_stats}: mu and sigma of {len(features[0])} images")
        return
    fd_name, kid_name = extractor.names
    both_folders = all(f is not None for f in features)
    if both_folders:
        warn_about_sizes(len(features[0]), len(features[1]), features[0].shape[1])
    print(f"{fd_name} {frechet_distance(*stats[0], *stats[1]):.4f}")
    if both_folders:
        kid, kid_std = kernel_inception_distance(*features)
        print(f"{kid_name} {kid:.5f} std {kid_std:.5f}")


def npz_statistics(path):
    with np.load(path) as f:
        return f["mu"], f["sigma"]


def add_data_flags(parser):
    """The data flags of train-evaluator and train-segmenter: what train_script.py's --data flags read."""
    parser.add_argument("--data", default="shapes", help="a folder with one sub-folder per class, or a built-in "
                        "dataset, shapes or objects (default: %(default)s)")
    parser.add_argument("--labels", default=None, help="a train.json of the folder's multi-hot labels (scenes.py)")
    parser.add_argument("--label-names", default=None, help="the objects.json of --labels and --layouts")
    parser.add_argument("--layouts", default=None, help="the folder's layouts: PNG maps or a boxes .json")
    parser.add_argument("--image-size", type=common.checked(int, 4), default=24,
                        help="the size the generative models use (default: %(default)s)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="1 for grey, 3 for RGB (default: 1 when every image is grey, else 3)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help=DEVICE_HELP)


def load_cli_data(args):
    return image_data.load_data(args.data, args.image_size, args.channels, labels=args.labels,
                                label_names=args.label_names, layouts=args.layouts)


def train_evaluator_cli(argv):
    parser = common.ArgumentParser(prog="fid.py train-evaluator", description="Train the offline evaluator "
                                   "(a small CNN classifier) on a dataset's own classes, or its labels")
    add_data_flags(parser)
    common.add_config_flags(parser, Training, "training")
    parser.add_argument("--out", default=None, help="where to write it (default: models/Evaluator_<data>_<size>.pth, "
                        "where the metrics look for it)")
    args = parser.parse_args(argv)
    data = load_cli_data(args)
    training = common.config_from_args(Training, args)
    started = time.perf_counter()
    net, val_accuracy = train_evaluator(data, common.pick_device(args.device), log=lambda line: print(line, flush=True),
                                        **dataclasses.asdict(training))
    out = Path(args.out or evaluator_path(args.data, args.image_size))
    ckpt = save_evaluator(net, data, val_accuracy, training.seed, out, training.epochs)
    n_val = len(image_data.split_indices(len(data.images), training.seed)[1])
    print(f"wrote {out}: validation accuracy {val_accuracy:.4f} on {n_val} images, {len(ckpt['class_names'])} "
          f"{'labels' if net.task == 'labels' else 'classes'}, {time.perf_counter() - started:.0f}s")
    problem = chance_problem(ckpt, out)
    if problem:
        warn(problem)


def train_segmenter_cli(argv):
    parser = common.ArgumentParser(prog="fid.py train-segmenter", description="Train the layout evaluator (a small "
                                   "per-pixel classifier) on a dataset's images and layouts")
    add_data_flags(parser)
    parser.add_argument("--epochs", type=common.checked(int, 1), default=15, help="passes over the train split "
                        "(default: %(default)s)")
    parser.add_argument("--out", default=None, help="where to write it (default: models/Segmenter_<data>_<size>.pth, "
                        "where the metrics look for it)")
    args = parser.parse_args(argv)
    data = load_cli_data(args)
    started = time.perf_counter()
    net, val_iou = train_segmenter(data, args.epochs, device=common.pick_device(args.device),
                                   log=lambda line: print(line, flush=True))
    out = Path(args.out or segmenter_path(args.data, args.image_size))
    save_segmenter(net, data, val_iou, out)
    print(f"wrote {out}: validation mean IoU {val_iou:.4f}, {time.perf_counter() - started:.0f}s")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-evaluator"]:
        train_evaluator_cli(argv[1:])
    elif argv[:1] == ["train-segmenter"]:
        train_segmenter_cli(argv[1:])
    else:
        compare(argv)


if __name__ == "__main__":
    common.run_cli(main)
