"""The offline evaluator: a small CNN classifier of the dataset's own classes (or, for multi-label data, of its
labels), which needs no download; and the layout evaluator, a small per-pixel classifier of the labels.

The evaluator's pooled features give a Fréchet distance reported as FD_eval (never called FID: it is not
comparable with published numbers), and its predictions the accuracy of conditional samples: the class
accuracy, or for multi-hot labels the iCLEVR evaluator's: of the k labels an image was asked to hold, how
many are among the k the classifier rates highest, summed over the images and divided by the labels asked for.
The layout evaluator reads a layout off an image; its mean IoU against the layouts samples were asked for,
beside its mean IoU on real validation images (the ceiling), measures layout-conditional models.
It lives at models/Evaluator_<data folder name>_<size>.pth; `fid.py train-evaluator` makes it, and
fid.extractors_from_args trains it there with the same defaults the first time a metric needs it.

An evaluator that classifies no better than chance has learnt nothing of the classes: its features may
barely depend on the image, and then FD_eval is near 0 for any samples, noise included. Such an
evaluator is flagged when trained, refused for choosing Best, and warned about when merely reported.
"""
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import image_data
from common import UserError

# validation accuracy <= 1/K + CHANCE_MARGIN (K classes) counts as chance: the margin covers the luck of a
# small validation split, so an evaluator must beat guessing by a clear step before it may choose Best
CHANCE_MARGIN = 0.05


@dataclasses.dataclass
class Training:
    """How `fid.py train-evaluator` trains (these are its flags), and so how the evaluator is trained on first need."""
    epochs: int = common.option(15, "passes over the train split")
    batch_size: int = common.option(64, "images per step")
    lr: float = common.option(2e-3, "peak learning rate of Adam's one-cycle schedule")
    width: int = common.option(32, "channels of the first conv stage; the next two have 2w and 4w")
    seed: int = common.option(0, "seeds the weights and the 80/20 train/val split, which is train_script.py's "
                                 "split at the same seed")


class Evaluator(nn.Module):
    """Three conv stages (w, 2w, 4w channels, two 3x3 convs each) -> global average pool -> linear.

    The pooled 4w-d vector is the feature for FD_eval; the linear layer gives class logits.
    """

    def __init__(self, image_shape, num_classes, width=32, task="class"):
        super().__init__()
        self.image_shape, self.num_classes, self.width, self.task = tuple(image_shape), num_classes, width, task

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


def train_command(data, image_size, channels, out, epochs=None):
    """The `fid.py train-evaluator` command that writes the evaluator for `data` at `out` (defaults but `epochs`)."""
    command = f"python fid.py train-evaluator --data {data} --image-size {image_size} --channels {channels}"
    if Path(out) != evaluator_path(data, image_size):
        command += f" --out {out}"
    return command + (f" --epochs {epochs}" if epochs else "")


def top_labels(logits, multi_hot):
    """(B, K) bool: the labels among the k highest logits of each image, k the labels it was asked to hold."""
    k = multi_hot.sum(1).long()
    ranks = logits.argsort(dim=1, descending=True).argsort(dim=1)     # rank of each label's logit, 0 = highest
    return ranks < k[:, None]


def label_hits(logits, multi_hot):
    """For each image asked to hold k labels: how many of them are among the k highest logits. (B,) counts."""
    return (top_labels(logits, multi_hot) & (multi_hot > 0)).sum(1)


@torch.no_grad()
def logits(net, images, batch_size=256):
    """The evaluator's logits for uint8 images (N, C, S, S), in batches: (N, classes or labels)."""
    net.eval()
    return image_data.in_batches(net, images, batch_size)


def accuracy(net, images, targets, batch_size=256):
    """Class accuracy for class indices (N,); for multi-hot labels (N, K), the hits of `label_hits` over all
    images divided by the labels asked for (the iCLEVR evaluator's accuracy)."""
    scores = logits(net, images, batch_size)
    if targets.dim() == 1:
        return int((scores.argmax(1) == targets).sum()) / len(targets)
    return int(label_hits(scores, targets).sum()) / int(targets.sum())


def chance_accuracy(data):
    """What guessing scores: 1/K classes; for labels, a random top k holds each asked label with chance k/K."""
    if data.multilabels is None:
        return 1 / len(data.class_names)
    k = data.multilabels.sum(1).double()
    return float((k * k).sum() / (k.sum() * data.multilabels.shape[1]))


def require_classes(data):
    if data.multilabels is None and len(data.class_names) < 2:
        raise UserError(f"the evaluator is a classifier and needs at least 2 classes, but '{data.source}' has one; "
                        "put the images in one sub-folder per class")


