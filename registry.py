"""The model registry: `--model` name -> the model's module, and a model (and its data) rebuilt from a checkpoint.

Adding a model is its own file, written to the contract of contract.py, plus one line in MODELS; train_script.py,
visualization.py, random_generation.py, report.py and the benchmarks find models only here.
"""
import common
import conv_ae
import ddpm
import flow_matching
import gan
import image_data
import latent_diffusion
import mlp_ae
import vae
from common import UserError

MODELS = {
    "MLPAE": mlp_ae,
    "AE": conv_ae,
    "VAE": vae,
    "diffusion": ddpm,
    "flow": flow_matching,
    "GAN": gan,
    "LDM": latent_diffusion,
}

def build_model(name, config, image_shape, num_classes, condition="class"):
    return MODELS[name].Model(config, tuple(image_shape), num_classes, condition)


CHECKPOINT_KEYS = ("model", "config", "train_args", "image_shape", "class_names", "model_state")


def load_model(path, expected_model=None, device="cpu"):
    """Rebuild a model from a checkpoint alone. Returns (model, checkpoint)."""
    ckpt = common.load_checkpoint(path)
    name = ckpt.get("model") if isinstance(ckpt, dict) else None
    if name not in MODELS:
        raise UserError(f"'{path}' is not a genlab checkpoint of a known model (found {name!r})")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"'{path}' is an incomplete genlab checkpoint (no {', '.join(missing)}); use another one")
    if expected_model is not None and name != expected_model:
        raise UserError(f"'{path}' holds a {name} model, not {expected_model}; pass --model {name} or another "
                        "checkpoint")
    config = common.config_from_dict(MODELS[name].Config, ckpt["config"])
    condition = ckpt.get("condition", "class")
    model = build_model(name, config, ckpt["image_shape"], len(ckpt["class_names"]) if condition else 0,
                        condition or "class")
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as err:
        raise UserError(f"'{path}' does not fit the {name} model it names ({str(err).splitlines()[0]})") from err
    return model.to(device), ckpt


def checkpoint_data(ckpt, data=None):
    """The data a checkpoint was trained on (or `data` instead) at its image shape, and its split.
    Returns (ImageData, train indices, validation indices)."""
    channels, size, saved = ckpt["image_shape"][0], ckpt["image_shape"][1], ckpt["train_args"]
    images = image_data.load_data(data or saved["data"], size, channels, labels=saved.get("labels"),
                              label_names=saved.get("label_names"), layouts=saved.get("layouts"))
    return (images, *image_data.split_indices(len(images.images), saved["seed"]))
