"""Compare training runs: `python report.py VAE diffusion --out reports/vae_vs_diffusion` -> report.md and pictures.

Reads only what training saved: each run's checkpoint (<models-dir>/Last_<run>.pth, else Best_<run>.pth, or a
checkpoint path), its history (one record per epoch) and its weights (registry.load_model). Which command
regenerates what:
    python report.py RUN [RUN ...] --out reports/NAME   reports/NAME/report.md, with beside it
        losses.png           training (solid) and validation (dashed) loss of every run, by epoch
        metric_<name>.png    each sample-quality metric (FID, FD_eval, KID, accuracy_eval) by epoch and by CPU time
        samples_<run>.png    16 samples of the checkpoint, or validation images above their reconstructions
        denoising_<run>.png  x_T ... x_0, for models that denoise
        closest_<run>.png    the samples nearest to a training image, above those training images
    python report.py RUN [RUN ...] --table             the table of runs alone, as Markdown on stdout (no sampling):
                                                       how docs' results tables are regenerated from saved runs
    python report.py RUN ... --table --at-minutes 5 10 20   and the sample-quality metric logged during training at
                                                       those minutes of training CPU time (measurements excluded);
                                                       --at-epochs 10 20: at those epochs; --window 2.5: also the
                                                       mean of its readings within 2.5 minutes of each mark
    python report.py RUN@sampler=ddim,steps=20 ... --quality   a table of sample quality, a row per RUN@OPTIONS:
                                                       what random_generation.py --fid prints with those sampler flags
                                                       (a run name is its Best_<run>.pth here)
    python report.py --evaluators FILE ...               the evaluators' own scores and the floor of FD_eval
The table has each run's model, the settings that differ between the runs, epochs, CPU and wall time (sums over the
history), the best of the metric Best is chosen on and its epoch with the other validation terms of that epoch, and
the best sample quality. The memorisation check (memorisation.py) compares --samples samples with the training and
validation images of the run's data.
"""
import shlex
import sys
from pathlib import Path

import torch
from matplotlib.ticker import MaxNLocator

import common
import fid
import image_data
import memorisation
import visualization   # its pictures of one model; it also selects matplotlib's file-only backend
from common import UserError
from registry import checkpoint_data
from report_tables import (evaluators_table, load_runs, marks_table, parse_spec, quality_metrics, quality_table,
                           runs_table, window_table)

import matplotlib.pyplot as plt   # noqa: E402 (after visualization chose the backend)

GRID = 16   # samples in each run's picture


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

def plot_losses(runs, path):
    """Every run's training loss (solid) and validation loss (dashed, a dot per validation) on one plot."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, run in enumerate(runs):
        ax.plot([r["epoch"] for r in run.history], [r["train_loss"] for r in run.history], ".-", color=f"C{i}",
                label=f"{run.name} train")
        validated = [r for r in run.history if r.get("val_loss") is not None]
        ax.plot([r["epoch"] for r in validated], [r["val_loss"] for r in validated], "o--", color=f"C{i}",
                label=f"{run.name} validation")
    losses = [r[k] for run in runs for r in run.history for k in ("train_loss", "val_loss") if r.get(k) is not None]
    ax.set(xlabel="epoch", ylabel="loss", yscale="log" if min(losses) > 0 else "linear")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))   # beside the curves, not over them
    save_figure(fig, path)


def plot_metric(runs, metric, path):
    """One metric against epochs (left) and against cumulative CPU seconds (right), a line per run that has it."""
    fig, (by_epoch, by_cpu) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for i, run in enumerate(runs):
        cpu, points = 0.0, []
        for record in run.history:
            cpu = None if cpu is None or record.get("cpu_seconds") is None else cpu + record["cpu_seconds"]
            if record.get(metric) is not None:
                points.append((record["epoch"], cpu, record[metric]))
        if not points:
            continue
        by_epoch.plot([p[0] for p in points], [p[2] for p in points], "o-", color=f"C{i}", label=run.name)
        if all(p[1] is not None for p in points):
            by_cpu.plot([p[1] for p in points], [p[2] for p in points], "o-", color=f"C{i}", label=run.name)
    by_epoch.set(xlabel="epoch", ylabel=metric)
    by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_cpu.set(xlabel="CPU seconds of training (cumulative)")
    by_epoch.legend(fontsize="small")
    save_figure(fig, path)


def save_figure(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Pictures from the weights: samples or reconstructions, denoising, memorisation
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def draw_samples(run, args, device):
    """--samples uint8 samples with the model's default sampler, `--steps` steps for one that takes steps."""
    options = {"steps": args.steps} if "steps" in run.model.sample_options else {}
    return fid.generate(run.model, args.samples, torch.Generator(device).manual_seed(args.seed), **options)


def run_data(run, data):
    """(images, train indices, validation indices) of the run's data, or the reason it could not be read."""
    try:
        return checkpoint_data(run.ckpt, data), None
    except UserError as err:
        return None, f"{run.name}'s data could not be read ({err}); pass --data PATH"


