"""One process with T threads against P processes with T/P threads each (torchrun, DistributedDataParallel over
gloo): the seconds of a training epoch of the same model on the same data.

    flock /tmp/genlab_cpu.lock python benchmarks/processes.py --data ../shared/data/flowers --model diffusion

Each setting trains `--epochs` epochs in a fresh folder; the last epoch's wall seconds (validation included, which
rank 0 alone runs) are reported, the first epochs being warm-up. An epoch covers the same training images either
way (with P processes, each takes batches of --batch-size from its 1/P share: a step sees P times the images).
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run(processes, threads, args):
    folder = Path(tempfile.mkdtemp(prefix=f"processes_{processes}x{threads}_"))
    train = [str(REPO / "train_script.py"), "--model", args.model, "--data", args.data, "--image-size",
             str(args.image_size), "--epochs", str(args.epochs), "--models-dir", str(folder / "models"),
             "--log-dir", str(folder / "log"), *args.extra]
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        f"--nproc_per_node={processes}"]
    subprocess.run(launcher + train, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return torch.load(folder / "models" / f"Last_{args.model}.pth", weights_only=True)["history"][-1]["seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/flowers")
    parser.add_argument("--model", default="diffusion")
    parser.add_argument("--image-size", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads in all (default: 2)")
    parser.add_argument("extra", nargs="*", help="more train_script.py flags, after --")
    args = parser.parse_args()
    for processes in (1, args.threads):
        seconds = run(processes, args.threads // processes, args)
        print(f"{processes} process(es) x {args.threads // processes} thread(s): {seconds:.1f} s an epoch", flush=True)


if __name__ == "__main__":
    main()
