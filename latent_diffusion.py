"""Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"),
with its first stage trained here, on the same data, instead of downloaded.

Stage 1, an autoencoder with a spatial latent: x (C, H, W) -> q(z|x) = N(mu, sigma^2) over z (c, H/f, W/f),
f = 2 or 4, and a decoder x_hat = D(z). Per image, then averaged over the batch (LDM's KL autoencoders):

    loss = sum_pixels |x - D(z)|  +  kl_weight * KL(q(z|x) || N(0, I)),   z ~ q(z|x),  kl_weight ~ 1e-6

The tiny KL weight keeps z close to a plain autoencoder's code (sharp reconstructions) while stopping
its scale from drifting. Validation decodes mu and reports the PSNR of the reconstructions.
Latent scale: s = 1 / std(z) over the training latents, measured once when stage 2 starts and kept in
its checkpoint (LDM's `scale_by_std`; diffusers' 0.18215 is this number for Stable Diffusion's VAE), so the
diffusion model sees unit-variance latents s z.
Stage 2: ddpm.py's Model (U-Net, schedules, Algorithm 1, DDPM/DDIM samplers, EMA, guidance), subclassed to
run on s z with the autoencoder frozen; sampling decodes: x = D(z_0 / s).

    python train_script.py --model LDM --data ./flowers --image-size 32 > log/train_LDM.out  # stage 1, then 2
    python train_script.py --model LDM --stage autoencoder  # stage 1 only: models/Best_LDM_autoencoder.pth
    python train_script.py --model LDM --stage diffusion    # stage 2 only, on that checkpoint: models/Best_LDM.pth
    python visualization.py --model LDM       # vis/train_LDM.png, vis/valid_LDM.png (stage 1), vis/denoising_LDM.png
    python random_generation.py --model LDM   # vis/random_images_LDM.png
"""
import argparse
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import common
import ddpm
import image_data
import vae
from common import UserError, option
from contract import GenerativeModel
from unet import group_norm

TRAIN_DEFAULTS = dict(ddpm.TRAIN_DEFAULTS)
AUTOENCODER_FIELDS = ("ae_downsample", "latent_channels", "ae_width")   # what stage 2 must share with stage 1


@dataclass
class Config(ddpm.Config):   # every diffusion flag of ddpm.py, for stage 2, and these
    stage: str = option("both", "autoencoder (stage 1), diffusion (stage 2, on the stage-1 Best checkpoint), "
                                "or both, one after the other", choices=("autoencoder", "diffusion", "both"))
    ae_downsample: int = option(2, "f: the latent of an H x W image is H/f x W/f (docs/results.md compares 2 and 4)",
                                choices=(2, 4))
    latent_channels: int = option(4, "channels of the latent z", low=1)
    ae_width: int = option(32, "channels of the autoencoder at full resolution, doubled at each downsampling", low=1)
    ae_loss: str = option("l1", "reconstruction loss: l1 (LDM's) or mse", choices=("l1", "mse"))
    kl_weight: float = option(1e-6, "weight of the KL term (LDM's KL autoencoders: 1e-6)", low=0)
    ae_epochs: int = option(30, "epochs of stage 1, the autoencoder (--epochs counts stage 2's)", low=1)
    ae_lr: float = option(2e-3, "learning rate of stage 1, the autoencoder (--lr is stage 2's)", low=0)
    autoencoder: str = option("", "stage 2's stage-1 checkpoint (default: <models-dir>/Best_<run>_autoencoder.pth)")
    clip_x0: bool = option(False, "clip the predicted x_0 to [-1, 1] when sampling: off, latents are not bounded")


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv, GroupNorm, SiLU, conv, + skip: ddpm.ResBlock without the time embedding."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.body = nn.Sequential(group_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                  group_norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.body(x)


def level_widths(config):
    """Channels at full resolution, H/2, ..., H/f: ae_width doubled at each of the log2(f) downsamplings."""
    return [config.ae_width * 2 ** i for i in range(int(math.log2(config.ae_downsample)) + 1)]