def evaluator_for(run, data_name, models_dir):
    """The offline evaluator of the run's data and size (fid.py train-evaluator), if there is one."""
    path = fid.evaluator_path(data_name, run.ckpt["image_shape"][1], models_dir)
    if not Path(path).is_file():
        return None
    extractor = fid.make_extractor("evaluator", evaluator_file=path)
    return extractor if tuple(extractor.image_shape) == tuple(run.ckpt["image_shape"]) else None   # its channels


def picture_section(run, samples, data, out, device):
    """samples_<run>.png: reconstructions of validation images for a model previewed by them, else samples.
    Returns (file or None, caption)."""
    path = out / f"samples_{run.name}.png"
    if run.model.preview == "reconstructions" and data is not None:
        images, _, val_idx = data
        visualization.save_reconstructions(run.model, images.images[val_idx[:GRID // 2]], path, device)
        return path.name, "validation images (top) and their reconstructions"
    if samples is None:
        return None, "no picture: the model does not generate and its data could not be read"
    common.save_image_grid(image_data.to_float(samples[:GRID]), path, nrow=GRID // 2)
    return path.name, f"{GRID} samples"


def memorisation_rows(run, samples, data, evaluator, out):
    """Table rows of the memorisation check in each space, and the picture of the closest pairs."""
    images, train_idx, val_idx = data
    checks = memorisation.check(samples, images.images[train_idx], images.images[val_idx], evaluator)
    picture = out / f"closest_{run.name}.png"
    common.grid_to_pil(memorisation.closest_pairs(samples, images.images[train_idx], checks[0]), scale=4).save(picture)
    rows = [f"| {run.name} | {c.space} | {c.share:.1%} | {c.threshold:.4g} | {c.sample_distances.min().item():.4g} | "
            f"{c.sample_distances.median().item():.4g} | {c.validation_distances.median().item():.4g} |" for c in checks]
    return rows, picture.name


def history_sections(runs, out):
    """The parts of the report that come from the histories alone: the table, the losses and the metrics."""
    rows, notes = runs_table(runs)
    lines = ["## Runs", ""] + rows + [""] + [f"- {n}" for n in notes] + ["", "## Losses", ""]
    plot_losses(runs, out / "losses.png")
    lines += ["![training and validation losses](losses.png)", "", "## Sample quality", ""]
    metrics = quality_metrics(runs)
    for metric in metrics:
        plot_metric(runs, metric, out / f"metric_{metric}.png")
        lines += [f"![{metric} by epoch and by CPU time](metric_{metric}.png)", ""]
    if not metrics:
        lines += ["No run has sample-quality metrics (train with --fid-every N to log them).", ""]
    return lines


def weights_sections(runs, args, out, device):
    """The parts that come from the weights: samples or reconstructions, denoising, the memorisation check."""
    pictures, captions, denoising, memorised, pairs, skipped = [], [], [], [], [], []
    for run in runs:
        data, problem = run_data(run, args.data)
        samples = draw_samples(run, args, device) if run.model.generates else None
        picture, caption = picture_section(run, samples, data, out, device)
        pictures.append(f"![{run.name}]({picture})" if picture else "-")
        captions.append(caption)
        if run.model.denoises:
            visualization.save_denoising(run.model, 4, out / f"denoising_{run.name}.png", device, args.seed)
            denoising += [f"{run.name}:", "", f"![{run.name} denoising](denoising_{run.name}.png)", ""]
        if samples is None:
            skipped.append(f"{run.name}: the model does not generate (an autoencoder stage)")
        elif data is None:
            skipped.append(problem)
        else:
            data_name = args.data or run.ckpt["train_args"]["data"]
            try:
                rows, pair_picture = memorisation_rows(run, samples, data,
                                                       evaluator_for(run, data_name, args.models_dir), out)
            except UserError as err:   # an unreadable evaluator file: say so, and go on with the other runs
                skipped.append(f"{run.name}: {err}")
                continue
            memorised += rows
            pairs += [f"{run.name}:", "", f"![{run.name}: closest samples and training images]({pair_picture})", ""]
    options = f" ({args.steps} sampler steps for models that take steps)" if any(
        "steps" in r.model.sample_options for r in runs) else ""
    lines = ["## Samples", "", f"From each checkpoint's weights, seed {args.seed}{options}.", "",
             "| " + " | ".join(r.name for r in runs) + " |", "|" + "---|" * len(runs),
             "| " + " | ".join(pictures) + " |", "| " + " | ".join(captions) + " |", ""]
    if denoising:
        lines += ["## Denoising", "", "One sample per row, x_T on the left to x_0 on the right.", ""] + denoising
    lines += ["## Memorisation", "", f"{args.samples} samples of each run against its training images: the share "
              "closer to a training image than 95% of validation images are (below validation's 5th percentile of "
              "nearest-training distance; data-like samples give about 5%, copies up to 100%). Distances are "
              "Euclidean, pixels in [0, 1] (see memorisation.py).", ""]
    if memorised:
        lines += ["| run | space | below validation's 5th percentile | that percentile | nearest sample | median "
                  "sample | median validation |", "|---|---|---|---|---|---|---|"] + memorised + [""]
        lines += ["The samples nearest to a training image (top) and those training images (bottom):", ""] + pairs
    return lines + [f"- not checked: {s}" for s in skipped]


def write_report(runs, args, argv, out, device):
    lines = [f"# Report: {', '.join(r.name for r in runs)}", "", f"Regenerate: `python report.py {shlex.join(argv)}`",
             ""] + history_sections(runs, out) + weights_sections(runs, args, out, device)
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def main(argv=None):
    parser = common.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", help="run names (<models-dir>/Last_<run>.pth, else Best_<run>.pth) or "
                        "checkpoint paths")
    parser.add_argument("--out", default=None, help="the report's folder (default: reports/<run>_vs_<run>...)")
    parser.add_argument("--table", action="store_true", help="print only the table of runs, as Markdown, and write "
                        "nothing (no sampling: fast)")
    parser.add_argument("--evaluators", nargs="+", default=None, metavar="FILE",
                        help="print only a table of these evaluators (fid.py train-evaluator, train-segmenter): their "
                             "validation scores and the FD_eval of training against validation images")
    parser.add_argument("--at-minutes", type=common.checked(float, 0), nargs="+", default=None,
                        help="with --table: also the sample-quality metric logged during training at these minutes "
                             "of training CPU time")
    parser.add_argument("--window", type=common.checked(float, 0), default=None, metavar="MINUTES",
                        help="with --at-minutes: also the mean of each sample-quality metric's readings (FID or "
                             "FD_eval, and SWD) within this many minutes of each mark")
    parser.add_argument("--at-epochs", type=common.checked(int, 1), nargs="+", default=None,
                        help="with --table: also the sample-quality metric logged during training at these epochs")
    parser.add_argument("--quality", action="store_true", help="print only a table of sample quality, a row per "
                        "RUN[@OPTIONS] (OPTIONS: sampler=S,steps=N,eta=E,guidance=W,guidance_interval=LO:HI,labels=FILE,"
                        "layouts=PATH), as random_generation.py --fid measures it")
    fid.add_metric_flags(parser)
    parser.set_defaults(fid_features=None)   # None: the features each run was trained with, as random_generation
    parser.add_argument("--models-dir", default="models", help="where run names are looked up (default: models)")
    parser.add_argument("--samples", type=common.checked(int, GRID), default=256,
                        help=f"samples of each run for its picture (the first {GRID}) and the memorisation check "
                             "(default: 256)")
    parser.add_argument("--steps", type=common.checked(int, 1), default=20,
                        help="sampler steps for models that take them (diffusion): few, to stay fast (default: 20)")
    parser.add_argument("--seed", type=common.checked(int, 0), default=0, help="seeds the samples (default: 0)")
    parser.add_argument("--data", default=None, help="the runs' data, if it moved since training (default: the "
                        "data each checkpoint names)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                        help="where to run the models; auto: cuda, else mps, else cpu (default: auto)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    device = common.pick_device(args.device)
    if args.evaluators:
        print("\n".join(evaluators_table(args.evaluators)))
        return
    if not args.runs:
        raise UserError("name at least one run (a run name of --models-dir or a checkpoint path), or pass --evaluators")
    if (args.at_minutes or args.at_epochs) and not args.table:
        raise UserError("--at-minutes and --at-epochs add to the table of runs: pass them with --table")
    if args.window is not None and not args.at_minutes:
        raise UserError("--window averages the readings around the marks of --at-minutes: pass it with --at-minutes")
    if args.quality:
        print("\n".join(quality_table(args.runs, args, device)))
        return
    given = [parse_spec(spec) for spec in args.runs]
    if any(options for _, options in given):
        raise UserError("RUN@OPTIONS (sampler options) are for --quality; name runs alone for a report or --table")
    runs = load_runs(args.runs, args.models_dir, device)
    if args.table:
        rows, notes = runs_table(runs)
        if args.at_minutes:
            rows += [""] + marks_table(runs, args.at_minutes, "min")
        if args.window is not None:
            rows += [""] + window_table(runs, args.at_minutes, args.window)
        if args.at_epochs:
            rows += [""] + marks_table(runs, args.at_epochs, "epoch")
        print("\n".join(rows + [""] * bool(notes) + [f"- {n}" for n in notes]))
        return
    out = common.output_dir(args.out or Path("reports") / "_vs_".join(r.name for r in runs), "--out")
    print(f"wrote {write_report(runs, args, argv, out, device)}")


if __name__ == "__main__":
    common.run_cli(main)
