"""Train any model of genlab: `python train_script.py --model VAE > log/train_VAE.out`.

The loop knows models only through registry.MODELS and the contract in contract.py. Each epoch builds one record
(training terms, validation terms, sample-quality metrics, lr, wall and CPU time); the stdout line, the
TensorBoard scalars and the checkpoint's history are all derived from it. stdout gets one line per epoch,
`epoch <n> train_loss <x> [train_<term> <x> ...] [val_loss <y> [val_<term> <y> ...]] [<metric> <m> ...] lr <lr>
time <s>s [*best*]`, and lines starting with `#` for run information; the progress bar goes to stderr.
models/Best_<run>.pth is written on each new best, models/Last_<run>.pth at the end of every epoch; `--resume`
continues from Last exactly where it stopped. An existing run is never replaced without `--overwrite`.
A new run's settings go to <models-dir>/<run>.toml, which `--config` reads back (see config_file.py).
"""
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common
import config_file
import contract
import fid
import image_data
import train_flags
from common import TrainingDiverged, UserError
from registry import MODELS, build_model

# On --resume, the flags that name and find the run are this command's; the run's settings come back from the
# checkpoint, and of them only CHANGEABLE_ON_RESUME may be given again with another value.
FINDING_THE_RUN = {"resume", "overwrite", "model", "run_name", "models_dir", "config"}
CHANGEABLE_ON_RESUME = {"epochs", "patience", "device", "log_dir", "compile", "grad_accum"}


def resolve_condition(requested, data):
    """--condition auto: the data's labels when it has them, else its classes; 'none' is no condition."""
    if requested == "auto":
        return "labels" if data.multilabels is not None else "class"
    return None if requested == "none" else requested


def make_optimizer(module, args, lr_scale=1.0):
    params, lr = contract.trainable(module), args.lr * lr_scale
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    optimizer_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return optimizer_cls(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay)


@torch.no_grad()
def evaluate(model, images, labels, args, device):
    """Mean of each loss term over a set. Noise comes from a generator seeded the same at every
    validation, so the number changes only when the weights do."""
    model.eval()
    generator = torch.Generator(device).manual_seed(args.seed)
    sums, count = {}, 0
    for x, y in image_data.iterate_batches(images, labels, args.batch_size, shuffle=False):
        terms = model.loss(x.to(device), y.to(device), generator=generator)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(x)
        count += len(x)
    means = {k: v / count for k, v in sums.items()}
    means.update(model.validation_metrics(image_data.to_float(images).to(device), labels.to(device)))
    model.train()
    return means


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


def checkpoint_state(args, model, optimizers, schedulers, data, condition, names, epoch, best, bad_validations, history,
                     rng):
    """Everything to rebuild the model (its condition, and the names of its classes or labels) and to resume."""
    config_fields = {f.name for f in dataclasses.fields(model.config)}
    return {
        "model": args.model,
        "config": dataclasses.asdict(model.config),
        "train_args": {k: v for k, v in vars(args).items() if k not in config_fields},
        "image_shape": list(data.image_shape),
        "condition": condition,
        "class_names": list(names),
        "data": data.source,
        "data_fingerprint": data.fingerprint,
        "model_state": model.state_dict(),
        "optimizer_states": {k: o.state_dict() for k, o in optimizers.items()},
        "scheduler_states": {k: s.state_dict() for k, s in schedulers.items()},
        "epoch": epoch,
        "best_metric": best,
        "bad_validations": bad_validations,
        "scaler_state": optimizers.scaler.state_dict() if optimizers.scaler is not None else None,
        "rng": rng,
        "history": history,
    }


def resume_settings(args, ckpt, argv):
    """On --resume, the run's own settings come back from Last; only CHANGEABLE_ON_RESUME may be changed. Any
    other explicit flag (on the command line or in --config's file) that disagrees is an error, not silently ignored."""
    saved = {**ckpt["train_args"], **ckpt["config"]}
    in_file = config_file.read(args.config) if args.config else {}
    for key, value in saved.items():
        if key in FINDING_THE_RUN:
            continue
        flag = "--" + key.replace("_", "-")
        on_command_line = any(a == flag or a.startswith(flag + "=") for a in argv)
        given = on_command_line or key in in_file
        if key in CHANGEABLE_ON_RESUME:   # e.g. --patience 100 stays 100 unless given again, never the default
            if not given:
                setattr(args, key, value)
            continue
        current = getattr(args, key, None)
        current = list(current) if isinstance(current, tuple) else current
        value = list(value) if isinstance(value, tuple) else value
        if given and current != value:
            where = "" if on_command_line else f" (from {args.config})"
            raise UserError(f"--resume continues a run that used {flag} {value}; drop {flag} {current}{where} "
                            "or start a new run with another --run-name")
        setattr(args, key, value)


