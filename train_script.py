"""Train any model of genlab: `python train_script.py --model VAE > log/train_VAE.out`.

The loop knows models only through MODELS. A model module provides `Config` (its flags),
`TRAIN_DEFAULTS` (its defaults for the common flags) and `Model(config, image_shape, num_classes)`
with `loss(x, y, generator) -> {"loss": ..., other terms}`. A model that needs more than one
optimiser step per batch defines `train_step(x, y, optimizers)` and `parameter_groups()`.

Each epoch prints one line to stdout (`epoch <n> train_loss <x> [<term> <x> ...] [val_loss <y> [val_<term> <y>
...]] lr <lr> time <s>s [*best*]`, the terms being the model's loss terms besides the loss, e.g. a PSNR);
the progress bar goes to stderr. models/Best_<run>.pth is written on each new best validation loss,
models/Last_<run>.pth every epoch; `--resume` continues from Last exactly where it stopped.
"""
import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common
import conv_ae
import ddpm
import fid
import gan
import latent_diffusion
import mlp_ae
import vae
from common import TrainingDiverged, UserError

MODELS = {
    "MLPAE": mlp_ae,
    "AE": conv_ae,
    "VAE": vae,
    "diffusion": ddpm,
    "GAN": gan,
    "LDM": latent_diffusion,
}

# The common flags and their defaults; a model's TRAIN_DEFAULTS override these.
COMMON_DEFAULTS = dict(epochs=20, batch_size=16, lr=1e-3, lr_decay=1.0, lr_decay_every=10, optimizer="adam",
                       momentum=0.0, weight_decay=0.0, val_every=1, patience=5, flip=False, fid_every=0,
                       adam_beta1=0.9)


def build_parser(model_name=None, add_help=True):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False, add_help=add_help,
                                     epilog=None if model_name else "`--model X --help` lists the flags of model X")
    parser.add_argument("--model", required=add_help, choices=list(MODELS), help="which model to train")
    if model_name is None:
        return parser
    module = MODELS[model_name]
    defaults = {**COMMON_DEFAULTS, **module.TRAIN_DEFAULTS}
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="shapes", help="a folder of images (class sub-folders give labels) or 'shapes', "
                   "the built-in dataset (default: shapes)")
    g.add_argument("--image-size", type=int, default=24, help="images are resized to this square size (default: 24)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 or 3 (default: 1 when every image is grayscale, else 3)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=defaults["flip"],
                   help="random horizontal flips of training images")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=defaults["epochs"], help=f"total epochs (default: {defaults['epochs']})")
    g.add_argument("--batch-size", type=int, default=defaults["batch_size"], help=f"(default: {defaults['batch_size']})")
    g.add_argument("--lr", type=float, default=defaults["lr"], help=f"learning rate (default: {defaults['lr']})")
    g.add_argument("--lr-decay", type=float, default=defaults["lr_decay"],
                   help=f"multiply the lr by this every --lr-decay-every epochs (default: {defaults['lr_decay']})")
    g.add_argument("--lr-decay-every", type=int, default=defaults["lr_decay_every"],
                   help=f"(default: {defaults['lr_decay_every']})")
    g.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default=defaults["optimizer"],
                   help=f"(default: {defaults['optimizer']})")
    g.add_argument("--momentum", type=float, default=defaults["momentum"], help="SGD momentum (default: 0, plain SGD)")
    g.add_argument("--adam-beta1", type=float, default=defaults["adam_beta1"],
                   help=f"Adam's beta1, the decay of its gradient average (default: {defaults['adam_beta1']})")
    g.add_argument("--weight-decay", type=float, default=defaults["weight_decay"], help="(default: 0)")
    g.add_argument("--val-every", type=int, default=defaults["val_every"], help="validate every N epochs (default: 1)")
    g.add_argument("--patience", type=int, default=defaults["patience"],
                   help=f"stop after this many validations without a new best (default: {defaults['patience']})")
    g.add_argument("--seed", type=int, default=0, help="seeds the split (as the NN Lab: manual_seed(0)) and training")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    g.add_argument("--resume", action="store_true", help="continue from models/Last_<run>.pth with its settings")
    g.add_argument("--run-name", default=None, help="names checkpoints and the log folder (default: the model name)")
    g.add_argument("--models-dir", default="models", help="where checkpoints go (default: models)")
    g.add_argument("--log-dir", default="log", help="TensorBoard runs go to <log-dir>/<run> (default: log)")
    g = parser.add_argument_group("sample quality (fid.py)")
    g.add_argument("--fid-every", type=int, default=defaults["fid_every"],
                   help="every N epochs (and the last) generate --fid-samples images and log FID/KID against the "
                        f"validation images; models without a meaningful val_loss select Best on it (0: off; "
                        f"default: {defaults['fid_every']})")
    g.add_argument("--fid-samples", type=int, default=0, help="(default 0: as many as validation images)")
    fid.add_metric_flags(g)
    parser.set_defaults(**module.TRAIN_DEFAULTS)   # a model may also default the metric flags (--fid-features)
    common.add_config_flags(parser, module.Config, f"{model_name} options (from {module.__name__}.py)")
    return parser


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    known, _ = build_parser(add_help=False).parse_known_args(argv)
    args = build_parser(known.model).parse_args(argv)
    args.run_name = args.run_name or args.model
    return args


