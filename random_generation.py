"""Sample from a trained model: `python random_generation.py --model VAE` -> vis/random_images_VAE.png.

The model is rebuilt from its checkpoint alone (models/Best_<MODEL>.pth unless --checkpoint).
For the autoencoders this is decoder(z) with z ~ N(0, I); a plain AE's codes were never shaped
like N(0, I), which is why its samples are mostly noise and the VAE's are not.

Conditional models draw for `--class-label`, for each label set of a test.json (`--labels`, one image per
entry in the file's order, 8 a row) or for each layout map (`--layouts`); see scenes.py for the formats.

`--fid` then measures the samples against the checkpoint's validation split (see fid.py): as many samples as
validation images, for the validation images' conditions, both sets quantised to uint8 and preprocessed alike;
prints FID and KID (or FD_eval, KID_eval and the accuracy of conditional samples with `--fid-features
evaluator`). Without --fid-features it measures with the features the run was trained with (`auto` for the GAN:
FID if the Inception weights are here, else the offline evaluator). With --labels it also prints the accuracy
of the samples drawn for the file's label sets, and with --layouts their mean IoU (the evaluators of fid.py).
One more line is the memorisation check of the picture's --n samples (memorisation.py): how many
lie closer to a training image than 95% of validation images do.
"""
from pathlib import Path

import torch
from PIL import Image

import common
import fid
import memorisation
import scenes
from common import UserError
from registry import MODELS, checkpoint_data, load_model
from segmenter import mean_iou, read_layouts


