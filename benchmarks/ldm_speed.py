"""Latent against pixel diffusion on this machine (latent_diffusion.py vs ddpm.py, the same U-Net flags).

    flock /tmp/genlab_cpu.lock python benchmarks/ldm_speed.py speed --data ../shared/data/flowers --image-size 32
    python benchmarks/ldm_speed.py budget 1200 -- python train_script.py --model diffusion ...

`speed`: training images/s of one ddpm.Model.train_step on pixels and of latent_diffusion's (the frozen
encoder included), alternating rounds of full batches of the real data so both see the same machine load,
and their ratio. Stage 2 is timed with a randomly initialised autoencoder: its cost does not depend on
its weights. `budget`: runs a command and sends it Ctrl-C (train_script saves Last and exits) once it has
used that many seconds of CPU time (user + system, all threads), so two models can be compared after the
same CPU time on a shared machine.
"""
import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import contract  # noqa: E402
import ddpm  # noqa: E402
import image_data  # noqa: E402
import latent_diffusion  # noqa: E402


def cpu_seconds(pid):
    """utime + stime of a process, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def budget(seconds, command):
    started = time.perf_counter()
    # SIGINT back to its default in the child: a background job inherits it ignored, and Ctrl-C would be lost
    process = subprocess.Popen(command, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    used = 0.0
    while process.poll() is None:
        try:
            used = cpu_seconds(process.pid)
        except (FileNotFoundError, ProcessLookupError):
            break
        if used >= seconds:
            process.send_signal(signal.SIGINT)
            process.wait()
            break
        time.sleep(1)
    print(f"# budget: {used:.0f} CPU s, {time.perf_counter() - started:.0f} s wall, exit {process.wait()}",
          file=sys.stderr)


def speed(args):
    torch.manual_seed(0)
    data = image_data.load_data(args.data, args.image_size)
    unet = dict(width=args.width, channel_mults=tuple(args.channel_mults), attention_levels=tuple(args.attention_levels))
    pixel = ddpm.Model(ddpm.Config(**unet), data.image_shape, len(data.class_names))
    latent = latent_diffusion.Model(latent_diffusion.Config(stage="diffusion", ae_downsample=args.ae_downsample,
                                                            ae_width=args.ae_width, **unet),
                                    data.image_shape, len(data.class_names))
    models = {"pixel (ddpm.py)": pixel, f"latent f={args.ae_downsample} (latent_diffusion.py)": latent}
    optimizers = {name: contract.Optimizers({"model": torch.optim.Adam(contract.trainable(m.unet), lr=1e-4)},
                                            m.parameter_groups()) for name, m in models.items()}
    generator = torch.Generator().manual_seed(0)
    batches = image_data.iterate_batches(data.images, data.labels, args.batch_size, generator, flip=True)
    times = {name: 0.0 for name in models}
    for round_ in range(args.rounds + 1):   # round 0 warms up (oneDNN picks its kernels)
        for name, model in models.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                x, y = next(batches)
                while len(x) < args.batch_size:
                    x, y = next(batches)
                model.train_step(x, y, optimizers[name])
            if round_:
                times[name] += time.perf_counter() - started
    n = args.rounds * args.steps * args.batch_size
    rates = {name: n / t for name, t in times.items()}
    for name, rate in rates.items():
        print(f"{name}: {rate:.1f} training images/s")
    print(f"speed-up: {rates[list(models)[1]] / rates[list(models)[0]]:.1f}x  ({args.image_size}x{args.image_size}, "
          f"batch {args.batch_size}, U-Net width {args.width} {args.channel_mults}, autoencoder width {args.ae_width}, "
          f"{torch.get_num_threads()} threads)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = latent_diffusion.Config()   # the models' own defaults, so the benchmark times what users train
    s = sub.add_parser("speed")
    s.add_argument("--data", default="shapes")
    s.add_argument("--image-size", type=int, default=32)
    s.add_argument("--ae-downsample", type=int, default=defaults.ae_downsample)
    s.add_argument("--ae-width", type=int, default=defaults.ae_width)
    s.add_argument("--width", type=int, default=defaults.width)
    s.add_argument("--channel-mults", type=int, nargs="+", default=list(defaults.channel_mults))
    s.add_argument("--attention-levels", type=int, nargs="+", default=list(defaults.attention_levels))
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--steps", type=int, default=5, help="steps per model per round")
    s.add_argument("--rounds", type=int, default=3)
    b = sub.add_parser("budget")
    b.add_argument("seconds", type=float)
    b.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.command == "speed":
        speed(args)
    else:
        budget(args.seconds, args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd)


if __name__ == "__main__":
    main()
