"""Deep convolutional GAN (Radford et al. 2016, "Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks"), trained as pytorch/examples' dcgan: one D step, then
one G step per batch, each with its own Adam(lr 2e-4, beta1 0.5).

G maps z ~ N(0, I) to an image in [-1, 1] with transposed convolutions that double the size from
s0 x s0, S = s0 * 2^k (24 = 3 * 2^3, 28 = 7 * 2^2, 32 = 4 * 2^3, 64 = 4 * 2^4), BatchNorm and ReLU; D
mirrors it with strided convolutions and LeakyReLU(0.2) down to s0 x s0 and one logit. Options, each
named after its paper:
- the loss: non-saturating (Goodfellow et al. 2014, "Generative Adversarial Nets"; the default) or hinge
  (Lim & Ye 2017, "Geometric GAN"; Miyato et al. 2018);
- spectral normalisation of D's weights instead of its BatchNorm (Miyato et al. 2018, "Spectral
  Normalization for Generative Adversarial Networks"), and the rest of SN-GAN's recipe as separate flags:
  n_dis D steps per G step (--d-steps 5) and Adam(2e-4, betas (0, 0.9)) (--adam-beta1 0 --adam-beta2 0.9);
- DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training";
  diffaugment.py; on by default, `--augment ''` turns it off): D sees real and generated images through the same random differentiable transforms,
  each applied with a probability p that ADA (Karras et al. 2020, "Training Generative Adversarial Networks
  with Limited Data") adapts to how sure D is of the real images;
- the R1 gradient penalty on real images (Mescheder et al. 2018, "Which Training Methods for GANs do
  actually Converge?"), optionally lazy (Karras et al. 2020, "Analyzing and Improving the Image Quality of
  StyleGAN");
- class conditioning when the data has classes (on by default, --no-conditional turns it off): a label
  embedding joins z in G (Mirza & Osindero 2014, "Conditional Generative Adversarial Nets") and D is a
  projection discriminator (Miyato & Koyama 2018, "cGANs with Projection Discriminator");
- one self-attention block in G and in D at a chosen feature-map size (Zhang et al. 2019, "Self-Attention
  Generative Adversarial Networks"; e.g. --attention 12 at 24x24), off by default;
- LeCam regularisation (Tseng et al. 2021, "Regularizing Generative Adversarial Networks under Limited
  Data"): D's logits on real images held near its recent mean on generated ones and the reverse, off by default;
- the two time-scale update rule (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge
  to a Local Nash Equilibrium"): D's learning rate a multiple of G's (--d-lr-scale), off by default;
- an exponential moving average of G's weights (Yazici et al. 2019, "The Unusual Effectiveness of
  Averaging in GAN Training"), which is what `sample` uses.

GAN losses say little about sample quality, so `selects_by_sample_quality`: Best and early stopping
follow FID when pytorch-fid's Inception weights are present, else FD_eval of the offline evaluator
(fid.py), every 2 epochs by default; `--swd --select-by swd` follows SWD instead, which still ranks samples
where FD_eval has reached its floor. Training stops with an error when a loss becomes NaN or D wins
completely for --divergence-steps steps in a row; Best is left as it was.

    python fid.py train-evaluator --data ./flowers      # once, for FD_eval when there are no Inception weights
    python train_script.py --model GAN --data ./flowers > log/train_GAN.out
    python random_generation.py --model GAN             # vis/random_images_GAN.png (EMA generator)
    python random_generation.py --model GAN --fid
    python random_generation.py --model GAN --class-label calendula
    python train_script.py --model GAN --data ./flowers --no-conditional --run-name GAN_uncond
"""
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import TrainingDiverged, UserError, option
from contract import GenerativeModel
from diffaugment import diff_augment, parse_policy

