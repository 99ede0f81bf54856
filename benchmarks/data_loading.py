"""Time the data path of training: loading a cached folder and one epoch of batches, no model.

    python benchmarks/data_loading.py --data ../shared/data/flowers

The first call decodes the folder (and fills the cache); the timed calls read the cache.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import image_data  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/flowers")
    parser.add_argument("--image-size", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    started = time.perf_counter()
    image_data.load_data(args.data, args.image_size)
    print(f"first load (decodes unless already cached): {time.perf_counter() - started:.2f} s")
    loads, epochs = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        data = image_data.load_data(args.data, args.image_size)
        train_idx, _ = image_data.split_indices(len(data.images), 0)
        images, labels = data.images[train_idx], data.labels[train_idx]
        loads.append(time.perf_counter() - started)
        generator = torch.Generator().manual_seed(0)
        started = time.perf_counter()
        for x, y in image_data.iterate_batches(images, labels, args.batch_size, generator, flip=True):
            pass
        epochs.append(time.perf_counter() - started)
    print(f"cached load + split: median {sorted(loads)[len(loads) // 2]:.3f} s")
    print(f"one epoch of batches ({len(train_idx)} images, batch {args.batch_size}, with flips): "
          f"median {sorted(epochs)[len(epochs) // 2]:.3f} s")


if __name__ == "__main__":
    main()