def describe_run(path):
    """'epoch 17, best 0.00222' of a saved checkpoint, for messages."""
    try:
        ckpt = common.load_checkpoint(path)
        return f"epoch {ckpt['epoch']}, best {ckpt['best_metric']:.6g}"
    except (UserError, KeyError, TypeError):
        return "unreadable"


def refuse_to_replace(args, best_path, last_path, remove=True):
    """A new run never replaces saved checkpoints by accident: it stops before training, naming the three ways on.
    With --overwrite the old files go (when `remove`: in one process of several)."""
    existing = [p for p in (last_path, best_path) if p.exists()]
    if not existing or args.resume:
        return
    if not args.overwrite:
        raise UserError(f"run '{args.run_name}' already exists ({existing[0]}: {describe_run(existing[0])}); "
                        f"--resume continues it, --run-name NEW starts another beside it, --overwrite replaces it")
    if remove:
        for path in existing:
            path.unlink()
        print(f"# --overwrite: removed {', '.join(map(str, existing))}", flush=True)


def train(argv=None):
    """Parse the flags and train each run the model module asks for (contract.runs), in order. Under torchrun, every
    process runs this; they join one process group first."""
    argv = sys.argv[1:] if argv is None else argv
    args = train_flags.parse_args(argv)
    process, device = common.start_process(args.device)
    result = None
    try:
        for run_args in contract.runs(MODELS[args.model], args):
            result = train_run(run_args, argv, process, device, settings=args)
        if process.world > 1:
            torch.distributed.barrier()   # every rank has finished its last save and validation before any leaves
    finally:
        if process.world > 1:
            torch.distributed.destroy_process_group()
    return result


def open_run(args, argv, process, settings=None):
    """The run's checkpoint paths and, with --resume, its Last (whose settings replace the flags); refuses to replace
    an existing run. A new run's `settings` (default: args), the flags that started it, go to <run>.toml, which
    --config reproduces. Returns (best_path, last_path, checkpoint or None)."""
    models_dir = common.output_dir(args.models_dir, "--models-dir")
    last_path, best_path = models_dir / f"Last_{args.run_name}.pth", models_dir / f"Best_{args.run_name}.pth"
    ckpt = None
    if args.resume:
        if not last_path.is_file():
            raise UserError(f"--resume needs '{last_path}', which does not exist; drop --resume to start the run, "
                            "or pass the --run-name and --models-dir of the run to continue")
        ckpt = common.load_checkpoint(last_path)
        if ckpt.get("model") != args.model:
            raise UserError(f"'{last_path}' holds a {ckpt.get('model')} model, not {args.model}")
        resume_settings(args, ckpt, argv)
    refuse_to_replace(args, best_path, last_path, remove=process.main)   # every process reads; rank 0 removes
    if process.main:
        common.remove_stale_temporaries(best_path, last_path)
        if ckpt is None:   # a model trained in stages (LDM) gets the flags of all its stages, which reproduce it
            config_file.write_settings(models_dir / f"{args.run_name}.toml", vars(settings or args),
                                       [f"The settings that started the run '{args.run_name}' (train_script.py); "
                                        f"again:", f"python train_script.py --config {models_dir / args.run_name}.toml "
                                        "--run-name NEW (or --overwrite)"])
    return best_path, last_path, ckpt


def synchronise(process, *values):
    """Rank 0's values on every process, once every process has come here (one process: the values)."""
    if process.world > 1:
        values = list(values) or [None]
        torch.distributed.broadcast_object_list(values, src=0)
    return tuple(values)