# DCGAN's optimiser (Adam, lr 2e-4, beta1 0.5); Best by sample quality every 2 epochs, measured with FID when the
# Inception weights are present, else with the offline evaluator (fid.py --fid-features auto). Batch 16, not
# DCGAN's 64: on the flowers at 24x24 an epoch costs 1.6 times as much CPU time for four times the steps, and
# at 10 training CPU-minutes FD_eval was 0.80 to 1.65 over three training seeds against 1.29 to 3.22 at batch 64,
# with bests of 0.21, 0.31 and 0.55 at 18 to 22 minutes (docs/results.md, "Batch 16"). With DiffAugment the metric
# improves slowly and unevenly: 500 epochs, and a patience of 35 measurements.
TRAIN_DEFAULTS = dict(epochs=500, lr=2e-4, adam_beta1=0.5, batch_size=16, patience=35, fid_every=2,
                      fid_features=["auto"])
LOSSES = ("nonsaturating", "hinge")
LECAM_DECAY = 0.99   # of LeCam's anchors, as Tseng et al.'s code
D_WON = 0.99   # D(x) above this and D(G(z)) below 1 - this: D tells every image apart
WIDE_G, WIDE_G_UP_TO, NARROW_G = 64, 24, 32   # --ngf 0: G's width for images up to 24x24, and for larger ones


@dataclass
class Config:
    latent_dim: int = option(100, "size of z ~ N(0, I) (DCGAN: 100)", low=1)
    # Half DCGAN's width: a quarter of the multiply-adds, and on the flowers at 24x24 ahead by FD_eval at every
    # training CPU time up to 40 minutes (docs/results.md, "Half the width"). --ngf 0 picks DCGAN's 64 up to 24x24:
    # on an Intel Xeon with AMX it got below half width's SWD plateau on three training seeds of four at FD_eval
    # 0.18 to 0.33 at 7 minutes, but on an AVX2 machine, where an epoch costs 1.5 times half width's, it missed
    # FD_eval 0.57 at 7 minutes on two seeds of two that half width met (docs/results.md, "The 24x24 plateau" and
    # "G's width on an AVX2 machine").
    ngf: int = option(32, "channels of G's last hidden layer, doubled at each smaller size (DCGAN: 64); 0: by "
                          f"image size, {WIDE_G} up to {WIDE_G_UP_TO}x{WIDE_G_UP_TO}, {NARROW_G} above", low=0)
    ndf: int = option(32, "channels of D's first layer, doubled at each smaller size (DCGAN: 64)", low=1)
    loss: str = option("nonsaturating", "nonsaturating (Goodfellow et al. 2014) or hinge (Lim & Ye 2017)",
                       choices=LOSSES)
    spectral_norm: bool = option(False, "spectral normalisation of D's weights, instead of its BatchNorm "
                                        "(Miyato et al. 2018); it changes no other setting: SN-GAN's own recipe is "
                                        "--spectral-norm --d-steps 5 --adam-beta1 0 --adam-beta2 0.9")
    d_steps: int = option(1, "D updates per G update, each on its own batch: G steps every N-th batch (SN-GAN: 5; "
                             "DCGAN: 1)", low=1)
    # translation,cutout: DiffAugment's BigGAN policy; on the flowers at 24x24 ahead of color,translation,cutout at
    # every training CPU time up to 20 minutes and still improving at 38 (docs/results.md, "Augmentation policies")
    augment: str = option("translation,cutout", "DiffAugment (Zhao et al. 2020): every image D sees, real or "
                              "generated, goes through these random differentiable transforms, comma-separated among "
                              "color, translation, cutout; '': none (plain DCGAN)")
    ada_target: float = option(0.0, "ADA (Karras et al. 2020): each --augment transform applies with probability p, "
                                    "raised while r_t = E[sign(D(x))] on real images is above this target and "
                                    "lowered while below (ADA: 0.6); 0: off, p = 1", low=0, high=1)
    ada_images: int = option(50_000, "ADA: training images over which p can move from 0 to 1 (ADA: 500,000)", low=1)
    r1_gamma: float = option(0.0, "R1 penalty (Mescheder et al. 2018): D's loss += gamma/2 E ||grad_x D(x)||^2 on "
                                  "real images; 0: off", low=0)
    r1_every: int = option(1, "lazy R1 (Karras et al. 2020, StyleGAN2): the penalty on every N-th D step only, "
                              "times N; 1: every step", low=1)
    lecam: float = option(0.0, "LeCam (Tseng et al. 2021): D's loss += lambda (E relu(D(x) - a_F)^2 + E relu(a_R - "
                               "D(G(z)))^2), a_R and a_F the EMAs (decay 0.99) of D's mean logits on real and generated "
                               "images; lambda (LeCam with DiffAugment: 0.3); 0: off", low=0)
    conditional: bool = option(True, "condition on the class when the data has several (a folder of class "
                                     "folders): label embedding in G (Mirza & Osindero 2014), projection D (Miyato & "
                                     "Koyama 2018); multi-label and layout data train an unconditional GAN; "
                                     "docs/results.md measures it")
    attention: int = option(0, "SAGAN (Zhang et al. 2019): one self-attention block in G and in D at this feature-map "
                               "size, after the block that makes it (24x24 images: 6 or 12; 32x32: 8 or 16); 0: off",
                            low=0)
    d_lr_scale: float = option(1.0, "TTUR (Heusel et al. 2017, the two time-scale update rule): D's learning rate "
                                    "is --lr times this, G's is --lr (SAGAN: 4, with --lr 1e-4)", low=0)
    ema_decay: float = option(0.999, "EMA decay of G's weights, which sampling uses (Yazici et al. 2019); 0: G itself",
                              low=0, high=1)
    divergence_steps: int = option(500, f"stop when D(x) > {D_WON} and D(G(z)) < {1 - D_WON:.2g} for this many steps "
                                        "in a row (D has won; G no longer learns); 0: never", low=0)