class Encoder(nn.Module):
    """(B, C, H, W) in [0, 1] -> mu, log sigma^2, each (B, c, H/f, W/f)."""

    def __init__(self, channels, config):
        super().__init__()
        widths = level_widths(config)
        layers = [nn.Conv2d(channels, widths[0], 3, padding=1)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [ResBlock(c_in, c_in), nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)]   # (B, c_out, H/2, W/2)
        layers += [ResBlock(widths[-1], widths[-1]), group_norm(widths[-1]), nn.SiLU(),
                   nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)]             # (B, 2c, H/f, W/f)
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x * 2 - 1).chunk(2, dim=1)


class Decoder(nn.Module):
    """z (B, c, H/f, W/f) -> x_hat (B, C, H, W), unbounded (the loss sees it unclamped)."""

    def __init__(self, channels, config):
        super().__init__()
        widths = level_widths(config)[::-1]
        layers = [nn.Conv2d(config.latent_channels, widths[0], 3, padding=1), ResBlock(widths[0], widths[0])]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1),
                       ResBlock(c_out, c_out)]                                                  # (B, c_out, 2h, 2w)
        layers += [group_norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


def psnr(x_hat, x):
    """Peak signal-to-noise ratio per image, images in [0, 1]: 10 log10(1 / mean squared error)."""
    return -10 * torch.log10((x_hat.clamp(0, 1) - x).pow(2).flatten(1).mean(1).clamp(min=1e-10))


class Autoencoder(GenerativeModel):
    """Stage 1: q(z|x) with a spatial z, and the decoder D. It has no prior to sample from, and no condition."""

    generates = False
    reconstructs = True
    preview = "reconstructions"

    def __init__(self, config, image_shape):
        super().__init__(config, image_shape)
        channels, height, width = image_shape
        f = config.ae_downsample
        if f not in (2, 4):
            raise UserError(f"--ae-downsample must be 2 or 4, got {f}")
        if height % f or width % f:
            raise UserError(f"--ae-downsample {f} needs an image size divisible by {f}, got {height}x{width}")
        if config.ae_loss not in ("l1", "mse"):
            raise UserError(f"unknown --ae-loss {config.ae_loss}; choose l1 or mse")
        self.encoder, self.decoder = Encoder(channels, config), Decoder(channels, config)

    def encode(self, x):
        return self.encoder(x)                                                   # mu, log sigma^2

    def decode(self, z):
        return self.decoder(z)

    def reconstruct(self, x):
        """D(mu): the deterministic reconstruction, in [0, 1]."""
        return self.decode(self.encode(x)[0]).clamp(0, 1)

    def loss(self, x, y=None, generator=None):
        """Training: z ~ q(z|x) (reparameterised). Validation (eval mode): z = mu, and the PSNR of D(mu)."""
        mu, logvar = self.encode(x)
        z = mu
        if self.training:
            z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator, device=mu.device)
        x_hat = self.decode(z)
        error = (x_hat - x).abs() if self.config.ae_loss == "l1" else (x_hat - x).pow(2)
        reconstruction = error.flatten(1).sum(1).mean()                           # summed over pixels
        kl = vae.kl_to_standard_normal(mu.flatten(1), logvar.flatten(1)).mean()          # summed over z, per image
        terms = {"loss": reconstruction + self.config.kl_weight * kl, "reconstruction": reconstruction, "kl": kl}
        if not self.training:
            terms["psnr"] = psnr(x_hat, x).mean()
        return terms

    def sample(self, n, generator=None, labels=None, **options):
        raise UserError("a stage-1 LDM checkpoint is an autoencoder without a sampler; sample from the stage-2 "
                        "checkpoint (models/Best_LDM.pth)")