def build_model(name, config, image_shape, num_classes):
    return MODELS[name].Model(config, tuple(image_shape), num_classes)


def load_model(path, expected_model=None, device="cpu"):
    """Rebuild a model from a checkpoint alone. Returns (model, checkpoint)."""
    ckpt = common.load_checkpoint(path)
    name = ckpt.get("model") if isinstance(ckpt, dict) else None
    if name not in MODELS:
        raise UserError(f"'{path}' is not a genlab checkpoint of a known model (found {name!r})")
    if expected_model is not None and name != expected_model:
        raise UserError(f"'{path}' holds a {name} model, not {expected_model}; pass --model {name} or another checkpoint")
    config = common.config_from_dict(MODELS[name].Config, ckpt["config"])
    model = build_model(name, config, ckpt["image_shape"], len(ckpt["class_names"]))
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as err:
        raise UserError(f"'{path}' does not fit the {name} model it names ({str(err).splitlines()[0]})") from err
    return model.to(device), ckpt


def checkpoint_data(ckpt, data=None):
    """The data a checkpoint was trained on (or `data` instead) at its image shape, and its split.
    Returns (ImageData, train indices, validation indices)."""
    channels, size = ckpt["image_shape"][0], ckpt["image_shape"][1]
    images = common.load_data(data or ckpt["train_args"]["data"], size, channels)
    return (images, *common.split_indices(len(images.images), ckpt["train_args"]["seed"]))


def make_optimizer(params, args):
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    optimizer_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return optimizer_cls(params, lr=args.lr, betas=(args.adam_beta1, 0.999), weight_decay=args.weight_decay)


def gradient_step(model, x, y, optimizers):
    """One optimiser step on model.loss: the step of every model that does not define its own."""
    terms = model.loss(x, y)
    optimizer = optimizers["model"]
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    return terms


@torch.no_grad()
def evaluate(model, images, labels, args, device):
    """Mean of each loss term over a set. Noise comes from a generator seeded the same at every
    validation, so the number changes only when the weights do."""
    model.eval()
    generator = torch.Generator(device).manual_seed(args.seed)
    sums, count = {}, 0
    for x, y in common.iterate_batches(images, labels, args.batch_size, shuffle=False):
        terms = model.loss(x.to(device), y.to(device), generator=generator)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(x)
        count += len(x)
    model.train()
    return {k: v / count for k, v in sums.items()}


@torch.no_grad()
def preview(model, fixed_images, device, seed):
    """What TensorBoard shows at each validation: reconstructions under originals, or samples from fixed noise."""
    model.eval()
    if hasattr(model, "reconstruct"):
        x = fixed_images.to(device)
        grid = common.comparison_grid([x, model.reconstruct(x)])
    else:
        grid = common.make_grid(model.sample(len(fixed_images), torch.Generator(device).manual_seed(seed)).cpu())
    model.train()
    return grid


def checkpoint_state(args, model, optimizers, schedulers, data, epoch, best, bad_validations, history, shuffle_rng):
    train_args = {k: v for k, v in vars(args).items() if k not in {f.name for f in dataclasses.fields(model.config)}}
    return {
        "model": args.model,
        "config": dataclasses.asdict(model.config),
        "train_args": train_args,
        "image_shape": list(data.image_shape),
        "class_names": list(data.class_names),
        "data": data.source,
        "model_state": model.state_dict(),
        "optimizer_states": {k: o.state_dict() for k, o in optimizers.items()},
        "scheduler_states": {k: s.state_dict() for k, s in schedulers.items()},
        "epoch": epoch,
        "best_metric": best,
        "bad_validations": bad_validations,
        "rng": {**common.rng_state(), "shuffle": shuffle_rng.get_state()},
        "history": history,
    }