def count_from_zero_in_older_checkpoints(module, state_dict, prefix, *args):
    """A checkpoint saved before Model counted D updates, adapted p and kept LeCam's anchors has none of them:
    count from 0 (only --d-steps > 1 and lazy R1 read the count), p = 1 (only --augment reads it), anchors 0
    (only --lecam reads them)."""
    state_dict.setdefault(prefix + "d_updates", torch.zeros((), dtype=torch.long))
    state_dict.setdefault(prefix + "ada_p", torch.tensor(1.0))
    state_dict.setdefault(prefix + "lecam_anchors", torch.zeros(2))


def size_plan(size):
    """(s0, k) with size = s0 * 2^k: halve while even and above 4 (24 -> 3, 3; 28 -> 7, 2; 32 -> 4, 3; 64 -> 4, 4)."""
    s0, k = size, 0
    while s0 % 2 == 0 and s0 > 4:
        s0, k = s0 // 2, k + 1
    if k == 0 or s0 > 7:
        raise UserError(f"GAN needs an image size s * 2^k with s <= 7 and k >= 1 (e.g. 24, 28, 32, 64), got {size}; "
                        "pass e.g. --image-size 24")
    return s0, k


def generator_width(config, size):
    """--ngf, or for --ngf 0 the width by image size (Config's comment says when it pays)."""
    return config.ngf or (WIDE_G if size <= WIDE_G_UP_TO else NARROW_G)


def attention_sizes(size):
    """The feature-map sizes --attention may name: those G's up-sampling blocks make before the image, which D's
    down-sampling blocks make too (24 -> 6, 12; 28 -> 14; 32 -> 8, 16; 64 -> 8, 16, 32)."""
    s0, k = size_plan(size)
    return [s0 * 2 ** i for i in range(1, k)]