def fingerprint(state_dict):
    """sha256 of the weights, names included: which stage-1 autoencoder a stage-2 model was trained on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def same_data(a, b):
    return a == b or ("shapes" not in (a, b) and Path(a).resolve() == Path(b).resolve())


def first_stage_mismatch(ckpt, data_name, image_size, channels, config):
    """Why a stage-1 checkpoint does not fit a stage-2 run (None when it does); channels None: any."""
    if ckpt.get("model") != "LDM" or ckpt.get("config", {}).get("stage") != "autoencoder":
        return f"it holds a {ckpt.get('model')} model, not a stage-1 LDM autoencoder"
    if not same_data(ckpt["data"], data_name):
        return f"it was trained on --data {ckpt['data']}, not {data_name}"
    shape = ckpt["image_shape"]
    if shape[1] != image_size or (channels is not None and shape[0] != channels):
        return (f"it was trained on {shape[0]}x{shape[1]}x{shape[2]} images, "
                f"not {channels or shape[0]}x{image_size}x{image_size}")
    for key in AUTOENCODER_FIELDS:
        if ckpt["config"][key] != getattr(config, key):
            flag = "--" + key.replace("_", "-")
            return f"it has {flag} {ckpt['config'][key]}, this run {flag} {getattr(config, key)}"
    return None


class LatentDiffusion(ddpm.Model):
    """Stage 2: ddpm.Model on the latent shape (c, H/f, W/f), fed s z, z ~ q(z|x) of the frozen autoencoder."""

    reconstructs = True   # stage 1's reconstructions, in visualization.py; previews and samples are generated

    def __init__(self, config, image_shape, num_classes=1, condition="class"):
        channels, height, width = image_shape
        f, factor = config.ae_downsample, 2 ** (len(config.channel_mults) - 1)
        if height % (f * factor) or width % (f * factor):
            raise UserError(f"--ae-downsample {f} and {len(config.channel_mults)} U-Net levels need an image size "
                            f"divisible by {f * factor}, got {height}x{width}; pass e.g. --image-size 32")
        super().__init__(config, (config.latent_channels, height // f, width // f), num_classes, condition)
        self.autoencoder = Autoencoder(config, image_shape).requires_grad_(False)   # frozen, not optimised
        self.register_buffer("latent_scale", torch.ones(()))                       # s = 1 / std(z), see prepare
        self.first_stage = {}   # which autoencoder: its checkpoint, fingerprint, data, epoch and PSNR

    def get_extra_state(self):   # saved in the state dict, so in the checkpoint
        return dict(self.first_stage)

    def set_extra_state(self, state):
        self.first_stage = dict(state)

    def prepare(self, data, train_images, batch_size=256):
        """train_script's hook, once before a new run: load the stage-1 Best weights, refusing a checkpoint
        of other data, image size or autoencoder shape, and set s = 1 / std of the training latents."""
        path = Path(self.config.autoencoder)
        if not path.is_file():
            raise UserError(f"stage 2 needs the stage-1 checkpoint '{path}'; train it first (--stage autoencoder "
                            "or --stage both), or pass --autoencoder PATH")
        ckpt = common.load_checkpoint(path)
        reason = first_stage_mismatch(ckpt, data.source, data.image_shape[1], data.image_shape[0], self.config)
        if reason:
            raise UserError(f"'{path}' does not fit this run: {reason}; retrain stage 1 with --stage autoencoder "
                            "(or --stage both), or pass the matching flags")
        self.autoencoder.load_state_dict(ckpt["model_state"])
        generator = torch.Generator(self.latent_scale.device).manual_seed(0)
        self.latent_scale.fill_(1.0)
        z = torch.cat([self.latents(image_data.to_float(train_images[i:i + batch_size]).to(self.latent_scale.device),
                                    generator) for i in range(0, len(train_images), batch_size)])
        self.latent_scale.fill_(1 / z.std().item())                                # s = 1 / std(z)
        best = min((h for h in ckpt["history"] if h["val_loss"] is not None), key=lambda h: h["val_loss"])
        self.first_stage = {"checkpoint": str(path), "fingerprint": fingerprint(ckpt["model_state"]),
                            "data": ckpt["data"], "image_shape": list(ckpt["image_shape"]),
                            "epoch": ckpt["epoch"], "val_psnr": best.get("val_psnr")}
        common.say(f"# stage 2 on the autoencoder {path} (fingerprint {self.first_stage['fingerprint']}, epoch "
                   f"{ckpt['epoch']}, val PSNR {best.get('val_psnr', math.nan):.2f} dB): latents "
                   f"{'x'.join(map(str, self.image_shape))}, scale s = 1/std(z) = {self.latent_scale.item():.4f}")

    @torch.no_grad()
    def latents(self, x, generator=None):
        """s z, z = mu + sigma eps ~ q(z|x): (B, C, H, W) -> (B, c, H/f, W/f)."""
        mu, logvar = self.autoencoder.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device)
        return self.latent_scale * (mu + (0.5 * logvar).exp() * eps)

    def loss(self, x, y=None, generator=None):
        """ddpm's Algorithm 1 with x_0 = s z; ddpm.Model.train_step (Adam, clipping, EMA) calls this."""
        return self.loss_x0(self.latents(x, generator), y, generator)

    def reconstruct(self, x):
        """Stage 1's D(mu), for the reconstruction pictures."""
        return self.autoencoder.reconstruct(x)

    def validation_metrics(self, images, labels):
        return {}   # bits per dimension of latents would not be a likelihood of the images

    def to_images(self, z):
        """Latents s z to images in [0, 1]: x = D(z / s). ddpm's samplers and denoising picture work unchanged."""
        return self.autoencoder.decode(z.flatten(0, -4) / self.latent_scale).clamp(0, 1).unflatten(0, z.shape[:-3])


