"""The tables of report.py, from saved runs: the table of runs (--table), the sample-quality metric logged during
training at marks of training CPU time (--table --at-minutes), and sample quality measured anew with given sampler
options (--quality). docs/results.md says which command regenerates each of its tables."""
import argparse
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import common
import config_file
import fid
import image_data
import random_generation
import swd
from common import UserError
from registry import checkpoint_data, load_model

# Not how a run trains, or shown elsewhere in the table: left out of "settings that differ".
NOT_COMPARED = (*config_file.NOT_SETTINGS, "model", "run_name", "models_dir", "log_dir")
RECORD_KEYS = ("epoch", "lr", "seconds", "cpu_seconds")   # the rest of a record: losses and sample-quality metrics
HIGHER_IS_BETTER = ("accuracy_eval",)


@dataclass
class Run:
    name: str          # file-safe, unique in the report
    path: Path
    model: torch.nn.Module
    ckpt: dict

    @property
    def history(self):
        return self.ckpt["history"]

    @property
    def settings(self):
        return {k: v for k, v in {**self.ckpt["train_args"], **self.ckpt["config"]}.items() if k not in NOT_COMPARED}


def checkpoint_path(run, models_dir, kinds=("Last", "Best")):
    """A checkpoint path as it is; a run name as <models-dir>/<kind>_<run>.pth, the first of `kinds` that exists: Last
    (the whole history) for the tables of runs, Best (what random_generation.py samples) for sample quality."""
    if run.endswith(".pth") or Path(run).is_file():
        return Path(run)
    for kind in kinds:
        path = Path(models_dir) / f"{kind}_{run}.pth"
        if path.is_file():
            return path
    raise UserError(f"no run '{run}' in '{models_dir}' (neither Last_{run}.pth nor Best_{run}.pth); pass a run name "
                    "of --models-dir or a checkpoint path")


def load_runs(names, models_dir, device, kinds=("Last", "Best")):
    runs = []
    for given in names:
        path = checkpoint_path(given, models_dir, kinds)
        model, ckpt = load_model(path, device=device)
        name = re.sub(r"[^\w.-]", "_", ckpt["train_args"].get("run_name") or path.stem)
        while name in [r.name for r in runs]:   # the same run twice (its Last and Best, say)
            name += "_"
        runs.append(Run(name, path, model.eval(), ckpt))
    return runs


# ----------------------------------------------------------------------------------------------
# The table of runs
# ----------------------------------------------------------------------------------------------

def shown(value):
    if isinstance(value, float):
        return f"{value:g}"
    if value == "":
        return '""'
    return common.describe_default(value)


def differing(runs):
    """The settings on which the runs that have them disagree (a model's own flags, which another model lacks,
    count only among the runs of models that have them)."""
    keys = list(dict.fromkeys(k for run in runs for k in run.settings))
    return [k for k in keys if len({shown(run.settings[k]) for run in runs if k in run.settings}) > 1]


def total(history, key):
    """The sum of a time over the history; None when a record lacks it (checkpoints older than cpu_seconds)."""
    values = [record.get(key) for record in history]
    return None if any(v is None for v in values) else sum(values)


def seconds(value):
    return "n/a" if value is None else f"{value:.1f} s"


def quality_metrics(runs):
    """Sample-quality metrics in any run's history, in the order they were logged."""
    names = (k for run in runs for record in run.history for k, v in record.items()
             if v is not None and k not in RECORD_KEYS and not k.startswith(("train_", "val_")))
    return list(dict.fromkeys(names))


def best(history, metric):
    """(best value, its epoch) of a metric over the history, or None when it was never measured."""
    points = [(record[metric], record["epoch"]) for record in history if record.get(metric) is not None]
    if not points:
        return None
    return (max if metric in HIGHER_IS_BETTER else min)(points, key=lambda point: point[0])


def selection_metric(run):
    """What Best was chosen on, as train_script chooses: the first FD-like metric for a model that selects by sample
    quality and measured it, else the validation loss."""
    if run.model.selects_by_sample_quality:
        measured = [k for k in quality_metrics([run]) if k in ("FID", "FD_eval")]
        if measured:
            return measured[0]
    return "val_loss"