def dcgan_init(module):
    """DCGAN's initialisation: weights ~ N(0, 0.02), BatchNorm scales ~ N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class SelfAttention(nn.Module):
    """SAGAN's self-attention (Zhang et al. 2019) over the N = H*W positions x_1..x_N of a feature map, with
    1x1 convolutions f(x) = W_f x, g(x) = W_g x (C/8 channels) and h(x) = W_h x (C channels):

        s_ij = f(x_i)^T g(x_j),  beta_{j,i} = exp(s_ij) / sum_i exp(s_ij),  o_j = sum_i beta_{j,i} h(x_i),
        y_j = gamma o_j + x_j,   gamma a learnt scalar from 0: the block starts as the identity.

    W_h keeps C channels, as in the paper's first arXiv version and heykeetae's PyTorch SAGAN; the paper's final
    version maps h to C/8 and back with a fourth 1x1 convolution, o_j = W_v sum_i beta_{j,i} h(x_i), and the
    official TensorFlow code does so through C/2, max-pooling the positions of f and h. No biases, as the rest of
    this DCGAN. In D with --spectral-norm, the three convolutions are spectrally normalised like D's other weights
    (SAGAN normalises G's as well; this G keeps its BatchNorm and plain weights)."""

    def __init__(self, channels):
        super().__init__()
        c_bar = max(channels // 8, 1)   # C/8, at least one channel in tiny networks
        self.f, self.g = nn.Conv2d(channels, c_bar, 1, bias=False), nn.Conv2d(channels, c_bar, 1, bias=False)
        self.h = nn.Conv2d(channels, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x):                                                 # (B, C, H, W)
        f, g, h = self.f(x).flatten(2), self.g(x).flatten(2), self.h(x).flatten(2)   # (B, C/8, N) x 2, (B, C, N)
        beta = torch.softmax(f.transpose(1, 2) @ g, dim=1)                # (B, N, N): [i, j] = beta_{j,i}, sum_i = 1
        o = h @ beta                                                      # (B, C, N): o_j = sum_i beta_{j,i} h(x_i)
        return self.gamma * o.view_as(x) + x                              # (B, C, H, W)


def attention_at(config, size, channels):
    """[SelfAttention(channels)] after the block that makes size x size feature maps when --attention names it."""
    return [SelfAttention(channels)] if size == config.attention else []


class Generator(nn.Module):
    """G(z, y): z (B, latent_dim) [+ embedding of y] -> (B, C, S, S) in [-1, 1]."""

    def __init__(self, config, channels, size, num_classes):
        super().__init__()
        s0, k = size_plan(size)
        width = generator_width(config, size)   # --ngf, or by image size
        c = width * 2 ** (k - 1)
        self.label_emb = nn.Embedding(num_classes, config.latent_dim) if num_classes else None
        z_dim = config.latent_dim * (2 if num_classes else 1)
        layers = [nn.ConvTranspose2d(z_dim, c, s0, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
        # state size. (width * 2^(k-1)) x s0 x s0
        for i in range(1, k):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c //= 2   # state size. c x 2s x 2s: ... width x S/2 x S/2
            layers += attention_at(config, s0 * 2 ** i, c)
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=False), nn.Tanh()]
        # state size. C x S x S
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, z, y=None):
        if self.label_emb is not None:
            z = torch.cat([z, self.label_emb(y)], dim=1)                         # (B, 2 latent_dim)
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """D(x, y): (B, C, S, S) in [-1, 1] -> (B,) logits; D's probability that x is real is sigmoid(logit).

    Unconditional: psi(phi(x)). Projection: psi(phi(x)) + embed(y)^T sum_pixels phi(x)."""

    def __init__(self, config, channels, size, num_classes):
        super().__init__()
        s0, k = size_plan(size)
        c = config.ndf
        layers = [nn.Conv2d(channels, c, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]   # no norm at the input
        layers += attention_at(config, size // 2, c)   # state size. ndf x S/2 x S/2
        for i in range(2, k + 1):
            norm = nn.Identity() if config.spectral_norm else nn.BatchNorm2d(2 * c)
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), norm, nn.LeakyReLU(0.2, inplace=True)]
            c *= 2    # state size. c x s/2 x s/2: ... (ndf * 2^(k-1)) x s0 x s0
            layers += attention_at(config, size // 2 ** i, c)
        self.phi = nn.Sequential(*layers)
        self.psi = nn.Conv2d(c, 1, s0, 1, 0, bias=False)                           # (B, 1, 1, 1)
        self.embed = nn.Embedding(num_classes, c) if num_classes else None
        self.apply(dcgan_init)
        if config.spectral_norm:   # W / sigma(W), sigma by one power iteration per step; the attention's W too
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Embedding)):
                    nn.utils.parametrizations.spectral_norm(m)

    def forward(self, x, y=None):
        h = self.phi(x)                                                            # (B, c, s0, s0)
        logits = self.psi(h).flatten()
        if self.embed is not None:
            logits = logits + (self.embed(y) * h.sum(dim=(2, 3))).sum(dim=1)        # + embed(y)^T phi(x)
        return logits