def resume_settings(args, ckpt, argv):
    """On --resume, the run's own settings come back from Last; only --epochs, --patience and
    --device may be changed. Any other explicit flag that disagrees is an error, not silently ignored."""
    changeable = {"epochs", "patience", "device", "resume", "model", "run_name", "models_dir", "log_dir"}
    saved = {**ckpt["train_args"], **ckpt["config"]}
    for key, value in saved.items():
        flag = "--" + key.replace("_", "-")
        given = any(a == flag or a.startswith(flag + "=") for a in argv)
        current = getattr(args, key, None)
        current = list(current) if isinstance(current, tuple) else current
        value = list(value) if isinstance(value, tuple) else value
        if given and key not in changeable and current != value:
            raise UserError(f"--resume continues a run that used {flag} {value}; drop {flag} {current} "
                            "or start a new run with another --run-name")
        if key not in changeable:
            setattr(args, key, value)


def train(argv=None):
    """Parse the flags and train. A model module with `stages(args)` trains as the runs it yields, in order."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    module = MODELS[args.model]
    result = None
    for run_args in module.stages(args) if hasattr(module, "stages") else [args]:
        result = train_run(run_args, argv)
    return result


def train_run(args, argv):
    """One run: models/Best_<run>.pth and Last_<run>.pth. Returns (model, best metric)."""
    module = MODELS[args.model]
    models_dir = Path(args.models_dir)
    last_path, best_path = models_dir / f"Last_{args.run_name}.pth", models_dir / f"Best_{args.run_name}.pth"
    ckpt = None
    if args.resume:
        ckpt = common.load_checkpoint(last_path)
        if ckpt.get("model") != args.model:
            raise UserError(f"'{last_path}' holds a {ckpt.get('model')} model, not {args.model}")
        resume_settings(args, ckpt, argv)
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    data = common.load_data(args.data, args.image_size, args.channels)
    if ckpt is not None and list(data.image_shape) != list(ckpt["image_shape"]):
        raise UserError(f"the data now gives {list(data.image_shape)} images but '{last_path}' was trained on "
                        f"{ckpt['image_shape']}; resume with the same data, or start a new run")
    train_idx, val_idx = common.split_indices(len(data.images), args.seed)
    train_images, train_labels = data.images[train_idx], data.labels[train_idx]
    val_images, val_labels = data.images[val_idx], data.labels[val_idx]

    config = common.config_from_args(module.Config, args)
    model = build_model(args.model, config, data.image_shape, len(data.class_names)).to(device)
    groups = model.parameter_groups() if hasattr(model, "parameter_groups") else {"model": model.parameters()}
    optimizers = {name: make_optimizer(params, args) for name, params in groups.items()}
    schedulers = {name: torch.optim.lr_scheduler.StepLR(o, args.lr_decay_every, args.lr_decay)
                  for name, o in optimizers.items()}
    step = model.train_step if hasattr(model, "train_step") else lambda x, y, opts: gradient_step(model, x, y, opts)
    shuffle_rng = torch.Generator().manual_seed(args.seed)
    start_epoch, best, bad_validations, history = 1, math.inf, 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model_state"])
        for name, o in optimizers.items():
            o.load_state_dict(ckpt["optimizer_states"][name])
            schedulers[name].load_state_dict(ckpt["scheduler_states"][name])
        common.set_rng_state(ckpt["rng"])
        shuffle_rng.set_state(ckpt["rng"]["shuffle"])
        start_epoch, best, bad_validations = ckpt["epoch"] + 1, ckpt["best_metric"], ckpt["bad_validations"]
        history = list(ckpt["history"])
    elif hasattr(model, "prepare"):   # once, before the first epoch of a new run
        model.prepare(data, train_images)

    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)  # not frozen copies (EMA)
    print(f"# {args.model} on {data.source}: {len(train_idx)} train / {len(val_idx)} val images of "
          f"{'x'.join(map(str, data.image_shape))}, {len(data.class_names)} classes, {n_params:,} parameters, {device}"
          + (f", resumed at epoch {start_epoch}" if ckpt is not None else ""), flush=True)
    writer = common.tensorboard_writer(Path(args.log_dir) / args.run_name)
    writer.add_text("hyperparameters", "|flag|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    fixed_preview = common.to_float(val_images[:8])
    quality = None   # FID/KID (or FD_eval) of samples against the validation images, see fid.py
    if args.fid_every > 0:
        extractors = fid.extractors_from_args(args, args.data, args.image_size, device, args.models_dir)
        quality = fid.SampleQuality(extractors, val_images, val_labels, args.fid_samples, args.seed)
    by_quality = quality is not None and getattr(model, "selects_by_sample_quality", False)
    if getattr(model, "selects_by_sample_quality", False) and not by_quality:
        print(f"# note: {args.model} has no meaningful val_loss; pass --fid-every N to choose Best by sample quality",
              flush=True)
    selection = quality.metric if by_quality else "val_loss"

    def state(epoch):
        return checkpoint_state(args, model, optimizers, schedulers, data, epoch, best, bad_validations, history,
                                shuffle_rng)

    completed = start_epoch - 1
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            started = time.perf_counter()
            sums, count = {}, 0
            batches = common.iterate_batches(train_images, train_labels, args.batch_size, shuffle_rng, args.flip)
            for x, y in tqdm(batches, total=math.ceil(len(train_idx) / args.batch_size), desc=f"epoch {epoch}",
                             leave=False, file=sys.stderr, disable=None):
                terms = step(x.to(device), y.to(device), optimizers)
                for k, v in terms.items():  # summed as tensors: no device sync per step
                    sums[k] = sums.get(k, 0.0) + v.detach() * len(x)
                count += len(x)
            train_terms = {k: float(v) / count for k, v in sums.items()}
            if not all(math.isfinite(v) for v in train_terms.values()):
                raise TrainingDiverged(f"epoch {epoch}: training loss became {train_terms['loss']}; "
                                       f"{best_path} is left as it was. Try a lower --lr.")
            lr = optimizers[next(iter(optimizers))].param_groups[0]["lr"]
            for s in schedulers.values():
                s.step()
            record = {"epoch": epoch, "train_loss": train_terms["loss"], "val_loss": None, "lr": lr}
            line = f"epoch {epoch} train_loss {train_terms['loss']:.6g}"
            line += "".join(f" {k} {v:.4g}" for k, v in train_terms.items() if k != "loss")   # e.g. a GAN's D(x)
            for k, v in train_terms.items():
                writer.add_scalar(f"train/{k}", v, epoch)
            marker, score = "", None   # score: what Best is chosen on, when measured this epoch
            if epoch % args.val_every == 0 or epoch == args.epochs:
                val_terms = evaluate(model, val_images, val_labels, args, device)
                record["val_loss"] = val_terms["loss"]
                other_terms = {f"val_{k}": v for k, v in val_terms.items() if k != "loss"}   # e.g. val_psnr
                record.update(other_terms)
                line += f" val_loss {val_terms['loss']:.6g}" + "".join(f" {k} {v:.4g}" for k, v in other_terms.items())
                for k, v in val_terms.items():
                    writer.add_scalar(f"val/{k}", v, epoch)
                writer.add_image("preview", preview(model, fixed_preview, device, args.seed), epoch)
                score = None if by_quality else val_terms["loss"]
            if quality is not None and (epoch % args.fid_every == 0 or epoch == args.epochs):
                metrics = quality(model, device)
                record.update(metrics)
                line += " " + fid.format_metrics(metrics)
                for k, v in metrics.items():
                    writer.add_scalar(f"samples/{k}", v, epoch)
                if by_quality:
                    score = metrics[selection]
            if score is not None:
                if score < best:
                    best, bad_validations, marker = score, 0, " *best*"
                else:
                    bad_validations += 1
            record["seconds"] = time.perf_counter() - started
            record.update({f"train_{k}": v for k, v in train_terms.items() if k != "loss"})
            history.append(record)
            writer.add_scalar("lr", lr, epoch)
            print(f"{line} lr {lr:.3g} time {record['seconds']:.1f}s{marker}", flush=True)
            if marker:
                common.save_checkpoint(state(epoch), best_path)
            common.save_checkpoint(state(epoch), last_path)
            completed = epoch
            if bad_validations >= args.patience:
                print(f"# early stop: no new best {selection} in {args.patience} validations; best {best:.6g}",
                      flush=True)
                break
    except KeyboardInterrupt:
        common.save_checkpoint(state(completed), last_path)
        print(f"interrupted: saved {last_path}; `--resume` restarts the interrupted epoch from these weights",
              file=sys.stderr)
        sys.exit(130)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        writer.close()
    return model, best


if __name__ == "__main__":
    common.run_cli(train)
