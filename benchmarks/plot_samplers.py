"""FD_eval against network evaluations (log x), one line per checkpoint and sampler, from a CSV of measurements.

    python benchmarks/plot_samplers.py docs/samplers.csv docs/samplers.png

The CSV has the columns model, sampler, nfe, FD_eval (one row per measurement, as printed by
`python random_generation.py --model M --checkpoint CKPT --sampler S --steps N --fid --fid-features evaluator`).
"""
import argparse
import csv
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv")
    parser.add_argument("out")
    args = parser.parse_args()
    lines = defaultdict(list)
    with open(args.csv, newline="") as f:
        for row in csv.DictReader(f):
            lines[f"{row['model']}, {row['sampler']}"].append((int(row["nfe"]), float(row["FD_eval"])))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in sorted(lines.items()):
        points.sort()
        ax.plot([n for n, _ in points], [fd for _, fd in points], marker="o", label=name)
    ax.set(xscale="log", xlabel="network evaluations per sample", ylabel="FD_eval (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
