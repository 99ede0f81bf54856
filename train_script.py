"""Train any model of genlab: `python train_script.py --model VAE > log/train_VAE.out`.

The loop knows models only through MODELS and the contract in contract.py. Each epoch builds one record
(training terms, validation terms, sample-quality metrics, lr, wall and CPU time); the stdout line, the
TensorBoard scalars and the checkpoint's history are all derived from it. stdout gets one line per epoch,
`epoch <n> train_loss <x> [train_<term> <x> ...] [val_loss <y> [val_<term> <y> ...]] [<metric> <m> ...] lr <lr>
time <s>s [*best*]`, and lines starting with `#` for run information; the progress bar goes to stderr.
models/Best_<run>.pth is written on each new best, models/Last_<run>.pth at the end of every epoch; `--resume`
continues from Last exactly where it stopped. An existing run is never replaced without `--overwrite`.
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
import contract
import conv_ae
import ddpm
import fid
import gan
import latent_diffusion
import mlp_ae
import vae
from common import TrainingDiverged, UserError, checked

MODELS = {
    "MLPAE": mlp_ae,
    "AE": conv_ae,
    "VAE": vae,
    "diffusion": ddpm,
    "GAN": gan,
    "LDM": latent_diffusion,
}

# The common flags' defaults; a model's TRAIN_DEFAULTS override these.
COMMON_DEFAULTS = dict(epochs=20, batch_size=16, lr=1e-3, lr_decay=1.0, lr_decay_every=10, optimizer="adam",
                       momentum=0.0, weight_decay=0.0, grad_clip=0.0, grad_accum=1, val_every=1, patience=5,
                       flip=False, fid_every=0, adam_beta1=0.9, adam_beta2=0.999)
# What --resume may change; every other flag comes back from the checkpoint.
CHANGEABLE_ON_RESUME = {"epochs", "patience", "device", "resume", "overwrite", "model", "run_name", "models_dir",
                        "log_dir"}


def build_parser(model_name=None, add_help=True):
    parser = common.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help,
                                   epilog=None if model_name else "`--model X --help` lists the flags of model X")
    parser.add_argument("--model", required=add_help, choices=list(MODELS), help="which model to train")
    if model_name is None:
        return parser
    module = MODELS[model_name]
    d = {**COMMON_DEFAULTS, **module.TRAIN_DEFAULTS}
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="shapes", help="a folder of images (class sub-folders give labels) or 'shapes', "
                   "the built-in dataset (default: shapes)")
    g.add_argument("--image-size", type=checked(int, 4), default=24, help="images are resized to this square size "
                   "(default: 24)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 or 3 (default: 1 when every image is grayscale, else 3)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=d["flip"],
                   help=f"random horizontal flips of training images (default: {common.describe_default(d['flip'])})")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=checked(int, 1), default=d["epochs"], help=f"total epochs (default: {d['epochs']})")
    g.add_argument("--batch-size", type=checked(int, 1), default=d["batch_size"],
                   help=f"images per optimiser step (default: {d['batch_size']})")
    g.add_argument("--grad-accum", type=checked(int, 1), default=d["grad_accum"],
                   help="split each batch into this many micro-batches, one backward pass each, and step once: "
                        f"the gradient of the whole batch in less memory (default: {d['grad_accum']})")
    g.add_argument("--lr", type=checked(float, 0), default=d["lr"], help=f"learning rate (default: {d['lr']})")
    g.add_argument("--lr-decay", type=checked(float, 0), default=d["lr_decay"],
                   help=f"multiply the lr by this every --lr-decay-every epochs (default: {d['lr_decay']})")
    g.add_argument("--lr-decay-every", type=checked(int, 1), default=d["lr_decay_every"],
                   help=f"epochs between two lr decays (default: {d['lr_decay_every']})")
    g.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default=d["optimizer"],
                   help=f"adam, adamw (decoupled weight decay) or sgd (default: {d['optimizer']})")
    g.add_argument("--momentum", type=checked(float, 0), default=d["momentum"],
                   help=f"SGD momentum (default: {d['momentum']}, plain SGD)")
    g.add_argument("--adam-beta1", type=checked(float, 0, below=1), default=d["adam_beta1"],
                   help=f"Adam's beta1, the decay of its gradient average (default: {d['adam_beta1']})")
    g.add_argument("--adam-beta2", type=checked(float, 0, below=1), default=d["adam_beta2"],
                   help=f"Adam's beta2, the decay of its squared-gradient average (default: {d['adam_beta2']})")
    g.add_argument("--weight-decay", type=checked(float, 0), default=d["weight_decay"],
                   help=f"L2 penalty (adam, sgd) or decoupled decay (adamw) (default: {d['weight_decay']})")
    g.add_argument("--grad-clip", type=checked(float, 0), default=d["grad_clip"],
                   help=f"clip the gradient norm to this; 0: off (default: {d['grad_clip']})")
    g.add_argument("--val-every", type=checked(int, 1), default=d["val_every"],
                   help=f"validate every N epochs and at the last (default: {d['val_every']})")
    g.add_argument("--patience", type=checked(int, 1), default=d["patience"],
                   help=f"stop after this many validations without a new best (default: {d['patience']})")
    g.add_argument("--seed", type=checked(int, 0), default=0, help="seeds the 80/20 split (as torch.manual_seed(seed) "
                   "then random_split) and training (default: 0)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="where to train; auto: cuda, else mps, else cpu (default: auto)")
    g.add_argument("--resume", action="store_true", help="continue from <models-dir>/Last_<run>.pth with its settings")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run of the same --run-name "
                   "(without it, a new run never replaces saved checkpoints)")
    g.add_argument("--run-name", default=None, help="names checkpoints and the log folder (default: the model name)")
    g.add_argument("--models-dir", default="models", help="where checkpoints go (default: models)")
    g.add_argument("--log-dir", default="log", help="TensorBoard runs go to <log-dir>/<run> (default: log)")
    g = parser.add_argument_group("sample quality (fid.py)")
    g.add_argument("--fid-every", type=checked(int, 0), default=d["fid_every"],
                   help="every N epochs (and the last) generate --fid-samples images and log FID/KID against the "
                        f"validation images; models without a meaningful val_loss select Best on it (0: off; "
                        f"default: {d['fid_every']})")
    g.add_argument("--fid-samples", type=checked(int, 0), default=0,
                   help="how many samples to measure (default: 0, as many as validation images)")
    fid.add_metric_flags(g)
    parser.set_defaults(**module.TRAIN_DEFAULTS)   # a model may also default the metric flags (--fid-features)
    common.add_config_flags(parser, module.Config, f"{model_name} options (from {module.__name__}.py)")
    return parser


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    known, _ = build_parser(add_help=False).parse_known_args(argv)
    args = build_parser(known.model).parse_args(argv)
    args.run_name = args.run_name or args.model
    if args.resume and args.overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it; pass one of them")
    return args


def build_model(name, config, image_shape, num_classes):
    return MODELS[name].Model(config, tuple(image_shape), num_classes)


CHECKPOINT_KEYS = ("model", "config", "train_args", "image_shape", "class_names", "model_state")


def load_model(path, expected_model=None, device="cpu"):
    """Rebuild a model from a checkpoint alone. Returns (model, checkpoint)."""
    ckpt = common.load_checkpoint(path)
    name = ckpt.get("model") if isinstance(ckpt, dict) else None
    if name not in MODELS:
        raise UserError(f"'{path}' is not a genlab checkpoint of a known model (found {name!r})")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"'{path}' is an incomplete genlab checkpoint (no {', '.join(missing)}); use another one")
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


def make_optimizer(module, args):
    params = contract.trainable(module)
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    optimizer_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return optimizer_cls(params, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay)


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
    """What TensorBoard shows at each validation (model.preview): reconstructions under originals, or samples
    from fixed noise."""
    model.eval()
    if model.preview == "reconstructions":
        x = fixed_images.to(device)
        grid = common.comparison_grid([x, model.reconstruct(x)])
    else:
        grid = common.make_grid(model.sample(len(fixed_images), torch.Generator(device).manual_seed(seed)).cpu())
    model.train()
    return grid


def epoch_line(record, marker):
    """The stdout line of an epoch, from its record: every term in the record's order, then lr and time."""
    terms = [f"{k} {v:.6g}" if k in ("train_loss", "val_loss") else f"{k} {v:.5g}"
             for k, v in record.items() if k not in ("epoch", "lr", "seconds", "cpu_seconds") and v is not None]
    return f"epoch {record['epoch']} {' '.join(terms)} lr {record['lr']:.3g} time {record['seconds']:.1f}s{marker}"