def train_run(args, argv, process, device, settings=None):
    """One run: models/Best_<run>.pth and Last_<run>.pth. Returns (model, best metric). With several processes,
    each trains on its share of every batch of images; rank 0 alone validates, measures, logs and saves."""
    module = MODELS[args.model]
    best_path, last_path, ckpt = open_run(args, argv, process, settings)
    synchronise(process)   # the others wait while rank 0 cleans the folder
    log_dir = common.output_dir(Path(args.log_dir) / args.run_name, "--log-dir") if process.main else None

    # Data: decoded once, in memory; the 80/20 split is fixed by --seed, training's randomness by --train-seed.
    training_seed = args.seed if args.train_seed is None else args.train_seed
    common.seed_everything(training_seed)
    data = image_data.load_data(args.data, args.image_size, args.channels, labels=args.labels,
                                label_names=args.label_names, layouts=args.layouts)
    if ckpt is not None and ckpt.get("data_fingerprint", data.fingerprint) != data.fingerprint:
        raise UserError(f"the data in '{args.data}' changed since '{last_path}' was saved (other images or classes); "
                        "resume with the same data, or start a new run with another --run-name")
    condition = resolve_condition(args.condition, data)
    conditions, names = data.conditions(condition or "class")   # y of each image: class, labels or layout
    train_idx, val_idx = image_data.split_indices(len(data.images), args.seed)
    train_images, train_labels = data.images[train_idx], conditions[train_idx]
    val_images, val_labels = data.images[val_idx], conditions[val_idx]

    # The model, one optimiser and lr schedule per parameter group, and the state to resume.
    model = build_model(args.model, common.config_from_args(module.Config, args), data.image_shape,
                        len(names) if condition else 0, condition or "class").to(device)
    if args.condition != "auto" and model.generates and model.condition != condition:   # a first stage has none
        raise UserError(f"the {args.model} model does not take --condition {args.condition} (it takes "
                        f"{model.condition or 'no condition'} here); pass another --condition or drop it")
    if process.world > 1:
        torch.manual_seed(training_seed + process.rank)   # the same weights everywhere, but each process its own noise
    groups = model.parameter_groups()
    if args.compile:
        compile_networks(groups)
    optimizers = contract.Optimizers({name: make_optimizer(m, args, model.lr_scales.get(name, 1.0))
                                      for name, m in groups.items()}, groups,
                                     args.grad_clip, args.grad_accum, args.precision, device.type, process.world > 1)
    schedulers = {name: torch.optim.lr_scheduler.StepLR(o, args.lr_decay_every, args.lr_decay)
                  for name, o in optimizers.items()}
    shuffle_rng = torch.Generator().manual_seed(training_seed)   # equal in every process: one permutation to share
    start_epoch, best, bad_validations, history = 1, math.inf, 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model_state"])
        for name, o in optimizers.items():
            o.load_state_dict(ckpt["optimizer_states"][name])
            schedulers[name].load_state_dict(ckpt["scheduler_states"][name])
        if optimizers.scaler is not None and ckpt.get("scaler_state"):
            optimizers.scaler.load_state_dict(ckpt["scaler_state"])
        start_epoch, best, bad_validations = ckpt["epoch"] + 1, ckpt["best_metric"], ckpt["bad_validations"]
        history = list(ckpt["history"])
    else:
        model.prepare(data, train_images)

    # Sample quality (FID/KID or FD_eval), and what Best is chosen on: measured by rank 0.
    # Building it draws random numbers (the evaluator's layers are initialised before its weights load, or it is
    # trained first): under rng_kept, so that training draws the same with and without --fid-every.
    quality = None
    if args.fid_every > 0 and process.main:
        with common.rng_kept(device):
            quality = fid.sample_quality(args, args.data, args.image_size, data, val_images, val_labels,
                                         model.condition, device, args.models_dir, model.selects_by_sample_quality,
                                         args.fid_samples, args.seed)
    if ckpt is not None:
        # The random state last, after all that is built at start-up: the resumed run then draws what the straight
        # run drew from the end of the saved epoch.
        rng = ckpt["rng"]
        common.set_rng_state(rng["processes"][process.rank] if len(rng.get("processes", [])) == process.world
                             else rng, device)
        shuffle_rng.set_state(rng["shuffle"])
    by_quality = args.fid_every > 0 and model.selects_by_sample_quality
    if model.selects_by_sample_quality and not by_quality and process.main:
        print(f"# note: {args.model} has no meaningful val_loss; pass --fid-every N to choose Best by sample quality",
              flush=True)
    selection = "val_loss"
    if by_quality and quality is not None:
        selection = "SWD" if args.select_by == "swd" else quality.metric

    writer = None
    if process.main:
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)   # not frozen copies (EMA)
        print(f"# {args.model} on {data.source}: {len(train_idx)} train / {len(val_idx)} val images of "
              f"{'x'.join(map(str, data.image_shape))}, condition {model.condition} ({len(names)} "
              f"{'classes' if condition in (None, 'class') else 'labels'}), {n_params:,} parameters, {device}"
              + (f" x {process.world} processes" if process.world > 1 else "") + f", epochs {start_epoch}-{args.epochs}"
              + (f" (resumed from {last_path})" if ckpt is not None else ""), flush=True)
        writer = common.tensorboard_writer(log_dir)
        writer.add_text("hyperparameters", "|flag|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in
                                                                                  vars(args).items()))
    fixed_preview = image_data.to_float(val_images[:8])

    def save(path, epoch):
        rng = {**common.rng_state(device), "shuffle": shuffle_rng.get_state()}
        if process.world > 1:   # every process's noise generator, so that a resume continues each exactly
            rng["processes"] = [None] * process.world
            torch.distributed.all_gather_object(rng["processes"], common.rng_state(device))
        if process.main:
            common.save_checkpoint(checkpoint_state(args, model, optimizers, schedulers, data, condition, names, epoch,
                                                    best, bad_validations, history, rng), path)
        synchronise(process)   # nobody runs ahead of a save

    completed = start_epoch - 1
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            started, cpu_started = time.perf_counter(), time.process_time()
            # One pass over the training images (this process's share): the model's own train_step on each batch.
            record = {"epoch": epoch, **train_epoch(model, optimizers, train_images, train_labels, args, shuffle_rng,
                                                    process, device, f"epoch {epoch}")}
            if not all(math.isfinite(v) for v in record.values()):
                raise TrainingDiverged(f"epoch {epoch}: training loss became {record['train_loss']}; "
                                       f"{best_path} is left as it was. Try a lower --lr.")
            first = next(iter(groups))   # the logged lr is --lr's current value, before any group's lr_scales
            record["lr"] = optimizers[first].param_groups[0]["lr"] / model.lr_scales.get(first, 1.0)
            for s in schedulers.values():
                s.step()

            # Validation loss and sample quality, when due; Best and early stopping follow `selection`.
            record["val_loss"], score, marker = None, None, ""
            if process.main and (epoch % args.val_every == 0 or epoch == args.epochs):
                val_terms = evaluate(model, val_images, val_labels, args, device)
                record.update({f"val_{k}": v for k, v in val_terms.items()})
                writer.add_image("preview", preview(model, fixed_preview, device, args.seed), epoch)
                score = None if by_quality else val_terms["loss"]
            if quality is not None and (epoch % args.fid_every == 0 or epoch == args.epochs):
                metrics = quality(model, device)
                record.update({k: v for k, v in metrics.items() if not k.endswith("_std")})
                score = metrics[selection] if by_quality else score
            if score is not None:
                if score < best:
                    best, bad_validations, marker = score, 0, " *best*"
                else:
                    bad_validations += 1
            record["seconds"] = time.perf_counter() - started
            record["cpu_seconds"] = time.process_time() - cpu_started
            best, bad_validations, marker = synchronise(process, best, bad_validations, marker)

            # Log and save: the line, the scalars and the history all come from the record.
            history.append(record)
            if process.main:
                print(epoch_line(record, marker), flush=True)
                for tag, value in tensorboard_scalars(record):
                    writer.add_scalar(tag, value, epoch)
            if marker:
                save(best_path, epoch)
            save(last_path, epoch)
            completed = epoch
            if bad_validations >= args.patience:
                if process.main:
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
    except Exception as err:
        if args.compile and type(err).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise UserError(f"--compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                            "drop --compile") from err
        raise
    finally:
        if writer is not None:
            writer.close()
    return model, best


def train_epoch(model, optimizers, images, labels, args, shuffle_rng, process, device, desc):
    """One pass over this process's share of the images; the mean of each training term over all processes."""
    sums, count = {}, 0
    batches = image_data.iterate_batches(images, labels, args.batch_size, shuffle_rng, args.flip, rank=process.rank,
                                         world=process.world)
    for x, y in tqdm(batches, total=math.ceil(len(images) // process.world / args.batch_size), desc=desc,
                     leave=False, file=sys.stderr, disable=None if process.main else True):
        terms = model.train_step(x.to(device), y.to(device), optimizers)
        for k, v in terms.items():   # summed as tensors: no device sync per step
            sums[k] = sums.get(k, 0.0) + v.detach().float() * len(x)
        count += len(x)
    totals = torch.stack([*sums.values(), torch.tensor(float(count), device=device)])
    if process.world > 1:
        torch.distributed.all_reduce(totals)
    return {f"train_{k}": float(v) / float(totals[-1]) for k, v in zip(sums, totals)}


def compile_networks(groups):
    """torch.compile each trained network in place (the state dict's names stay); compiling happens at the first
    step, where a failure becomes one line (train_run)."""
    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        raise UserError("--compile needs torch.compile, which this Python or platform does not support; drop --compile")
    for module in groups.values():
        module.compile()


if __name__ == "__main__":
    common.run_cli(train)
