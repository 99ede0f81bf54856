"""Sample quality of GAN runs: against training CPU time from the history of train_script.py runs, and over sample
sets beside the floor of real images (docs/results.md, "GAN on small data").

    flock /tmp/genlab_cpu.lock python benchmarks/gan_small_data.py metric-cost models/Last_GAN.pth --evaluator E [--swd]
    python benchmarks/gan_small_data.py curves models/Last_GAN.pth:1.2 models/Last_diffusion.pth:300 --out fd.png

`metric-cost`: CPU seconds (user + system, all threads) of one sample-quality measurement as `--fid-every` makes
it (fid.SampleQuality on the run's validation split), the median of --repeat calls, and the metrics it gives.
`curves`: for each RUN[:COST] (COST the CPU seconds of one measurement, else estimated from the run's epochs:
report_tables.training_minutes), each epoch's training CPU time is its `cpu_seconds` less COST when the epoch
measured; prints the metrics of the last measurement at or before each --minutes mark, with D's mean output on
training and validation images there, and plots FD_eval against training CPU minutes. The same table, as
Markdown: `python report.py RUN ... --table --at-minutes 5 7 10 20`.

    flock /tmp/genlab_cpu.lock python benchmarks/gan_small_data.py sample-sets models/A.pth models/B.pth --evaluator E

`sample-sets`: each checkpoint's FD_eval and SWD over sample seeds S (--seeds, 0 to 9), each as `random_generation.py
--fid --swd --seed S` measures it, beside the floor of the same seed (as many training images as validation images,
drawn by randperm with seed S, against the validation images, SWD's patches and directions drawn with seed S): the
mean and its standard error, and the paired differences to the floor and to the checkpoint before it in the list.
One sample set moves SWD by 2 to 4 units; the paired means over ten tell checkpoints apart to about one unit.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import fid  # noqa: E402
import registry  # noqa: E402
from report_tables import training_minutes  # noqa: E402


def metric_cost(args):
    model, ckpt = registry.load_model(args.checkpoint)
    images, _, val_idx = registry.checkpoint_data(ckpt)
    extractor = fid.make_extractor("evaluator", None, args.evaluator, "cpu")
    quality = fid.SampleQuality([extractor], images.images[val_idx], images.labels[val_idx],
                                seed=ckpt["train_args"]["seed"], sliced_wasserstein=args.swd)
    costs = []
    for _ in range(args.repeat):
        started = time.process_time()
        metrics = quality(model)
        costs.append(time.process_time() - started)
    print(f"{args.checkpoint} (epoch {ckpt['epoch']}): {fid.format_metrics(metrics)}")
    print(f"{statistics.median(costs):.2f} CPU s per measurement (median of {args.repeat}: "
          f"{', '.join(f'{c:.2f}' for c in costs)})")


def curves(args):
    runs = {}
    for spec in args.runs:
        path, _, cost = spec.rpartition(":") if ":" in spec else (spec, None, None)
        history = common.load_checkpoint(path)["history"]
        name = Path(path).stem.removeprefix("Last_")
        runs[name] = training_minutes(history, "FD_eval", float(cost) if cost else None)
    for name, points in runs.items():
        for mark in args.minutes:
            before = [(m, r) for m, r in points if m <= mark]
            if not before:
                continue
            minutes, r = before[-1]
            terms = ["FD_eval", "KID_eval", "accuracy_eval", "train_D_x", "val_D_x"]
            print(f"{name:24s} {mark:>3g} min: epoch {r['epoch']:4d} at {minutes:5.1f} min  "
                  + "  ".join(f"{k} {r[k]:.4g}" for k in terms if k in r)
                  + f"  (best FD_eval so far {min(x['FD_eval'] for _, x in before):.4g})")
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, points in runs.items():
            ax.plot([m for m, _ in points], [r["FD_eval"] for _, r in points], label=name, lw=1.2)
        ax.set(xlabel="training CPU minutes (sample-quality measurements excluded)", ylabel="FD_eval (log scale)",
               yscale="log", title=args.title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")


def mean_and_error(values):
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values) / len(values) ** 0.5:.2g}"


def sample_sets(args):
    extractor = fid.make_extractor("evaluator", None, args.evaluator, "cpu")
    loaded = {path: registry.load_model(path) for path in args.checkpoints}
    trained_on = {path: (ckpt["train_args"]["data"], tuple(ckpt["image_shape"]), ckpt["train_args"]["seed"])
                  for path, (_, ckpt) in loaded.items()}
    first = args.checkpoints[0]
    for path, on in trained_on.items():   # one floor for all: the same data, size and split
        if on != trained_on[first]:
            print(f"error: {path} was trained on {on} (data, shape, split seed), {first} on {trained_on[first]}: "
                  "measure checkpoints of one data set and size together", file=sys.stderr)
            sys.exit(2)
    data, train_idx, val_idx = registry.checkpoint_data(loaded[first][1])
    real = data.images[val_idx]
    # One SampleQuality per condition kind and seed, shared by the checkpoints: the real side computed once
    qualities = {}
    readings, floors = {}, {}   # path -> {seed: (FD_eval, SWD)}; the floor's likewise
    for path, (model, _) in loaded.items():
        condition = model.condition or "class"
        readings[path] = {}
        for seed in args.seeds:
            if (condition, seed) not in qualities:
                conditions = data.conditions(condition)[0][val_idx]
                qualities[condition, seed] = fid.SampleQuality([extractor], real, conditions, seed=seed,
                                                               sliced_wasserstein=True)
            quality = qualities[condition, seed]
            metrics = quality(model)
            readings[path][seed] = metrics["FD_eval"], metrics["SWD"]
            if seed not in floors:   # real images against real ones, drawn and projected with the same seed
                pick = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))]
                train = data.images[pick[:len(val_idx)]]
                distances = fid.feature_distances(extractor, extractor(train, cache=False), quality.real[0][1])
                floors[seed] = distances["FD_eval"], quality.sliced_wasserstein(train)["SWD"]
            print(f"{path} seed {seed}: FD_eval {readings[path][seed][0]:.5g} SWD {readings[path][seed][1]:.5g} "
                  f"(floor: FD_eval {floors[seed][0]:.5g} SWD {floors[seed][1]:.5g})", flush=True)
    print(f"\nmean ± standard error over sample seeds {' '.join(map(str, args.seeds))}")
    for i, name in enumerate(("FD_eval", "SWD")):
        print(f"floor {name}: {mean_and_error([floors[s][i] for s in args.seeds])}")
        previous = None
        for path, values in readings.items():
            line = (f"{path} {name}: {mean_and_error([values[s][i] for s in args.seeds])}; minus the floor "
                    f"{mean_and_error([values[s][i] - floors[s][i] for s in args.seeds])}")
            if previous is not None:
                differences = [values[s][i] - readings[previous][s][i] for s in args.seeds]
                line += f"; minus {previous} {mean_and_error(differences)}"
            print(line)
            previous = path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("metric-cost", help="CPU seconds of one sample-quality measurement")
    p.add_argument("checkpoint")
    p.add_argument("--evaluator", required=True, help="the evaluator the run measured with")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--swd", action="store_true", help="with SWD, as train_script.py --swd measures")
    p = sub.add_parser("curves", help="metrics at CPU-time marks, and the plot")
    p.add_argument("runs", nargs="+", help="PATH or PATH:COST, COST the CPU seconds of one measurement "
                   "(metric-cost); without it, estimated from the run's epochs")
    p.add_argument("--minutes", type=float, nargs="+", default=[5, 10, 20])
    p.add_argument("--out", default=None, help="PNG of FD_eval against training CPU minutes")
    p.add_argument("--title", default="")
    p = sub.add_parser("sample-sets", help="FD_eval and SWD over sample seeds, beside the floor of each")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--evaluator", required=True, help="the evaluator the runs measured with")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    args = parser.parse_args(argv)
    if args.command == "sample-sets" and len(args.seeds) < 2:
        parser.error("--seeds: give at least two, for a standard error")
    torch.manual_seed(0)
    {"metric-cost": metric_cost, "curves": curves, "sample-sets": sample_sets}[args.command](args)


if __name__ == "__main__":
    main()
