"""Sample from a trained model: `python random_generation.py --model VAE` -> vis/random_images_VAE.png.

The model is rebuilt from its checkpoint alone (models/Best_<MODEL>.pth unless --checkpoint).
For the autoencoders this is decoder(z) with z ~ N(0, I); a plain AE's codes were never shaped
like N(0, I), which is why its samples are mostly noise and the VAE's are not.

`--fid` then measures the model as the seed assignment does (see fid.py): as many samples as the
checkpoint's data has validation images, class proportions matched for a conditional model, both sets
quantised to uint8 and preprocessed alike; prints FID and KID (or FD_eval, KID_eval and the class
accuracy of conditional samples with `--fid-features evaluator`). Without --fid-features it measures
with the features the run was trained with (`auto` for the GAN: FID if the Inception weights are here).
"""
import argparse
import inspect
from pathlib import Path

import torch

import common
import fid
from train_script import MODELS, checkpoint_data, load_model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--model", required=True, choices=list(MODELS))
    parser.add_argument("--checkpoint", default=None, help="default: models/Best_<MODEL>.pth")
    parser.add_argument("--n", type=int, default=64, help="how many images (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the noise, so the same seed gives the same picture")
    parser.add_argument("--out", default=None, help="default: vis/random_images_<MODEL>.png")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    g = parser.add_argument_group("sampler options (for models whose sample() takes them, e.g. diffusion)")
    g.add_argument("--sampler", default=None, help="e.g. ddpm (ancestral, T steps) or ddim")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (DDIM)")
    g.add_argument("--eta", type=float, default=None,
                   help="DDIM noise: 0 deterministic, 1 DDPM-like (the diffusion default)")
    g.add_argument("--class-label", default=None, help="a class name of the training data: every image of that class")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance weight w (1: none)")
    parser.add_argument("--fid", action="store_true", help="also report FID and KID against the validation images "
                        "(or FD_eval, KID_eval: with the run's own --fid-features unless given)")
    fid.add_metric_flags(parser)
    parser.set_defaults(fid_features=None)   # None: the features the checkpoint was trained with (see below)
    args = parser.parse_args()
    if args.n < 1:
        raise common.UserError(f"--n must be at least 1, got {args.n}")
    device = common.pick_device(args.device)
    model, ckpt = load_model(args.checkpoint or f"models/Best_{args.model}.pth", args.model, device)
    model.eval()
    options = sample_options(model, ckpt, args, device)
    images = model.sample(args.n, torch.Generator(device).manual_seed(args.seed), **options)
    path = common.save_image_grid(images.cpu(), Path(args.out or f"vis/random_images_{args.model}.png"))
    print(f"wrote {path}")
    if args.fid:
        report_sample_quality(model, ckpt, args, device)


def sample_options(model, ckpt, args, device):
    """The sampler flags that were given, as keywords of model.sample; an error for one it does not take."""
    options = {k: getattr(args, k) for k in ("sampler", "steps", "eta", "guidance") if getattr(args, k) is not None}
    if args.class_label is not None:
        if not getattr(model, "conditional", False):
            raise common.UserError(f"--class-label needs a class-conditional model; this {args.model} model is not")
        names = list(ckpt["class_names"])
        if args.class_label not in names:
            raise common.UserError(f"unknown --class-label '{args.class_label}'; the classes are: {', '.join(names)}")
        options["labels"] = torch.full((args.n,), names.index(args.class_label), dtype=torch.long, device=device)
    accepted = inspect.signature(model.sample).parameters
    for key in options:
        if key not in accepted:
            flag = "--class-label" if key == "labels" else "--" + key
            raise common.UserError(f"{flag} does not apply to the {args.model} model (its sample() does not take it)")
    return options


def report_sample_quality(model, ckpt, args, device):
    """The checkpoint's own validation split is the reference: same data, size, channels and seed."""
    data_name, size = ckpt["train_args"]["data"], ckpt["image_shape"][1]
    args.fid_features = args.fid_features or ckpt["train_args"].get("fid_features", ["inception"])
    data, _, val_idx = checkpoint_data(ckpt)
    quality = fid.SampleQuality(fid.extractors_from_args(args, data_name, size, device), data.images[val_idx],
                                data.labels[val_idx], seed=args.seed)
    print(f"{fid.format_metrics(quality(model, device))} ({len(val_idx)} samples vs the {len(val_idx)} "
          f"validation images of {data_name} at {size}x{size})")


if __name__ == "__main__":
    common.run_cli(main)