def main():
    parser = common.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, choices=list(MODELS), help="which model's checkpoint to sample")
    parser.add_argument("--checkpoint", default=None, help="the checkpoint (default: models/Best_<MODEL>.pth)")
    parser.add_argument("--n", type=common.checked(int, 1), default=64, help="how many images (default: 64)")
    parser.add_argument("--seed", type=common.checked(int, 0), default=0,
                        help="seeds the noise, so the same seed gives the same picture (default: 0)")
    parser.add_argument("--out", default=None,
                        help="the picture, .png or .jpg (default: vis/random_images_<MODEL>.png)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                        help="where to run the model; auto: cuda, else mps, else cpu (default: auto)")
    g = parser.add_argument_group("sampler options (for models that take them: see each model's sample_options)")
    g.add_argument("--sampler", default=None, help="diffusion: ddim, dpmpp or ddpm (default: ddim)")
    g.add_argument("--steps", type=common.checked(int, 1), default=None,
                   help="network evaluations of the sampler (default: the model's, e.g. 50 for DDIM)")
    g.add_argument("--eta", type=common.checked(float, 0), default=None,
                   help="DDIM noise: 0 deterministic, 1 DDPM-like (default: the model's)")
    g.add_argument("--class-label", default=None,
                   help="a class name or index of the training data: every image of that class")
    g.add_argument("--labels", default=None, help="a test.json (a list of label-name lists): one image per entry, "
                   "for a model conditioned on labels")
    g.add_argument("--layouts", default=None, help="a layout map (PNG) or a folder of them: one image per map, "
                   "for a model conditioned on layouts")
    g.add_argument("--guidance", type=common.checked(float), default=None,
                   help="classifier-free guidance weight w; 1: the conditional model alone (default: 1)")
    g.add_argument("--guidance-interval", type=common.checked(float), nargs=2, metavar=("LO", "HI"), default=None,
                   help="guidance only at noise levels sigma in (LO, HI], the conditional model alone elsewhere "
                        "(Kynkaanniemi et al. 2024; EDM's sigma: sqrt((1 - ab_t) / ab_t), or t / (1 - t) for flow); "
                        "e.g. 0.28 5.42 (default: every level)")
    parser.add_argument("--fid", action="store_true", help="also report FID and KID against the validation images "
                        "(or FD_eval, KID_eval: with the run's own --fid-features unless given)")
    fid.add_metric_flags(parser)
    parser.set_defaults(fid_features=None)   # None: the features the checkpoint was trained with (see below)
    args = parser.parse_args()
    out = Path(args.out or f"vis/random_images_{args.model}.png")
    if out.suffix.lower() not in Image.registered_extensions():
        raise UserError(f"--out '{out}' has no picture extension PIL can write; end it in .png or .jpg")
    device = common.pick_device(args.device)
    model, ckpt = load_model(args.checkpoint or f"models/Best_{args.model}.pth", args.model, device)
    if not model.generates:
        raise UserError(f"'{args.checkpoint or f'models/Best_{args.model}.pth'}' holds a model that does not "
                        "generate (an autoencoder stage); sample from the run's generative checkpoint")
    model.eval()
    options = sample_options(model, ckpt, args, device)
    common.output_dir(out.parent, "--out")
    n = len(options["labels"]) if "labels" in options else args.n
    images = model.sample(n, torch.Generator(device).manual_seed(args.seed), **options)
    path = common.save_image_grid(images.cpu(), out)
    print(f"wrote {path}")
    if args.fid:
        report_sample_quality(model, ckpt, args, device, images, options)


def class_index(label, names):
    """A --class-label given as a class name or as an index into the checkpoint's class names."""
    if label in names:
        return names.index(label)
    if label.isdigit() and int(label) < len(names):
        return int(label)
    raise UserError(f"unknown --class-label '{label}'; the classes are: "
                    + ", ".join(f"{i} {name}" for i, name in enumerate(names)))


def flag_name(option):
    """A sample option's command-line name: guidance_interval -> guidance-interval."""
    return option.replace("_", "-")


def sample_options(model, ckpt, args, device):
    """The sampler flags that were given, as keywords of model.sample; an error for one it does not take."""
    options = {k: getattr(args, k) for k in ("sampler", "steps", "eta", "guidance", "guidance_interval")
               if getattr(args, k) is not None}
    for key in options:
        if key not in model.sample_options:
            raise UserError(f"--{flag_name(key)} does not apply to the {args.model} model; it takes "
                            + (", ".join(f"--{flag_name(k)}" for k in model.sample_options) or "no sampler options"))
    if args.guidance is not None and not model.conditional:
        raise UserError(f"--guidance needs a conditional model; this {args.model} model is not (trained on one "
                        "class, or unconditional)")
    for flag, value, kind in (("--class-label", args.class_label, "class"), ("--labels", args.labels, "labels"),
                              ("--layouts", args.layouts, "layout")):
        if value is not None and model.condition != kind:
            raise UserError(f"{flag} needs a model conditioned on {kind if kind != 'class' else 'classes'}; this "
                            f"{args.model} model takes {model.condition or 'no condition'}")
    names = list(ckpt["class_names"])
    if args.class_label is not None:
        options["labels"] = torch.full((args.n,), class_index(args.class_label, names), dtype=torch.long)
    elif args.labels is not None:
        options["labels"] = scenes.read_test_labels(args.labels, names)
    elif args.layouts is not None:
        options["labels"] = scenes.read_layout_maps(args.layouts, ckpt["image_shape"][1], len(names))
    if "labels" in options:
        options["labels"] = options["labels"].to(device)
    return options


def measure(model, ckpt, args, device, options, drawn=None):
    """Sample quality with the sampler `options` against the checkpoint's own validation split (same data, size,
    channels and seed): fid.SampleQuality's metrics, and for images `drawn` for args.labels or args.layouts (those
    in options["labels"]) their score against what was asked, as file_accuracy_eval or file_miou_eval.
    Returns (metrics, quality, (data, train indices, validation indices))."""
    options = dict(options)
    asked = options.pop("labels", None)
    data_name, size = ckpt["train_args"]["data"], ckpt["image_shape"][1]
    args.fid_features = args.fid_features or ckpt["train_args"].get("fid_features", ["inception"])
    data, train_idx, val_idx = checkpoint_data(ckpt)
    conditions = data.conditions(model.condition or "class")[0]
    quality = fid.sample_quality(args, data_name, size, data, data.images[val_idx], conditions[val_idx],
                                 model.condition, device, seed=args.seed, sample_kwargs=options)
    metrics = quality(model, device)
    if asked is not None and (args.labels is not None or args.layouts is not None):
        fake = fid.quantize(drawn)
        evaluator = next((e for e, _ in quality.real if e.kind == "evaluator"), None)
        if args.labels is not None and evaluator is not None:
            metrics["file_accuracy_eval"] = fid.accuracy(evaluator.classifier, fake, asked.cpu())
        if args.layouts is not None:
            metrics["file_miou_eval"] = mean_iou(read_layouts(quality.segmenter, fake), asked.cpu(),
                                                 quality.segmenter.num_labels)
    return metrics, quality, (data, train_idx, val_idx)


def report_sample_quality(model, ckpt, args, device, images, options):
    """Prints measure()'s metrics, the score on a file's labels or layouts, and the memorisation check."""
    metrics, quality, (data, train_idx, val_idx) = measure(model, ckpt, args, device, options, images)
    on_file = {k: metrics.pop(k) for k in ("file_accuracy_eval", "file_miou_eval") if k in metrics}
    print(f"{fid.format_metrics(metrics)} ({len(val_idx)} samples vs the {len(val_idx)} "
          f"validation images of {ckpt['train_args']['data']} at {ckpt['image_shape'][1]}x{ckpt['image_shape'][1]})")
    if "file_accuracy_eval" in on_file:
        print(f"accuracy_eval {on_file['file_accuracy_eval']:.4f} on the {len(images)} label sets of {args.labels}")
    if "file_miou_eval" in on_file:
        print(f"miou_eval {on_file['file_miou_eval']:.4f} on the {len(images)} layouts of {args.layouts} (real "
              f"validation images: {quality.miou_real:.4f})")
    evaluator = next((e for e, _ in quality.real if e.kind == "evaluator"), None)
    fake = fid.quantize(images)
    print(memorisation.summary(memorisation.check(fake, data.images[train_idx], data.images[val_idx], evaluator)))


if __name__ == "__main__":
    common.run_cli(main)