def Model(config, image_shape, num_classes=1, condition="class"):
    """The registry's constructor: the stage-1 Autoencoder or the stage-2 LatentDiffusion, by config.stage.
    Layouts stay at the image's size in the batches; the U-Net averages them down to the latent's."""
    if config.stage == "autoencoder":
        return Autoencoder(config, image_shape)
    if config.stage == "diffusion":
        return LatentDiffusion(config, image_shape, num_classes, condition)
    raise UserError(f"unknown --stage {config.stage}; choose autoencoder, diffusion or both")


def stages(args):
    """train_script's hook: the runs --stage asks for, in order, each a copy of args.

    Stage 1 is the run <run>_autoencoder, with --ae-epochs and --ae-lr; stage 2 the run <run>, on stage 1's Best. With
    `both`, an existing stage-1 Best that fits the data, image size and autoencoder flags is reused, and
    `--resume` continues stage 2 if it has begun, else stage 1 and then a new stage 2."""
    if args.autoencoder and args.stage != "diffusion":
        raise UserError("--autoencoder PATH is for --stage diffusion; stage 1 writes "
                        "<models-dir>/Best_<run>_autoencoder.pth")
    ae_run = f"{args.run_name}_autoencoder"
    ae_path = Path(args.models_dir) / f"Best_{ae_run}.pth"
    stage1 = argparse.Namespace(**{**vars(args), "stage": "autoencoder", "run_name": ae_run, "epochs": args.ae_epochs,
                                           "lr": args.ae_lr})
    stage2 = argparse.Namespace(**{**vars(args), "stage": "diffusion", "autoencoder": args.autoencoder or str(ae_path)})
    common.say(f"# LDM: stage 1, the autoencoder, trains --ae-epochs {args.ae_epochs} at --ae-lr {args.ae_lr:g}; "
               f"stage 2, diffusion on its latents, --epochs {args.epochs} at --lr {args.lr:g}")
    if args.stage == "autoencoder":
        yield stage1
        return
    if args.stage == "both":
        if args.resume:
            if not (Path(args.models_dir) / f"Last_{args.run_name}.pth").is_file():
                yield stage1
                stage2.resume = False
        elif not ae_path.is_file():
            yield stage1
        else:
            reason = first_stage_mismatch(common.load_checkpoint(ae_path), args.data, args.image_size, args.channels,
                                          args)
            if reason is None:
                common.say(f"# stage 1: reusing {ae_path} (same data, image size and autoencoder flags); "
                           "--stage autoencoder retrains it")
            else:
                common.say(f"# stage 1: retraining {ae_path}, as {reason}")
                yield stage1
    yield stage2
