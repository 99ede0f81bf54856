"""Look at a trained model: `python visualization.py --model AE`.

Writes, from models/Best_<MODEL>.pth alone:
  vis/train_<MODEL>.png, vis/valid_<MODEL>.png  originals (top block) above reconstructions (bottom block)
  vis/loss_<MODEL>.png                          train and validation loss per epoch, from the checkpoint's history
  vis/denoising_<MODEL>.png                     for models that denoise (diffusion): one sample per row,
                                                x_T on the left to x_0 on the right
What a model can show comes from its capabilities (contract.py): `reconstructs`, `denoises`.
"""

import matplotlib

matplotlib.use("Agg")  # files only; no window
import matplotlib.pyplot as plt
import torch

import common
import image_data
from registry import MODELS, checkpoint_data, load_model


def plot_history(history, title, path):
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    validated = [h for h in history if h["val_loss"] is not None]
    ax.plot([h["epoch"] for h in validated], [h["val_loss"] for h in validated], "o-", label="validation")
    ax.set(xlabel="epoch", ylabel="loss", title=title, yscale="log" if min(h["train_loss"] for h in history) > 0 else "linear")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def save_reconstructions(model, images, path, device):
    x = image_data.to_float(images).to(device)
    grid = common.comparison_grid([x, model.reconstruct(x)])
    path.parent.mkdir(parents=True, exist_ok=True)
    common.grid_to_pil(grid, scale=4).save(path)


@torch.no_grad()
def save_denoising(model, n, path, device, seed=0, frames=10, labels=None):
    """model.denoising_process gives (frames, n, C, H, W); row i shows sample i from x_T to x_0 (drawn for the
    condition labels[i], if given)."""
    steps = model.denoising_process(n, torch.Generator(device).manual_seed(seed), frames, labels)
    rows = steps.transpose(0, 1).reshape(-1, *steps.shape[2:])                   # (n * frames, C, H, W)
    common.save_image_grid(rows.cpu(), path, nrow=frames)


def main():
    parser = common.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, choices=list(MODELS), help="which model's checkpoint to show")
    parser.add_argument("--checkpoint", default=None, help="the checkpoint to show (default: models/Best_<MODEL>.pth)")
    parser.add_argument("--data", default=None, help="images to reconstruct (default: the data the model was trained on)")
    parser.add_argument("--n", type=common.checked(int, 1, 256), default=16,
                        help="images per picture, 1 to 256 (default: 16)")
    parser.add_argument("--out-dir", default="vis", help="where the pictures go (default: vis)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                        help="where to run the model; auto: cuda, else mps, else cpu (default: auto)")
    args = parser.parse_args()
    device = common.pick_device(args.device)
    model, ckpt = load_model(args.checkpoint or f"models/Best_{args.model}.pth", args.model, device)
    model.eval()
    out = common.output_dir(args.out_dir, "--out-dir")
    written = []
    if model.reconstructs:
        data, train_idx, val_idx = checkpoint_data(ckpt, args.data)
        for split, idx in (("train", train_idx), ("valid", val_idx)):
            path = out / f"{split}_{args.model}.png"
            save_reconstructions(model, data.images[idx[:args.n]], path, device)
            written.append(path)
    if model.denoises:
        path = out / f"denoising_{args.model}.png"
        n, labels = min(args.n, 8), None
        if model.condition in ("labels", "layout"):   # the validation images' labels or layouts, one a row
            data, _, val_idx = checkpoint_data(ckpt)
            labels = data.conditions(model.condition)[0][val_idx[:n]].to(device)
            n = len(labels)
        save_denoising(model, n, path, device, labels=labels)
        written.append(path)
    if ckpt["history"]:
        path = out / f"loss_{args.model}.png"
        plot_history(ckpt["history"], f"{args.model} ({ckpt['data']})", path)
        written.append(path)
    print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    common.run_cli(main)