def discriminator_loss(real_logits, fake_logits, kind):
    """D's loss, minimised. With D = sigmoid(logit), -log D = softplus(-logit) and -log(1 - D) = softplus(logit)."""
    if kind == "hinge":   # L_D = E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))]
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    # L_D = -E[log D(x)] - E[log(1 - D(G(z)))]
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits, kind):
    """G's loss, minimised."""
    if kind == "hinge":   # L_G = -E[D(G(z))]
        return -fake_logits.mean()
    # non-saturating: L_G = -E[log D(G(z))], not E[log(1 - D(G(z)))], whose gradient vanishes when D wins
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits, real):
    """R1 (Mescheder et al. 2018): E_x ||grad_x D(x)||^2 over the real images `real` (which require grad), kept
    differentiable in D's weights (create_graph) so D's step can minimise it. It is the gradient of the summed
    logits: per image when D treats images independently (spectral norm); with BatchNorm in D each logit also
    depends on the rest of the batch, and the penalty is that of the batch's summed logit."""
    grad, = torch.autograd.grad(real_logits.sum(), real, create_graph=True)   # (B, C, H, W)
    return grad.square().sum(dim=(1, 2, 3)).mean()


def lecam_penalty(real_logits, fake_logits, anchor_real, anchor_fake):
    """LeCam's R_LC (Tseng et al. 2021) as their code computes it, on logits, only the side past the anchor:
    E relu(D(x) - a_F)^2 + E relu(a_R - D(G(z)))^2. It keeps D from pushing its outputs on real images ever
    further from those on generated ones, which is what a D that memorises the training images does."""
    return F.relu(real_logits - anchor_fake).square().mean() + F.relu(anchor_real - fake_logits).square().mean()


