"""The U-Net's GroupNorm and attention kernels on this CPU: PyTorch's own against unet.py's, fp32 and bf16.

    flock /tmp/genlab_cpu.lock env OMP_NUM_THREADS=1 python benchmarks/unet_kernels.py

Forward and backward of one call, median of --repeats, at the shapes of the label-conditioned flow recipe in
docs/results.md (batch 32, a 32x32 image, width 32, channels (32, 64, 64), attention at 16x16 and 8x8, 24 labels
and the null token for cross-attention). Tensors are channels_last, as in the U-Net; a bf16 input is what a
convolution under bf16 autocast hands to the next layer.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unet import GroupNorm32, attention  # noqa: E402


def median_ms(fn, repeats):
    for _ in range(3):
        fn()   # warm-up (oneDNN picks its kernels on the first calls)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e3


def forward_backward(fn, *inputs):
    """One call of fn under autocast to the inputs' dtype when it is bf16, as in a --precision bf16 step."""
    inputs = [x.detach().requires_grad_() for x in inputs]

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=inputs[0].dtype == torch.bfloat16):
            out = fn(*inputs)
        out.float().sum().backward()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s); forward + backward, median ms")
    print("| kernel | shape | dtype | PyTorch's | unet.py's | ratio |\n|---|---|---|---|---|---|")
    for channels, size in ((32, 32), (64, 16), (64, 8)):
        torch_norm, our_norm = nn.GroupNorm(8, channels), GroupNorm32(8, channels)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(32, channels, size, size).to(memory_format=torch.channels_last, dtype=dtype)
            theirs = median_ms(forward_backward(torch_norm, x), args.repeats)
            ours = median_ms(forward_backward(our_norm, x), args.repeats)
            print(f"| GroupNorm | (32, {channels}, {size}, {size}) | {str(dtype)[6:]} | {theirs:.2f} | {ours:.2f} | "
                  f"{theirs / ours:.1f} |")
    for queries, keys, masked in ((256, 256, False), (64, 64, False), (256, 25, True), (64, 25, True)):
        q, k, v = torch.randn(32, queries, 64), torch.randn(32, keys, 64), torch.randn(32, keys, 64)
        mask = (torch.rand(32, 1, keys) < 0.1) | (torch.arange(keys) == keys - 1) if masked else None
        for dtype in (torch.float32, torch.bfloat16):
            q_, k_, v_ = (t.to(dtype) for t in (q, k, v))
            theirs = median_ms(forward_backward(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                                q_, k_, v_), args.repeats)
            ours = median_ms(forward_backward(lambda q, k, v: attention(q, k, v, mask), q_, k_, v_), args.repeats)
            kind = "cross-attention, masked" if masked else "self-attention"
            print(f"| {kind} | {queries} x {keys}, C 64 | {str(dtype)[6:]} | {theirs:.2f} | {ours:.2f} | "
                  f"{theirs / ours:.1f} |")


if __name__ == "__main__":
    main()