def train_evaluator(data, device="cpu", log=print, **settings):
    """Train on the train split (the same 80/20 split as the models), report validation accuracy.

    `settings` are fields of Training (epochs, batch_size, lr, width, seed); the others keep its defaults.
    """
    require_classes(data)
    t = Training(**settings)
    common.seed_everything(t.seed)
    train_idx, val_idx = image_data.split_indices(len(data.images), t.seed)
    multi_label = data.multilabels is not None   # sigmoid outputs and binary cross-entropy, one per label
    targets = data.multilabels.float() if multi_label else data.labels
    names = data.label_names if multi_label else data.class_names
    net = Evaluator(data.image_shape, len(names), t.width, "labels" if multi_label else "class").to(device)
    loss_fn = F.binary_cross_entropy_with_logits if multi_label else F.cross_entropy
    optimizer = torch.optim.Adam(net.parameters(), lr=t.lr)
    steps = t.epochs * math.ceil(len(train_idx) / t.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, t.lr, total_steps=steps)
    shuffle_rng = torch.Generator().manual_seed(t.seed)
    for epoch in range(1, t.epochs + 1):
        started, total = time.perf_counter(), 0.0
        net.train()
        for x, y in image_data.iterate_batches(data.images[train_idx], targets[train_idx], t.batch_size,
                                               shuffle_rng, flip=True):
            loss = loss_fn(net(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(x)
        val_accuracy = accuracy(net.cpu(), data.images[val_idx], targets[val_idx])
        net.to(device)
        log(f"epoch {epoch} train_loss {total / len(train_idx):.4g} val_accuracy {val_accuracy:.4f} "
            f"time {time.perf_counter() - started:.1f}s")
    return net.cpu().eval(), val_accuracy


def near_chance(val_accuracy, chance):
    return val_accuracy <= chance + CHANCE_MARGIN


def save_evaluator(net, data, val_accuracy, seed, path, epochs=None):
    """Write the checkpoint, which records its validation accuracy, chance and whether it is near it;
    returns it."""
    chance = chance_accuracy(data)
    names = data.label_names if net.task == "labels" else data.class_names
    ckpt = {"kind": "genlab evaluator", "task": net.task, "image_shape": list(net.image_shape),
            "class_names": list(names), "width": net.width, "data": data.source, "seed": seed, "epochs": epochs,
            "val_accuracy": val_accuracy, "chance": chance, "near_chance": near_chance(val_accuracy, chance),
            "state": net.state_dict()}
    common.save_checkpoint(ckpt, path)
    return ckpt


def chance_problem(ckpt, path):
    """None for an evaluator that beats chance, else what is wrong and the command that retrains it."""
    k, val_accuracy = len(ckpt["class_names"]), ckpt["val_accuracy"]
    chance = ckpt.get("chance", 1 / k)
    if not near_chance(val_accuracy, chance):   # from the accuracy, so evaluators saved before the flag count too
        return None
    channels, size = ckpt["image_shape"][0], ckpt["image_shape"][1]
    longer = 2 * (ckpt.get("epochs") or Training().epochs)   # twice what it had (the default, if not recorded)
    return (f"the evaluator '{path}' has validation accuracy {val_accuracy:.3f} on {k} classes, at or below "
            f"chance {chance:.3f} + {CHANCE_MARGIN}: its features may barely depend on the image, so "
            f"FD_eval can be near 0 even for noise; train it longer or on more images per class: "
            f"{train_command(ckpt['data'], size, channels, path, longer)}")


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_evaluator(path, for_selection=False):
    """The evaluator and its checkpoint. One at chance is refused `for_selection` (choosing Best on FD_eval),
    and only warned about when its numbers are merely reported."""
    ckpt = common.load_checkpoint(path) if Path(path).is_file() else None
    if ckpt is None:
        raise UserError(f"no evaluator at '{path}'; train one: python fid.py train-evaluator --data DATA "
                        "--image-size S (with the model's data and size), or pass --evaluator PATH")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "genlab evaluator":
        raise UserError(f"'{path}' is not an evaluator made by `fid.py train-evaluator`")
    problem = chance_problem(ckpt, path)
    if problem and for_selection:
        raise UserError(f"refusing to choose Best by FD_eval: {problem}")
    if problem:
        warn(problem)
    net = Evaluator(ckpt["image_shape"], len(ckpt["class_names"]), ckpt["width"], ckpt.get("task", "class"))
    net.load_state_dict(ckpt["state"])
    return net.eval(), ckpt


def train_on_first_need(path, data, image_size, dataset=None, channels=None, device="cpu"):
    """Train the evaluator a metric needs with train-evaluator's defaults, and save it at `path` for next time.

    `dataset` is `data` already loaded (image_data.ImageData), else it is loaded here with `channels`.
    """
    if dataset is None:
        dataset = image_data.load_data(data, image_size, channels)
    require_classes(dataset)
    print(f"# no evaluator at {path}: training one "
          f"({train_command(data, image_size, dataset.image_shape[0], path)})", flush=True)
    started, defaults = time.perf_counter(), Training()
    net, val_accuracy = train_evaluator(dataset, device, log=lambda line: print(line, file=sys.stderr))
    save_evaluator(net, dataset, val_accuracy, defaults.seed, path, defaults.epochs)
    print(f"wrote {path}: validation accuracy {val_accuracy:.4f}, {time.perf_counter() - started:.0f}s",
          file=sys.stderr, flush=True)