def tensorboard_scalars(record):
    """TensorBoard tags of a record: train/<term>, val/<term>, samples/<metric>, lr, time/<seconds>."""
    for k, v in record.items():
        if k == "epoch" or v is None:
            continue
        split, _, term = k.partition("_")
        if split in ("train", "val"):
            yield f"{split}/{term}", v
        elif k in ("seconds", "cpu_seconds"):
            yield f"time/{k}", v
        else:
            yield ("lr" if k == "lr" else f"samples/{k}"), v


def checkpoint_state(args, model, optimizers, schedulers, data, epoch, best, bad_validations, history, shuffle_rng):
    config_fields = {f.name for f in dataclasses.fields(model.config)}
    return {
        "model": args.model,
        "config": dataclasses.asdict(model.config),
        "train_args": {k: v for k, v in vars(args).items() if k not in config_fields},
        "image_shape": list(data.image_shape),
        "class_names": list(data.class_names),
        "data": data.source,
        "data_fingerprint": data.fingerprint,
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
    """On --resume, the run's own settings come back from Last; only CHANGEABLE_ON_RESUME may be changed. Any
    other explicit flag that disagrees is an error, not silently ignored."""
    saved = {**ckpt["train_args"], **ckpt["config"]}
    for key, value in saved.items():
        if key in CHANGEABLE_ON_RESUME:
            continue
        flag = "--" + key.replace("_", "-")
        given = any(a == flag or a.startswith(flag + "=") for a in argv)
        current = getattr(args, key, None)
        current = list(current) if isinstance(current, tuple) else current
        value = list(value) if isinstance(value, tuple) else value
        if given and current != value:
            raise UserError(f"--resume continues a run that used {flag} {value}; drop {flag} {current} "
                            "or start a new run with another --run-name")
        setattr(args, key, value)


def describe_run(path):
    """'epoch 17, best 0.00222' of a saved checkpoint, for messages."""
    try:
        ckpt = common.load_checkpoint(path)
        return f"epoch {ckpt['epoch']}, best {ckpt['best_metric']:.6g}"
    except (UserError, KeyError, TypeError):
        return "unreadable"


def refuse_to_replace(args, best_path, last_path):
    """A new run never replaces saved checkpoints by accident: it stops before training, naming the three ways on."""
    existing = [p for p in (last_path, best_path) if p.exists()]
    if not existing or args.resume:
        return
    if not args.overwrite:
        raise UserError(f"run '{args.run_name}' already exists ({existing[0]}: {describe_run(existing[0])}); "
                        f"--resume continues it, --run-name NEW starts another beside it, --overwrite replaces it")
    for path in existing:
        path.unlink()
    print(f"# --overwrite: removed {', '.join(map(str, existing))}", flush=True)


def train(argv=None):
    """Parse the flags and train each run the model module asks for (contract.runs), in order."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    result = None
    for run_args in contract.runs(MODELS[args.model], args):
        result = train_run(run_args, argv)
    return result


def train_run(args, argv):
    """One run: models/Best_<run>.pth and Last_<run>.pth. Returns (model, best metric)."""
    module = MODELS[args.model]
    models_dir = common.output_dir(args.models_dir, "--models-dir")
    last_path, best_path = models_dir / f"Last_{args.run_name}.pth", models_dir / f"Best_{args.run_name}.pth"
    common.remove_stale_temporaries(best_path, last_path)
    ckpt = None
    if args.resume:
        if not last_path.is_file():
            raise UserError(f"--resume needs '{last_path}', which does not exist; drop --resume to start the run, "
                            "or pass the --run-name and --models-dir of the run to continue")
        ckpt = common.load_checkpoint(last_path)
        if ckpt.get("model") != args.model:
            raise UserError(f"'{last_path}' holds a {ckpt.get('model')} model, not {args.model}")
        resume_settings(args, ckpt, argv)
    refuse_to_replace(args, best_path, last_path)
    log_dir = common.output_dir(Path(args.log_dir) / args.run_name, "--log-dir")

    # Data: decoded once, in memory; the 80/20 split is fixed by --seed.
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    data = common.load_data(args.data, args.image_size, args.channels)
    if ckpt is not None and ckpt.get("data_fingerprint", data.fingerprint) != data.fingerprint:
        raise UserError(f"the data in '{args.data}' changed since '{last_path}' was saved (other images or classes); "
                        "resume with the same data, or start a new run with another --run-name")
    train_idx, val_idx = common.split_indices(len(data.images), args.seed)
    train_images, train_labels = data.images[train_idx], data.labels[train_idx]
    val_images, val_labels = data.images[val_idx], data.labels[val_idx]

    # The model, one optimiser and lr schedule per parameter group, and the state to resume.
    model = build_model(args.model, common.config_from_args(module.Config, args), data.image_shape,
                        len(data.class_names)).to(device)
    groups = model.parameter_groups()
    optimizers = contract.Optimizers({name: make_optimizer(m, args) for name, m in groups.items()}, groups,
                                     args.grad_clip, args.grad_accum)
    schedulers = {name: torch.optim.lr_scheduler.StepLR(o, args.lr_decay_every, args.lr_decay)
                  for name, o in optimizers.items()}
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
    else:
        model.prepare(data, train_images)

    # Sample quality (FID/KID or FD_eval), and what Best is chosen on.
    quality = None
    if args.fid_every > 0:
        extractors = fid.extractors_from_args(args, args.data, args.image_size, device, args.models_dir)
        quality = fid.SampleQuality(extractors, val_images, val_labels, args.fid_samples, args.seed)
    by_quality = quality is not None and model.selects_by_sample_quality
    if model.selects_by_sample_quality and not by_quality:
        print(f"# note: {args.model} has no meaningful val_loss; pass --fid-every N to choose Best by sample quality",
              flush=True)
    selection = quality.metric if by_quality else "val_loss"

    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)   # not frozen copies (EMA)
    print(f"# {args.model} on {data.source}: {len(train_idx)} train / {len(val_idx)} val images of "
          f"{'x'.join(map(str, data.image_shape))}, {len(data.class_names)} classes, {n_params:,} parameters, {device}, "
          f"epochs {start_epoch}-{args.epochs}" + (f" (resumed from {last_path})" if ckpt is not None else ""),
          flush=True)
    writer = common.tensorboard_writer(log_dir)
    writer.add_text("hyperparameters", "|flag|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    fixed_preview = common.to_float(val_images[:8])

    def save(path, epoch):
        common.save_checkpoint(checkpoint_state(args, model, optimizers, schedulers, data, epoch, best,
                                                bad_validations, history, shuffle_rng), path)

    completed = start_epoch - 1
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            started, cpu_started = time.perf_counter(), time.process_time()
            # One pass over the training images: the model's own train_step on each batch.
            sums, count = {}, 0
            batches = common.iterate_batches(train_images, train_labels, args.batch_size, shuffle_rng, args.flip)
            for x, y in tqdm(batches, total=math.ceil(len(train_idx) / args.batch_size), desc=f"epoch {epoch}",
                             leave=False, file=sys.stderr, disable=None):
                terms = model.train_step(x.to(device), y.to(device), optimizers)
                for k, v in terms.items():   # summed as tensors: no device sync per step
                    sums[k] = sums.get(k, 0.0) + v.detach() * len(x)
                count += len(x)
            record = {"epoch": epoch, **{f"train_{k}": float(v) / count for k, v in sums.items()}}
            if not all(math.isfinite(v) for v in record.values()):
                raise TrainingDiverged(f"epoch {epoch}: training loss became {record['train_loss']}; "
                                       f"{best_path} is left as it was. Try a lower --lr.")
            record["lr"] = optimizers[next(iter(groups))].param_groups[0]["lr"]
            for s in schedulers.values():
                s.step()

            # Validation loss and sample quality, when due; Best and early stopping follow `selection`.
            record["val_loss"], score = None, None
            if epoch % args.val_every == 0 or epoch == args.epochs:
                val_terms = evaluate(model, val_images, val_labels, args, device)
                record.update({f"val_{k}": v for k, v in val_terms.items()})
                writer.add_image("preview", preview(model, fixed_preview, device, args.seed), epoch)
                score = None if by_quality else val_terms["loss"]
            if quality is not None and (epoch % args.fid_every == 0 or epoch == args.epochs):
                metrics = quality(model, device)
                record.update({k: v for k, v in metrics.items() if not k.endswith("_std")})
                score = metrics[selection] if by_quality else score
            marker = ""
            if score is not None:
                if score < best:
                    best, bad_validations, marker = score, 0, " *best*"
                else:
                    bad_validations += 1
            record["seconds"] = time.perf_counter() - started
            record["cpu_seconds"] = time.process_time() - cpu_started

            # Log and save: the line, the scalars and the history all come from the record.
            history.append(record)
            print(epoch_line(record, marker), flush=True)
            for tag, value in tensorboard_scalars(record):
                writer.add_scalar(tag, value, epoch)
            if marker:
                save(best_path, epoch)
            save(last_path, epoch)
            completed = epoch
            if bad_validations >= args.patience:
                print(f"# early stop: no new best {selection} in {args.patience} validations; best {best:.6g}",
                      flush=True)
                break
    except KeyboardInterrupt:
        # The epoch in progress is dropped: Last stays the end of the previous epoch, so --resume is exact.
        print(f"interrupted in epoch {completed + 1}; " + (f"{last_path} holds the end of epoch {completed}, and "
              "`--resume` continues from there" if completed else "nothing was saved"), file=sys.stderr)
        sys.exit(130)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        writer.close()
    return model, best


if __name__ == "__main__":
    common.run_cli(train)