class Model(GenerativeModel):
    selects_by_sample_quality = True   # Best and early stopping follow FID / FD_eval, not a loss
    sample_options = ()

    def __init__(self, config, image_shape, num_classes=1, condition="class"):
        super().__init__(config, image_shape)
        channels, height, width = image_shape
        if height != width:
            raise UserError(f"GAN needs square images, got {height}x{width}")
        if config.loss not in LOSSES:
            raise UserError(f"unknown --loss {config.loss}; choose {' or '.join(LOSSES)}")
        sizes = attention_sizes(height)
        if config.attention and config.attention not in sizes:
            choices = f"among {', '.join(map(str, sizes))} (or 0: off)" if sizes else "0 (off), or a larger --image-size"
            raise UserError(f"--attention {config.attention} is not a feature-map size of this GAN at {height}x{width}; "
                            f"choose {choices}")
        if config.d_lr_scale <= 0:
            raise UserError(f"--d-lr-scale must be above 0, got {config.d_lr_scale}; 1 trains D at --lr, as G")
        self.lr_scales = {"discriminator": config.d_lr_scale}
        self.num_classes = num_classes if config.conditional and condition == "class" and num_classes > 1 else 0
        self.condition = "class" if self.num_classes else None
        # channels_last (N, H, W, C in memory): the layout oneDNN's CPU convolutions run fastest in
        self.generator = Generator(config, channels, height, self.num_classes).to(memory_format=torch.channels_last)
        self.discriminator = Discriminator(config, channels, height, self.num_classes).to(
            memory_format=torch.channels_last)
        self.augment_policy = parse_policy(config.augment)
        if config.ada_target > 0 and not self.augment_policy:
            raise UserError("--ada-target adapts the probability of the --augment transforms; pass --augment too")
        self.init_ema("generator", config.ema_decay)   # sampling uses these weights, BatchNorm statistics included
        self.register_buffer("d_won_steps", torch.zeros((), dtype=torch.long))   # steps in a row that D won
        # D updates so far: which steps update G (--d-steps) and carry lazy R1 (--r1-every), the same after --resume
        self.register_buffer("d_updates", torch.zeros((), dtype=torch.long))
        # LeCam's anchors a_R, a_F: EMAs of D's mean logits on real and generated images, set by the first D step
        self.register_buffer("lecam_anchors", torch.zeros(2))
        self.register_buffer("ada_p", torch.tensor(0.0 if config.ada_target > 0 else 1.0))   # ADA starts at p = 0
        self.register_load_state_dict_pre_hook(count_from_zero_in_older_checkpoints)

    def parameter_groups(self):
        return {"discriminator": self.discriminator, "generator": self.generator}

    def noise(self, n, generator=None):
        """z ~ N(0, I), (n, latent_dim)."""
        return torch.randn(n, self.config.latent_dim, generator=generator, device=self.ema_updates.device)

    @staticmethod
    def report(loss_d, loss_g, real_logits, fake_logits):
        """What is logged: `loss` is D's (the NS loss is 2 log 2 - 2 JSD(data, G) when D is optimal), both
        losses, and D's mean probability that real images (D_x) and generated ones (D_G_z) are real."""
        return {"loss": loss_d, "loss_D": loss_d, "loss_G": loss_g,
                "D_x": torch.sigmoid(real_logits).mean(), "D_G_z": torch.sigmoid(fake_logits).mean()}

    def judge(self, images, labels, generator=None):
        """D(T(images)): D's logits on what it sees, images in [-1, 1] augmented by --augment (T = identity without),
        each transform with probability p."""
        return self.discriminator(diff_augment(images, self.augment_policy, float(self.ada_p), generator), labels)

    def loss(self, x, y=None, generator=None):
        """Both losses on a batch without an update (validation: eval mode, so the EMA G; fixed noise and fixed
        augmentations, so val D_x compares with train D_x: a growing gap is D memorising the training images)."""
        labels = y if self.conditional else None
        fake = (self.generator if self.training else self.ema)(self.noise(len(x), generator), labels)
        real_logits, fake_logits = self.judge(x * 2 - 1, labels, generator), self.judge(fake, labels, generator)
        return self.report(discriminator_loss(real_logits, fake_logits, self.config.loss),
                           generator_loss(fake_logits, self.config.loss), real_logits, fake_logits)

    def discriminator_terms(self, real, z, labels, penalise=False):
        """D's loss on real images and on G(z), generated without a graph: this step updates D only. With
        `penalise`, + r1_every * gamma/2 * R1, the gradient taken through the augmentation to the real images.
        loss_G is G's loss on these generated images before D's update: every step reports it, whatever --d-steps."""
        with torch.no_grad():
            fake = self.generator(z, labels)
        real = real.detach().requires_grad_(penalise)
        real_logits, fake_logits = self.judge(real, labels), self.judge(fake, labels)
        loss_d = discriminator_loss(real_logits, fake_logits, self.config.loss)
        terms = {"loss_D": loss_d, "loss_G": generator_loss(fake_logits.detach(), self.config.loss),
                 "D_x": torch.sigmoid(real_logits).mean(), "D_G_z": torch.sigmoid(fake_logits).mean()}
        if self.config.r1_gamma > 0:   # r1: the penalty's share of D's loss, averaged over steps as it is applied
            penalty = (self.config.r1_every * self.config.r1_gamma / 2 * r1_penalty(real_logits, real) if penalise
                       else torch.zeros((), device=real.device))
            terms["r1"] = penalty
            loss_d = loss_d + penalty
        if self.config.lecam > 0:   # the anchors take this step's means first, as in their code; the first sets them
            means = torch.stack([real_logits.mean(), fake_logits.mean()]).detach()
            decay = LECAM_DECAY if int(self.d_updates) else 0.0
            anchors = self.lecam_anchors.copy_(decay * self.lecam_anchors + (1 - decay) * means).clone()
            terms["lecam"] = self.config.lecam * lecam_penalty(real_logits, fake_logits, *anchors)
            loss_d = loss_d + terms["lecam"]
        if self.config.ada_target > 0:
            terms["ada_r"] = real_logits.detach().sign().mean()      # r_t = E[sign(D(x))], x real
        return {"loss": loss_d, **terms}

    def generator_terms(self, z, labels):
        """G's loss on D's verdict on T(G(z)). D's weights are frozen meanwhile: G's step needs the gradient with
        respect to D's input only, and D's weight gradients would be computed for nothing (its step zeroes them)."""
        self.discriminator.requires_grad_(False)
        try:
            return {"loss": generator_loss(self.judge(self.generator(z, labels), labels), self.config.loss)}
        finally:
            self.discriminator.requires_grad_(True)

    def train_step(self, x, y, optimizers):
        """One D step on this batch and as many generated images; on every d_steps-th call, then one G step on the
        same z: SN-GAN's n_dis D steps per G step, each D step on its own real batch (the loop's, as they come)."""
        real, labels = x * 2 - 1, (y if self.conditional else None)                 # [0, 1] -> [-1, 1]
        z = self.noise(len(x))
        # (1) Update D: minimise discriminator_loss on T(real images) and T(G(z)), for the real batch's labels
        penalise = self.config.r1_gamma > 0 and int(self.d_updates) % self.config.r1_every == 0
        d_step = partial(self.discriminator_terms, penalise=penalise)
        d_terms = optimizers.step("discriminator", d_step, real, z, labels)
        self.d_updates += 1
        if self.config.ada_target > 0:   # p <- clip(p + sign(r_t - target) B / ada_images, 0, 1), each D step
            step = len(x) / self.config.ada_images * torch.sign(d_terms["ada_r"] - self.config.ada_target)
            self.ada_p.copy_((self.ada_p + step).clamp(0, 1))
            d_terms["ada_p"] = self.ada_p.clone()
        # (2) Update G: minimise generator_loss, D's verdict on T(G(z))
        if int(self.d_updates) % self.config.d_steps == 0:
            optimizers.step("generator", self.generator_terms, z, labels)
            self.update_ema()
        terms = {"loss": d_terms["loss_D"], **{k: v for k, v in d_terms.items() if k != "loss"}}
        self.check_divergence(terms)
        return terms

    def check_divergence(self, terms):
        """TrainingDiverged on a NaN/inf loss, or when D has won completely for divergence_steps steps in a row."""
        loss_d, loss_g = float(terms["loss_D"]), float(terms["loss_G"])
        if not (math.isfinite(loss_d) and math.isfinite(loss_g)):
            raise TrainingDiverged(f"GAN diverged: loss_D {loss_d:.4g}, loss_G {loss_g:.4g}; Best is left as it "
                                   "was. Try a lower --lr or --spectral-norm.")
        won = float(terms["D_x"]) > D_WON and float(terms["D_G_z"]) < 1 - D_WON
        self.d_won_steps.fill_(int(self.d_won_steps) + 1 if won else 0)
        if self.config.divergence_steps and int(self.d_won_steps) >= self.config.divergence_steps:
            raise TrainingDiverged(f"GAN diverged: D won completely (D(x) > {D_WON}, D(G(z)) < {1 - D_WON:.2g}) "
                                   f"for {int(self.d_won_steps)} steps in a row, so G no longer learns; Best is "
                                   "left as it was. Try --spectral-norm, --loss hinge or a lower --lr.")

    @torch.no_grad()
    def sample(self, n, generator=None, labels=None):
        """n images in [0, 1]: (G_ema(z, y) + 1) / 2, z ~ N(0, I); y = labels, else class i mod K for image i."""
        if labels is not None and not self.conditional:
            raise UserError("this GAN is unconditional (trained with --no-conditional, on one class, or on "
                            "multi-label or layout data); drop --class-label")
        z = self.noise(n, generator)
        y = None
        if self.conditional:
            y = labels.to(z.device) if labels is not None else torch.arange(n, device=z.device) % self.num_classes
        return (self.ema(z, y) + 1) / 2
