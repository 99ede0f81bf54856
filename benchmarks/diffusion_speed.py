"""Speed of ddpm.py on this machine: training images/s and GFLOP/s, sampling time, and diffusers at the same size.

    flock /tmp/genlab_cpu.lock python benchmarks/diffusion_speed.py --data ../shared/data/flowers
    flock /tmp/genlab_cpu.lock python benchmarks/diffusion_speed.py --data ../shared/data/flowers --diffusers
    flock /tmp/genlab_cpu.lock python benchmarks/diffusion_speed.py --data ../shared/data/flowers --compile
    flock /tmp/genlab_cpu.lock python benchmarks/diffusion_speed.py --data ../shared/data/flowers --precision bf16

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention; a
multiply-add is 2 FLOPs) for one training step, and divided by the measured time of a step. The reference
is a plain fp32 2048 x 2048 matmul. diffusers is only needed for --diffusers (pip install diffusers; it is
not a dependency of genlab).
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import contract  # noqa: E402
import ddpm  # noqa: E402
import image_data  # noqa: E402
from train_flags import COMMON_DEFAULTS  # noqa: E402


def timed(fn, repeats):
    fn()   # warm-up (oneDNN picks its kernels on the first call)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def matmul_gflops():
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048 ** 3 / timed(lambda: a @ b, 10) / 1e9


def batches(data, batch_size):
    """Endless training batches of the real data, as the training loop makes them (flips included)."""
    generator = torch.Generator().manual_seed(0)
    while True:
        yield from image_data.iterate_batches(data.images, data.labels, batch_size, generator, flip=True)


def step_speed(step, batch_iter, batch_size, repeats, flops=None):
    """(images/s, GFLOP per step, GFLOP/s) of `step(x, y)` on full batches; the FLOPs are counted unless given
    (a compiled step runs the eager step's FLOPs, and FlopCounterMode does not see inside it)."""
    def one():
        x, y = next(batch_iter)
        while len(x) < batch_size:   # the last, short batch of an epoch
            x, y = next(batch_iter)
        step(x, y)
    if flops is None:
        with FlopCounterMode(display=False) as counter:
            one()
        flops = counter.get_total_flops()
    seconds = timed(one, repeats)
    return batch_size / seconds, flops / 1e9, flops / seconds / 1e9


def profile(step, batch_iter, repeats, top):
    """torch.profiler over `repeats` training steps: the `top` operators by their own CPU time (children
    excluded), each with its share of the steps' total."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler
    with profiler(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step(*next(batch_iter))
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print("| operator | calls a step | self CPU ms a step | share |\n|---|---|---|---|")
    for e in events[:top]:
        print(f"| {e.key} | {e.count / repeats:.0f} | {e.self_cpu_time_total / repeats / 1e3:.1f} | "
              f"{e.self_cpu_time_total / total:.1%} |")


def ours(data, compile_=False, precision="fp32"):
    """genlab's default diffusion model and its training step (loss, backward, clipping, Adam, EMA), as
    train_script.py builds it (torch.compile'd and under autocast when asked)."""
    model = ddpm.Model(ddpm.Config(), data.image_shape, len(data.class_names))
    defaults = {**COMMON_DEFAULTS, **ddpm.TRAIN_DEFAULTS}
    groups = model.parameter_groups()
    if compile_:
        for module in groups.values():
            module.compile()
    optimizers = contract.Optimizers({"model": torch.optim.Adam(contract.trainable(model.unet), lr=defaults["lr"])},
                                     groups, defaults["grad_clip"], precision=precision)
    n_params = sum(p.numel() for p in model.unet.parameters())
    return model, (lambda x, y: model.train_step(x, y, optimizers)), n_params


def theirs(data):
    """diffusers' UNet2DModel + DDPMScheduler, the same training step (eps-MSE, Adam, clipping), ~ the same size."""
    from diffusers import DDPMScheduler, UNet2DModel
    unet = UNet2DModel(sample_size=data.image_shape[1], in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64, 64), norm_num_groups=32,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                       num_class_embeds=len(data.class_names) + 1)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.Adam(unet.parameters(), lr=6e-4)

    def step(x, y):
        x0 = x * 2 - 1
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (len(x0),))
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()

    return step, sum(p.numel() for p in unet.parameters())


def sampling_times(model, full_ddpm):
    model.eval()
    started = time.perf_counter()
    model.sample(64, torch.Generator().manual_seed(0))
    ddim = time.perf_counter() - started
    print(f"sampling 64 images with DDIM-50: {ddim:.1f} s", flush=True)
    if full_ddpm:
        started = time.perf_counter()
        model.sample(64, torch.Generator().manual_seed(0), sampler="ddpm")
        print(f"sampling 64 images with DDPM-1000: {time.perf_counter() - started:.1f} s", flush=True)
    else:   # one network call a step, as DDIM's: 1000 steps cost 20 times 50
        print(f"sampling 64 images with DDPM-1000: about {20 * ddim:.0f} s (20 x DDIM-50; --full-ddpm to run it)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/flowers")
    parser.add_argument("--image-size", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=8, help="timed training steps a round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; with --diffusers, ours and theirs alternate, "
                        "so that a change in the machine's speed meets both")
    parser.add_argument("--diffusers", action="store_true", help="also time diffusers at the same parameter count")
    parser.add_argument("--full-ddpm", action="store_true", help="time DDPM-1000 sampling too (20x DDIM-50's time)")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd step, alternating")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="autocast of our step")
    parser.add_argument("--profile", type=int, default=0, metavar="K",
                        help="also print torch.profiler's K operators of our step with the most CPU time")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print(f"fp32 2048x2048 matmul: {matmul_gflops():.1f} GFLOP/s", flush=True)
    data = image_data.load_data(args.data, args.image_size)
    batch_size = ddpm.TRAIN_DEFAULTS["batch_size"]
    model, our_step, n_params = ours(data, precision=args.precision)
    contenders = [(f"genlab diffusion ({args.precision}): {n_params:,} parameters", our_step)]
    if args.compile:
        started = time.perf_counter()
        _, compiled_step, _ = ours(data, compile_=True, precision=args.precision)
        compiled_step(*next(batches(data, batch_size)))   # compiles
        print(f"torch.compile: first step {time.perf_counter() - started:.0f} s", flush=True)
        contenders.append((f"genlab diffusion ({args.precision}), torch.compile", compiled_step))
    if args.diffusers:
        their_step, their_params = theirs(data)
        contenders.append((f"diffusers UNet2DModel + DDPMScheduler: {their_params:,} parameters", their_step))
    our_flops = None
    for round_ in range(args.rounds):
        for name, step in contenders:
            compiled = "compile" in name
            rate, gflop, gflops = step_speed(step, batches(data, batch_size), batch_size, args.repeats,
                                             our_flops if compiled else None)
            if name.startswith("genlab") and not compiled:
                our_flops = gflop * 1e9
            print(f"round {round_ + 1}, {name}, batch {batch_size}: {rate:.1f} images/s, {gflop:.2f} GFLOP/step, "
                  f"{gflops:.1f} GFLOP/s", flush=True)
    if args.profile:
        profile(our_step, batches(data, batch_size), args.repeats, args.profile)
    sampling_times(model, args.full_ddpm)
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
