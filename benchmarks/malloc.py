"""glibc's malloc as it comes against common.keep_freed_memory (what every script sets at start): the wall, user and
system CPU seconds and the minor page faults of training steps and of sampling.

    flock /tmp/genlab_cpu.lock python benchmarks/malloc.py

Each measurement runs in a fresh process (malloc's settings and thresholds start from scratch), the two settings
alternating over `--rounds`. The model is flow_matching's default U-Net with label attention on the built-in
objects at 32x32, randomly initialised (the cost of a step does not depend on the weights): `--steps` training steps
of batch 32, then fid.generate of `--samples` samples at guidance 3 (a batch of fid.SAMPLE_BATCH samples is twice
as many images through the network) with Heun's `--heun-steps` steps, as random_generation.py --fid draws them.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(args):
    """In this process: time the training steps, then the sampling; print one JSON line."""
    sys.path.insert(0, str(REPO))
    import torch

    import common
    import contract
    import fid
    import flow_matching
    import image_data
    if args.keep_freed_memory:
        common.keep_freed_memory()
    data = image_data.load_data("objects", 32)
    multi_hot = data.conditions("labels")[0]
    torch.manual_seed(0)
    model = flow_matching.Model(flow_matching.Config(label_attention=True), data.image_shape, 24, "labels")
    defaults = flow_matching.TRAIN_DEFAULTS   # its training step as train_script.py builds it
    optimizers = contract.Optimizers({"model": torch.optim.Adam(contract.trainable(model.unet), lr=defaults["lr"])},
                                     model.parameter_groups(), grad_clip=defaults["grad_clip"])
    x, y = image_data.to_float(data.images[:32]), multi_hot[:32]
    model.train()
    for _ in range(3):   # warm-up: oneDNN picks its kernels
        model.train_step(x, y, optimizers)
    result = {}

    def timed(name, work):
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        work()
        after = resource.getrusage(resource.RUSAGE_SELF)
        result[name] = dict(wall=time.perf_counter() - started, user=after.ru_utime - before.ru_utime,
                            system=after.ru_stime - before.ru_stime, faults=after.ru_minflt - before.ru_minflt)

    timed("train", lambda: [model.train_step(x, y, optimizers) for _ in range(args.steps)])
    labels = multi_hot[:args.samples]
    timed("sample", lambda: fid.generate(model, args.samples, torch.Generator().manual_seed(0), labels,
                                         steps=args.heun_steps, guidance=3.0))
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="training steps of batch 32 (default: 30)")
    parser.add_argument("--samples", type=int, default=250, help="samples drawn (default: 250)")
    parser.add_argument("--heun-steps", type=int, default=4, help="Heun steps of each sample (default: 4)")
    parser.add_argument("--keep-freed-memory", action="store_true", help=argparse.SUPPRESS)   # the child's setting
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure(args)
    settings = {"glibc's defaults": [], "keep_freed_memory": ["--keep-freed-memory"]}
    runs = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, flags in settings.items():
            out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps), "--samples",
                                  str(args.samples), "--heun-steps", str(args.heun_steps), *flags],
                                 check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"| malloc | {args.steps} training steps: wall s, user s, system s, page faults | {args.samples} samples: "
          "the same |")
    print("|---|---|---|")
    for name, results in runs.items():
        cells = [" / ".join(f"{r[part]['wall']:.1f}, {r[part]['user']:.1f}, {r[part]['system']:.1f}, "
                            f"{r[part]['faults']:,}" for r in results) for part in ("train", "sample")]
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
