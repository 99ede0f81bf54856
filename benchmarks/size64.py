"""Every model at 64x64 on this machine: seconds for one training epoch and the process's peak memory.

    flock /tmp/genlab_cpu.lock python benchmarks/size64.py                      # the built-in shapes, 64x64
    flock /tmp/genlab_cpu.lock python benchmarks/size64.py --data ./food101 --models diffusion GAN
    flock /tmp/genlab_cpu.lock python benchmarks/size64.py --data objects --models flow --flags --label-attention

Each model trains one epoch with its defaults (latent diffusion: one autoencoder epoch, then one of diffusion;
the GAN without its sample-quality metric, --fid-every 0, which would first train an evaluator) in a fresh
process; the epoch's wall and CPU seconds come from the checkpoint's history, the peak resident memory from
the operating system (getrusage of the finished child). The epoch includes its validation.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from registry import MODELS  # noqa: E402

EXTRA = {"GAN": ["--fid-every", "0"], "LDM": ["--ae-epochs", "1"]}


def peak_rss_mib(command):
    """Run a command in a child that reports the peak resident memory of its own child (the training)."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024   # Linux reports KiB


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="shapes", help="data to train on (default: shapes)")
    parser.add_argument("--image-size", type=int, default=64, help="(default: 64)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="(default: all)")
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[],
                        help="train_script.py flags for every model, the rest of the line (e.g. --label-attention)")
    args = parser.parse_args()
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}, --data {args.data}, "
          f"{args.image_size}x{args.image_size}" + "".join(f" {flag}" for flag in args.flags))
    print("| model | epoch wall s | epoch CPU s | peak memory MiB |\n|---|---|---|---|")
    for name in args.models:
        folder = Path(tempfile.mkdtemp(prefix=f"size64_{name}_"))
        command = [sys.executable, str(REPO / "train_script.py"), "--model", name, "--data", args.data,
                   "--image-size", str(args.image_size), "--epochs", "1", "--models-dir", str(folder / "models"),
                   "--log-dir", str(folder / "log"), *EXTRA.get(name, []), *args.flags]
        memory = peak_rss_mib(command)
        record = torch.load(folder / "models" / f"Last_{name}.pth", weights_only=True)["history"][-1]
        print(f"| {name} | {record['seconds']:.1f} | {record['cpu_seconds']:.1f} | {memory:.0f} |", flush=True)


if __name__ == "__main__":
    main()
