"""One process with T threads against P processes with T/P threads each: P = T processes of one run (torchrun,
DistributedDataParallel over gloo), or T separate runs of 1 thread side by side (--side-by-side, e.g. T training
seeds) against the same runs one after another.

    flock /tmp/genlab_cpu.lock python benchmarks/processes.py --data ../shared/data/flowers --model diffusion
    flock /tmp/genlab_cpu.lock python benchmarks/processes.py --data ../shared/data/flowers --model GAN \
        --side-by-side --epochs 6 -- --fid-every 0

torchrun: each setting trains `--epochs` epochs in a fresh folder; the last epoch's wall seconds (validation
included, which rank 0 alone runs) are reported, the first epochs being warm-up. An epoch covers the same training
images either way (with P processes, each takes batches of --batch-size from its 1/P share: a step sees P times the
images).

--side-by-side: the wall seconds of T whole runs (start-up included), one run with T threads timed and counted T
times against T runs of 1 thread each started at once, and the training CPU seconds of an epoch (the median over
the runs' epochs, all threads counted) in each setting.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def train_command(args, folder):
    return [str(REPO / "train_script.py"), "--model", args.model, "--data", args.data, "--image-size",
            str(args.image_size), "--epochs", str(args.epochs), "--models-dir", str(folder / "models"),
            "--log-dir", str(folder / "log"), *args.extra]


def history(args, folder):
    return torch.load(folder / "models" / f"Last_{args.model}.pth", weights_only=True)["history"]


def run(processes, threads, args):
    folder = Path(tempfile.mkdtemp(prefix=f"processes_{processes}x{threads}_"))
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        f"--nproc_per_node={processes}"]
    subprocess.run(launcher + train_command(args, folder), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return history(args, folder)[-1]["seconds"]


def side_by_side(runs, threads, args):
    """(wall seconds until all `runs` runs of `threads` threads each, started at once, have ended; the median
    training CPU seconds of their epochs)."""
    folders = [Path(tempfile.mkdtemp(prefix=f"side_by_side_{runs}x{threads}_")) for _ in range(runs)]
    started = time.perf_counter()
    children = [subprocess.Popen([sys.executable] + train_command(args, folder), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
                for folder in folders]
    if any(child.wait() for child in children):
        sys.exit("error: a training run failed; run its train_script.py command alone to see why")
    wall = time.perf_counter() - started
    return wall, statistics.median(r["cpu_seconds"] for folder in folders for r in history(args, folder))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/flowers")
    parser.add_argument("--model", default="diffusion")
    parser.add_argument("--image-size", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads in all (default: 2)")
    parser.add_argument("--side-by-side", action="store_true",
                        help="separate runs side by side instead of torchrun's processes of one run")
    parser.add_argument("extra", nargs="*", help="more train_script.py flags, after --")
    args = parser.parse_args()
    if args.side_by_side:
        wall, cpu = side_by_side(1, args.threads, args)
        print(f"{args.threads} runs one after another, {args.threads} threads each: {args.threads * wall:.1f} s "
              f"({wall:.1f} s a run); {cpu:.2f} training CPU s an epoch", flush=True)
        wall, cpu = side_by_side(args.threads, 1, args)
        print(f"{args.threads} runs side by side, 1 thread each: {wall:.1f} s; {cpu:.2f} training CPU s an epoch",
              flush=True)
        return
    for processes in (1, args.threads):
        seconds = run(processes, args.threads // processes, args)
        print(f"{processes} process(es) x {args.threads // processes} thread(s): {seconds:.1f} s an epoch", flush=True)


if __name__ == "__main__":
    main()
