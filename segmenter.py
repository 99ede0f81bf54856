"""The layout evaluator: a small per-pixel classifier that reads a layout (a label, or the background, at each
pixel) off an image, trained on the dataset's own images and layouts, which needs no download.

A layout-conditional model is measured by the mean IoU between the layouts its samples were asked for and what
this network reads off them, beside the mean IoU of the same network on the real validation images against
their true layouts: the ceiling, what a perfect generator would score. IoU per class c over a set of images:
|pred = c and true = c| / |pred = c or true = c|, averaged over the classes (background included) that occur.

    python fid.py train-segmenter --data objects --image-size 32    # models/Segmenter_objects_32.pth
"""
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


def conv_block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class Segmenter(nn.Module):
    """(B, C, H, W) in [0, 1] -> (B, K + 1, H, W) logits: a U-Net of three levels (w, 2w, 4w channels)."""

    def __init__(self, image_shape, num_labels, width=32):
        super().__init__()
        self.image_shape, self.num_labels, self.width = tuple(image_shape), num_labels, width
        self.down1 = conv_block(image_shape[0], width)                     # (B, w, H, W)
        self.down2 = conv_block(width, 2 * width)                          # (B, 2w, H/2, W/2)
        self.down3 = conv_block(2 * width, 4 * width)                      # (B, 4w, H/4, W/4)
        self.up2 = conv_block(6 * width, 2 * width)                        # (B, 2w, H/2, W/2)
        self.up1 = conv_block(3 * width, width)                            # (B, w, H, W)
        self.head = nn.Conv2d(width, num_labels + 1, 1)

    def forward(self, x):
        h1 = self.down1(2 * x - 1)
        h2 = self.down2(F.max_pool2d(h1, 2))
        h3 = self.down3(F.max_pool2d(h2, 2))
        h = self.up2(torch.cat([F.interpolate(h3, size=h2.shape[-2:]), h2], dim=1))
        h = self.up1(torch.cat([F.interpolate(h, size=h1.shape[-2:]), h1], dim=1))
        return self.head(h)


def segmenter_path(data, image_size, models_dir="models"):
    """Where the layout evaluator for a dataset lives: models/Segmenter_<data folder name>_<size>.pth."""
    return Path(models_dir) / f"Segmenter_{Path(str(data)).name}_{image_size}.pth"


@torch.no_grad()
def read_layouts(net, images, batch_size=256):
    """uint8 images (N, C, H, W) -> the layouts the network reads, (N, H, W) long."""
    net.eval()
    # argmax inside each batch: one batch's (B, K + 1, H, W) logits held at a time, not all N
    return image_data.in_batches(lambda x: net(x).argmax(1), images, batch_size)


def mean_iou(predicted, true, num_labels):
    """IoU of each class (0 background, 1 .. K labels) over the whole set, averaged over the classes present
    in either map."""
    predicted, true = predicted.flatten().long(), true.flatten().long()
    intersection = torch.bincount(true[predicted == true], minlength=num_labels + 1).double()
    union = (torch.bincount(predicted, minlength=num_labels + 1) + torch.bincount(true, minlength=num_labels + 1)
             ).double() - intersection
    return float((intersection[union > 0] / union[union > 0]).mean())


def train_segmenter(data, epochs=15, batch_size=64, lr=2e-3, width=32, seed=0, device="cpu", log=print):
    """Per-pixel cross-entropy on the train split (the models' 80/20 split), with random flips of image and layout
    together; returns the network and its validation mean IoU."""
    if data.layouts is None:
        raise UserError(f"'{data.source}' has no layouts to learn from; pass --layouts (see scenes.py) "
                        "or --data objects")
    common.seed_everything(seed)
    train_idx, val_idx = image_data.split_indices(len(data.images), seed)
    net = Segmenter(data.image_shape, len(data.label_names), width).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * math.ceil(len(train_idx) /
                                                                                                  batch_size))
    shuffle_rng = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        started, total = time.perf_counter(), 0.0
        net.train()
        for x, y in image_data.iterate_batches(data.images[train_idx], data.layouts[train_idx].long(), batch_size,
                                               shuffle_rng):
            mirror = torch.rand(len(x), generator=shuffle_rng) < 0.5
            x[mirror], y[mirror] = x[mirror].flip(-1), y[mirror].flip(-1)
            loss = F.cross_entropy(net(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(x)
        net.cpu()
        val_iou = mean_iou(read_layouts(net, data.images[val_idx]), data.layouts[val_idx], len(data.label_names))
        net.to(device)
        log(f"epoch {epoch} train_loss {total / len(train_idx):.4g} val_miou {val_iou:.4f} "
            f"time {time.perf_counter() - started:.1f}s")
    return net.cpu().eval(), val_iou


def save_segmenter(net, data, val_iou, path):
    common.save_checkpoint({"kind": "genlab segmenter", "image_shape": list(net.image_shape),
                            "label_names": list(data.label_names), "width": net.width, "data": data.source,
                            "val_miou": val_iou, "state": net.state_dict()}, path)


def load_segmenter(path):
    ckpt = common.load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "genlab segmenter":
        raise UserError(f"'{path}' is not a layout evaluator made by `fid.py train-segmenter`")
    net = Segmenter(ckpt["image_shape"], len(ckpt["label_names"]), ckpt["width"])
    net.load_state_dict(ckpt["state"])
    return net.eval(), ckpt


def segmenter_on_first_need(path, data_name, image_size, dataset, device="cpu"):
    """The layout evaluator at `path`, trained there first (saying so, with the equivalent command) if absent."""
    path = Path(path)
    if not path.is_file():
        out = f" --out {path}" if path != segmenter_path(data_name, image_size) else ""
        print(f"# no layout evaluator at {path}: training one (python fid.py train-segmenter --data {data_name} "
              f"--image-size {image_size}{out})", flush=True)
        net, val_iou = train_segmenter(dataset, device=device, log=lambda line: print(line, file=sys.stderr))
        save_segmenter(net, dataset, val_iou, path)
    return load_segmenter(path)[0]
