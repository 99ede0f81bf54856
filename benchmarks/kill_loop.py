"""Kill training with SIGKILL at random moments, again and again, and check that nothing is lost.

    python benchmarks/kill_loop.py --kills 20          # AE on the built-in shapes, about 3 minutes on 2 cores

One run trains straight through (the reference). Another is started, killed after a random delay, and started
again (`--resume` once a Last exists), `--kills` times, then left to finish. After every kill each Best/Last
checkpoint must load (weights_only), and a stray `*.tmp` of a save cut short may be there; the next start removes
it. A run killed between the first epoch's Best and Last saves restarts with --overwrite. At the end: no stray
file, and the resumed run's weights equal the reference's bit for bit. The counts are
printed; the exit status is 1 when any check failed.
"""
import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def command(folder, args):
    """Train in `folder`: --resume once a Last exists; --overwrite when only a Best does (killed between the two
    saves of the first epoch), since then there is nothing to continue."""
    models = folder / "models"
    flags = ["--model", args.model, "--image-size", "24", "--epochs", str(args.epochs), "--models-dir", str(models),
             "--log-dir", str(folder / "log")]
    if (models / f"Last_{args.model}.pth").is_file():
        flags.append("--resume")
    elif (models / f"Best_{args.model}.pth").is_file():
        flags.append("--overwrite")
    return [sys.executable, str(REPO / "train_script.py"), *flags]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="how many times to kill the run (default: 20)")
    parser.add_argument("--model", default="AE", help="the model to train (default: AE)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the run (default: 8)")
    parser.add_argument("--max-delay", type=float, default=12.0,
                        help="a kill comes after a uniform random delay up to this many seconds (default: 12)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the delays (default: 0)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kill_loop_"))
    reference, killed = root / "reference", root / "killed"
    subprocess.run(command(reference, args), check=True, capture_output=True)
    models = killed / "models"
    unreadable = tmp_seen = 0
    started = time.perf_counter()
    for kill in range(1, args.kills + 1):
        process = subprocess.Popen(command(killed, args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, args.max_delay))
        process.send_signal(signal.SIGKILL)
        process.wait()
        for path in models.glob("*.pth") if models.is_dir() else []:
            try:
                torch.load(path, weights_only=True)
            except Exception:
                unreadable += 1
                print(f"kill {kill}: {path.name} does not load")
        tmp_seen += len(list(models.glob("*.tmp"))) if models.is_dir() else 0
    finish = subprocess.run(command(killed, args), capture_output=True, text=True)
    last = models / f"Last_{args.model}.pth"
    stray = [p.name for p in models.iterdir() if p.suffix == ".tmp"]
    a = torch.load(reference / "models" / f"Last_{args.model}.pth", weights_only=True)["model_state"]
    b = torch.load(last, weights_only=True)["model_state"]
    identical = all(torch.equal(a[k], b[k]) for k in a)
    print(f"{args.kills} kills in {time.perf_counter() - started:.0f} s: {unreadable} unreadable checkpoints, "
          f"{tmp_seen} partial .tmp files seen after kills, {len(stray)} left after the last run; final weights "
          f"{'identical to' if identical else 'DIFFERENT from'} the uninterrupted run's (exit {finish.returncode})")
    sys.exit(0 if unreadable == 0 and not stray and identical and finish.returncode == 0 else 1)


if __name__ == "__main__":
    main()
