"""Lab6's accuracy on held-out label combinations, taken apart: the evaluator's own ceiling on real scenes, and a
model's samples by kind of label and kind of miss. For the built-in `objects` data (scenes.py), whose training
scenes never hold the pairs in scenes.HELD_OUT_PAIRS together (new_test.json asks for them).

    flock /tmp/genlab_cpu.lock python benchmarks/held_out.py real --labels objects32/new_test.json
    flock /tmp/genlab_cpu.lock python benchmarks/held_out.py real --sets 1000
    flock /tmp/genlab_cpu.lock python benchmarks/held_out.py samples models/Best_RUN.pth --sets 256 --guidance 3

`real` draws real scenes (scenes.draw_scene) for label sets, a file's sets `--drawings` times, or `--sets` sets
drawn as the training scenes' are and `--sets` as new_test.json's are (scenes.scene_labels), and prints the
evaluator's accuracy on them: what a model that drew real scenes would score. `samples` draws a model's samples
for `--sets` sets of each kind and prints the accuracy, the share found of the held-out pair's labels and of the
other labels, and what the evaluator reads in place of the missed labels: one of the same shape in another colour,
of the same colour in another shape, or neither.
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluator  # noqa: E402
import fid  # noqa: E402
import scenes  # noqa: E402
from registry import load_model  # noqa: E402


def drawn_sets(n, held_out, seed):
    rng = np.random.default_rng([seed, held_out])
    return [scenes.scene_labels(rng, held_out) for _ in range(n)]


def real_scenes(sets, image_size, seed):
    rng = np.random.default_rng([seed, 2])
    images = np.stack([scenes.draw_scene(rng, labels, image_size)[0] for labels in sets])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()                 # (N, 3, S, S) uint8


def found(net, images, asked):
    """(N, K) bool: the asked labels that are among the evaluator's top k (k: the labels asked of each image),
    and (N, K) bool: the labels in the top k that were not asked."""
    top = evaluator.top_labels(evaluator.logits(net, images), asked)
    return top & (asked > 0), top & (asked == 0)


def miss_kinds(missed, intruders):
    """Each label read in place of an asked one: 'same shape' as a missed label, else 'same colour', else 'other'."""
    kinds = Counter()
    for i, j in intruders.nonzero().tolist():
        colour, shape = scenes.LABEL_NAMES[j].split()
        lost = [scenes.LABEL_NAMES[m].split() for m in missed[i].nonzero().flatten().tolist()]
        kinds["same shape" if any(s == shape for _, s in lost) else
              "same colour" if any(c == colour for c, _ in lost) else "other"] += 1
    return dict(kinds)


def real(args, net, image_size):
    if args.labels:
        asked = scenes.read_test_labels(args.labels, list(scenes.LABEL_NAMES))
        sets = [row.nonzero().flatten().tolist() for row in asked]
        scores = [evaluator.accuracy(net, real_scenes(sets, image_size, d), asked) for d in range(args.drawings)]
        print(f"{args.labels}: real scenes, {args.drawings} drawings of its {len(sets)} sets: accuracy mean "
              f"{np.mean(scores):.3f} (min {min(scores):.3f}, max {max(scores):.3f})")
        return
    for held_out in (False, True):
        sets = drawn_sets(args.sets, held_out, args.seed)
        asked = scenes.multi_hot(sets, len(scenes.LABEL_NAMES))
        score = evaluator.accuracy(net, real_scenes(sets, image_size, args.seed), asked)
        print(f"{'held-out' if held_out else 'training'} combinations: real scenes of {len(sets)} sets: "
              f"accuracy {score:.3f}")


def samples(args, net):
    model, _ = load_model(args.checkpoint)
    pairs = [set(p) for p in scenes.HELD_OUT_PAIRS]
    options = {"guidance": args.guidance, **({"steps": args.steps} if args.steps else {})}
    for held_out in (False, True):
        sets = drawn_sets(args.sets, held_out, args.seed)
        asked = scenes.multi_hot(sets, len(scenes.LABEL_NAMES))
        images = fid.generate(model, len(sets), torch.Generator().manual_seed(args.seed), asked, **options)
        hit, intruders = found(net, images, asked)
        in_pair = torch.zeros_like(hit)
        for i, labels in enumerate(sets):
            for pair in pairs:
                if pair <= set(labels):
                    in_pair[i, list(pair)] = True
        line = f"{'held-out' if held_out else 'training'} combinations, {len(sets)} sets: accuracy " \
               f"{hit.sum() / asked.sum():.3f}"
        if held_out:
            others = (asked > 0) & ~in_pair
            line += (f"; labels of the held-out pair found {hit[in_pair].float().mean():.3f}, the others "
                     f"{hit[others].float().mean():.3f}")
        print(f"{line}; read instead: {miss_kinds((asked > 0) & ~hit, intruders)}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    real_parser = sub.add_parser("real", help="the evaluator on real scenes for label sets")
    real_parser.add_argument("--labels", help="a test.json-style file of label sets (else --sets drawn sets)")
    real_parser.add_argument("--drawings", type=int, default=20, help="scenes drawn for each of the file's sets")
    samples_parser = sub.add_parser("samples", help="a label-conditioned model's samples for drawn sets")
    samples_parser.add_argument("checkpoint")
    samples_parser.add_argument("--guidance", type=float, default=3.0)
    samples_parser.add_argument("--steps", type=int, help="sampler steps (the model's default without it)")
    for p in (real_parser, samples_parser):
        p.add_argument("--sets", type=int, default=256, help="label sets of each kind")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--evaluator", default=str(evaluator.evaluator_path("objects", 32)))
    args = parser.parse_args()
    net, ckpt = evaluator.load_evaluator(args.evaluator)
    if args.command == "real":
        real(args, net, ckpt["image_shape"][-1])
    else:
        samples(args, net)


if __name__ == "__main__":
    main()
