"""Sample from a trained model: `python random_generation.py --model VAE` -> vis/random_images_VAE.png.

The model is rebuilt from its checkpoint alone (models/Best_<MODEL>.pth unless --checkpoint).
For the autoencoders this is decoder(z) with z ~ N(0, I); a plain AE's codes were never shaped
like N(0, I), which is why its samples are mostly noise and the VAE's are not.
"""
import argparse
from pathlib import Path

import torch

import common
from train_script import MODELS, load_model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--model", required=True, choices=list(MODELS))
    parser.add_argument("--checkpoint", default=None, help="default: models/Best_<MODEL>.pth")
    parser.add_argument("--n", type=int, default=64, help="how many images (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the noise, so the same seed gives the same picture")
    parser.add_argument("--out", default=None, help="default: vis/random_images_<MODEL>.png")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    args = parser.parse_args()
    if args.n < 1:
        raise common.UserError(f"--n must be at least 1, got {args.n}")
    device = common.pick_device(args.device)
    model, _ = load_model(args.checkpoint or f"models/Best_{args.model}.pth", args.model, device)
    model.eval()
    images = model.sample(args.n, torch.Generator(device).manual_seed(args.seed))
    path = common.save_image_grid(images.cpu(), Path(args.out or f"vis/random_images_{args.model}.png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    common.run_cli(main)