def runs_table(runs):
    """The Markdown table of runs, and notes on what some runs lack."""
    keys = differing(runs)
    rows = ["| run | model | settings that differ | epochs | CPU time | wall time | best (epoch) | other validation "
            "terms there | sample quality, best (epoch) |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for run in runs:
        settings = ", ".join(f"{k} {shown(run.settings[k])}" for k in keys if k in run.settings) or "-"
        metric = selection_metric(run)
        best_selected = best(run.history, metric)
        selected = f"{metric} {best_selected[0]:.5g} ({best_selected[1]})" if best_selected else "not validated"
        at_best = next((r for r in run.history if best_selected and r["epoch"] == best_selected[1]), {})
        terms = ", ".join(f"{k} {v:.5g}" for k, v in at_best.items()
                          if k.startswith("val_") and k not in ("val_loss", metric) and v is not None) or "-"
        measured = [(k, best(run.history, k)) for k in quality_metrics([run])]
        quality = ", ".join(f"{k} {v:.4g} ({epoch})" for k, (v, epoch) in measured) or "not measured"
        rows.append(f"| {run.name} | {run.ckpt['model']} | {settings} | {run.ckpt['epoch']} | "
                    f"{seconds(total(run.history, 'cpu_seconds'))} | {seconds(total(run.history, 'seconds'))} | "
                    f"{selected} | {terms} | {quality} |")
        if not measured:
            notes.append(f"{run.name} has no sample-quality metrics (trained without --fid-every): its row and "
                         "loss curves only.")
        if total(run.history, "cpu_seconds") is None:
            notes.append(f"{run.name}'s checkpoint predates CPU-time records: its CPU time is n/a.")
    return rows, notes


def training_minutes(history, metric, cost=None):
    """[(training CPU minutes, record)] of the epochs that measured `metric`. Each epoch counts its cpu_seconds, less
    one measurement's cost where it measured: `cost` CPU seconds, else estimated from the run itself as the median
    epoch that measured less the median one that did not (0 when every epoch measured)."""
    measured = [r["cpu_seconds"] for r in history if r.get(metric) is not None]
    unmeasured = [r["cpu_seconds"] for r in history if r.get(metric) is None]
    if cost is None:
        cost = statistics.median(measured) - statistics.median(unmeasured) if measured and unmeasured else 0.0
    points, cpu = [], 0.0
    for record in history:
        cpu += record["cpu_seconds"] - (cost if record.get(metric) is not None else 0.0)
        if record.get(metric) is not None:
            points.append((cpu / 60, record))
    return points


def marks_table(runs, marks, unit="min"):
    """Markdown rows: per run, the last measurement of its FID or FD_eval at or before each mark (with KID, SWD and
    D's mean output on training against validation images where logged), and its best. Marks are minutes of training CPU
    time (unit "min"; the measurements' own cost left out) or epochs (unit "epoch"). A measurement before its mark
    (by over a minute, or an epoch) says when it was; a run that ended before 80% of a mark has no cell there."""
    rows = ["| run | " + " | ".join(f"{m:g} {unit}" for m in marks) + " | best (epoch) |",
            "|---|" + "---|" * (len(marks) + 1)]
    for run in runs:
        metric = next((k for k in quality_metrics([run]) if k in ("FID", "FD_eval")), None)
        if metric is None or (unit == "min" and total(run.history, "cpu_seconds") is None):
            missing = "no sample-quality metric" + " with CPU times" * (unit == "min")
            rows.append(f"| {run.name} | " + " | ".join("-" for _ in marks) + f" | {missing} |")
            continue
        if unit == "min":
            points = training_minutes(run.history, metric)
        else:
            points = [(r["epoch"], r) for r in run.history if r.get(metric) is not None]
        cells = []
        for mark in marks:
            before = [(m, r) for m, r in points if m <= mark]
            if not before or points[-1][0] * 1.25 < mark:   # none yet, or the run ended well before the mark
                cells.append("-")
                continue
            at, r = before[-1]
            kid = metric.replace("FID", "KID").replace("FD_eval", "KID_eval")
            cells.append(f"{r[metric]:.3g}" + (f" / {r[kid]:.2g}" if r.get(kid) is not None else "")
                         + (f"; SWD {r['SWD']:.3g}" if r.get("SWD") is not None else "")
                         + (f"; D {r['train_D_x']:.2f} vs {r['val_D_x']:.2f}" if "train_D_x" in r else "")
                         + (f" (at {at:.1f})" if unit == "min" and mark - at > 1 else "")
                         + (f" (at {at})" if unit != "min" and at < mark else ""))
        value, epoch = best(run.history, metric)
        rows.append(f"| {run.name} | " + " | ".join(cells) + f" | {metric} {value:.3g} ({epoch}) |")
    return rows


def window_table(runs, marks, half):
    """Markdown rows: per run and sample-quality metric logged during training (FID or FD_eval, and SWD), the mean of
    its readings within `half` minutes of training CPU time of each mark (placed as training_minutes places them):
    single readings move with the samples drawn, their mean over a window less."""
    rows = [f"| run | metric (mean within {half:g} min) | " + " | ".join(f"{m:g} min" for m in marks) + " |",
            "|---|---|" + "---|" * len(marks)]
    for run in runs:
        if total(run.history, "cpu_seconds") is None:
            continue
        for metric in (k for k in quality_metrics([run]) if k in ("FID", "FD_eval", "SWD")):
            points = training_minutes(run.history, metric)
            cells = []
            for mark in marks:
                near = [r[metric] for at, r in points if abs(at - mark) <= half]
                cells.append(f"{sum(near) / len(near):.3g}" if near else "-")
            rows.append(f"| {run.name} | {metric} | " + " | ".join(cells) + " |")
    return rows


# ----------------------------------------------------------------------------------------------
# Sample quality with given sampler options (--quality)
# ----------------------------------------------------------------------------------------------

# RUN@key=value,...: random_generation.py's sampler flags, each with its type
def interval(text):
    """'0.28:5.42' -> (0.28, 5.42), a guidance interval (lo, hi]."""
    lo, sep, hi = text.partition(":")
    if not sep:
        raise ValueError(text)
    return float(lo), float(hi)


SPEC_KEYS = {"sampler": str, "steps": int, "eta": float, "guidance": float, "guidance_interval": interval,
             "labels": str, "layouts": str}


def parse_spec(spec):
    """'RUN@sampler=ddim,steps=20' -> ('RUN', {'sampler': 'ddim', 'steps': 20}); a bare RUN has no options."""
    if "@" not in spec or Path(spec).is_file():
        return spec, {}
    run, _, text = spec.rpartition("@")
    options = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in SPEC_KEYS:
            raise UserError(f"'{item}' in '{spec}' is not KEY=VALUE with KEY among {', '.join(SPEC_KEYS)}; e.g. "
                            f"{run}@sampler=ddim,steps=20")
        try:
            options[key] = SPEC_KEYS[key](value)
        except ValueError:
            kind = {int: "an integer", interval: "LO:HI, two numbers"}.get(SPEC_KEYS[key], "a number")
            raise UserError(f"'{item}' in '{spec}': {key} takes {kind}, not '{value}'") from None
    return run, options


def shown_option(key, value):
    """A sampler option as the quality table shows it: a file by its name, a number as short as it reads, an
    interval as LO:HI."""
    if key in ("labels", "layouts"):
        return Path(value).name
    if isinstance(value, tuple):
        return ":".join(f"{v:g}" for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


@torch.no_grad()
def reconstruction_quality(run, args, device):
    """For an autoencoder (stage) that does not generate: the Fréchet and kernel distances of the reconstructions of
    the validation images to those images, which bound what a generative model on its codes can reach."""
    data, _, val_idx = checkpoint_data(run.ckpt)
    real = data.images[val_idx]
    reconstructions = torch.cat([fid.quantize(run.model.reconstruct(image_data.to_float(batch).to(device)))
                                 for batch in real.split(256)])
    args.fid_features = args.fid_features or run.ckpt["train_args"].get("fid_features", ["inception"])
    metrics = {}
    for extractor in fid.extractors_from_args(args, run.ckpt["train_args"]["data"], real.shape[-1], device,
                                              dataset=data):
        metrics.update(fid.feature_distances(extractor, extractor(reconstructions, cache=False),
                                             extractor(real, cache=False)))
    return metrics


def quality_table(specs, args, device):
    """Markdown rows: per RUN@OPTIONS, what `random_generation.py --checkpoint RUN --fid` with those sampler flags
    measures (N samples for the validation images' conditions against them, seed --seed), the score on a labels or
    layouts file where one is given, and the CPU seconds of the sampling and the metrics. A run that does not
    generate but reconstructs (an autoencoder stage) gets the distances of its reconstructions instead."""
    results = []
    for spec in specs:
        given, options = parse_spec(spec)
        run, = load_runs([given], args.models_dir, device, kinds=("Best", "Last"))
        flags = argparse.Namespace(**{**vars(args), "model": run.ckpt["model"], "class_label": None,
                                      **{k: options.get(k) for k in SPEC_KEYS}})
        started = time.process_time()
        if not run.model.generates and run.model.reconstructs and not options:
            metrics = reconstruction_quality(run, flags, device)
        else:
            sampler_options = random_generation.sample_options(run.model, run.ckpt, flags, device)
            drawn = None
            if "labels" in sampler_options:   # one image per label set or layout of the file
                drawn = run.model.sample(len(sampler_options["labels"]),
                                         torch.Generator(device).manual_seed(args.seed), **sampler_options)
            metrics, _, _ = random_generation.measure(run.model, run.ckpt, flags, device, sampler_options, drawn)
        described = ", ".join(f"{k} {shown_option(k, options[k])}" for k in SPEC_KEYS if k in options)
        described = described or ("defaults" if run.model.generates else "reconstructions")
        results.append((run.name, described, metrics, time.process_time() - started))
    columns = list(dict.fromkeys(k for _, _, metrics, _ in results for k in metrics if not k.endswith("_std")))
    rows = ["| run | sampler options | " + " | ".join(columns) + " | CPU s |", "|---|---|" + "---|" * len(columns)
            + "---|"]
    for name, described, metrics, cpu in results:
        rows.append(f"| {name} | {described} | " + " | ".join(f"{metrics[k]:.4g}" if k in metrics else "-"
                                                               for k in columns) + f" | {cpu:.0f} |")
    return rows


# ----------------------------------------------------------------------------------------------
# The evaluators and the scale of FD_eval (--evaluators)
# ----------------------------------------------------------------------------------------------

def evaluators_table(paths):
    """Markdown rows: per file of `fid.py train-evaluator` or `train-segmenter`, its data, size and validation score as
    saved, and for a feature evaluator the floor of FD_eval on its data: the first N training images against the N
    validation images of its split (FD_eval / KID_eval, and SWD; real data against real data at the N of the
    metrics)."""
    rows = ["| evaluator | data | size | validation score | training against validation images (N) |",
            "|---|---|---|---|---|"]
    for path in paths:
        saved = common.load_checkpoint(path) if Path(path).is_file() else None
        kind = saved.get("kind") if isinstance(saved, dict) else None
        if kind not in ("genlab evaluator", "genlab segmenter"):
            raise UserError(f"'{path}' is not a file of `fid.py train-evaluator` or `fid.py train-segmenter`")
        channels, size = saved["image_shape"][:2]
        if kind == "genlab segmenter":
            rows.append(f"| {Path(path).name} | {saved['data']} | {size} | mIoU {saved['val_miou']:.3f} | - |")
            continue
        extractor = fid.make_extractor("evaluator", evaluator_file=path)
        data = image_data.load_data(saved["data"], size, channels)
        train_idx, val_idx = image_data.split_indices(len(data.images), saved["seed"])
        val_images, train_images = data.images[val_idx], data.images[train_idx[:len(val_idx)]]
        real, train = (extractor(images, cache=False) for images in (val_images, train_images))
        floor = fid.feature_distances(extractor, train, real)
        floor_swd = swd.swd(val_images, train_images)["SWD"]
        score = "Lab6 accuracy" if saved.get("task") == "labels" else "accuracy"
        rows.append(f"| {Path(path).name} | {saved['data']} | {size} | {score} {saved['val_accuracy']:.3f} | "
                    f"FD_eval {floor['FD_eval']:.3f} / KID_eval {floor['KID_eval']:.3f}; SWD {floor_swd:.3g} "
                    f"({len(val_idx)}) |")
    return rows

