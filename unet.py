"""The U-Net that denoising models share (Ronneberger et al. 2015, as DDPM's: Ho et al. 2020, Appendix B):
residual blocks with a time embedding, self-attention at chosen resolutions, skips from each level down to the
same level up. It knows nothing of diffusion: it maps (x, t, y) to a tensor of x's size (or `out_channels`),
and the model file that imports it (ddpm.py, flow_matching.py) says what t means and what the output predicts.

Conditioning with classifier-free guidance (Ho & Salimans 2021) is here too, as it is network-side. A condition
y is one of three kinds (CONDITIONS), each with a null value that stands for "no condition":
    class    (B,) indices in 0 .. K-1, embedded and added to the time embedding; null: K
    labels   (B, K) multi-hot vectors (a set of labels per image), a linear map added to the time embedding,
             and with label_attention cross-attention to a token per present label as well; null: all zeros
    layout   (B, H, W) maps, value 1 + the label at each pixel (0: background), one-hot (K + 1 channels)
             concatenated to the input, averaged down to the input's size (a latent); null: -1, all-zero channels
Training drops the condition to null with some probability (`drop_condition`), and `guided` mixes the two
predictions at sampling time.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, option


@dataclass
class UNetConfig:
    width: int = option(32, "channels of the U-Net's first level", low=2)
    channel_mults: tuple = option((1, 2, 2), "channels of each U-Net level, as multiples of --width", low=1)
    blocks_per_level: int = option(1, "residual blocks per level on the way down (one more on the way up)", low=1)
    attention_levels: tuple = option((2,), "levels (0 = the first: full resolution, 1/p of it with patches) with "
                                           "self-attention", low=0)
    dropout: float = option(0.0, "dropout in the residual blocks (DDPM used 0.1 on CIFAR-10)", low=0, high=1)
    scale_shift: bool = option(False, "the time and condition embedding scales and shifts each block's normalised "
                                      "features, GroupNorm(h) (1 + s) + b (Dhariwal & Nichol 2021), instead of "
                                      "being added to them")
    patch_size: int = option(1, "pixels a side of the patches the U-Net works on: x is folded into p x p patches, "
                                "C p^2 channels at 1/p of the resolution (pixel unshuffle), and its output unfolded "
                                "(simple diffusion: Hoogeboom et al. 2023, Sec. 3.3): with 2, the first level has 4x "
                                "fewer positions; docs/results.md measures it", low=1)
    label_attention: bool = option(False, "multi-hot labels: also cross-attention from the features at the attention "
                                          "levels and the middle to a learned token per label the image holds (as "
                                          "text-to-image models: Rombach et al. 2022, Sec. 3.3), so that each place "
                                          "can take one of the asked objects; docs/results.md measures it")


def check_size(config, height, width, what="the image"):
    """The patches divide H and W by p, each level but the last halves them, so H and W must divide by
    p 2^(levels - 1)."""
    factor = config.patch_size * 2 ** (len(config.channel_mults) - 1)
    if height % factor or width % factor:
        raise UserError(f"a U-Net with {len(config.channel_mults)} levels and --patch-size {config.patch_size} needs "
                        f"{what} size divisible by {factor}, got {height}x{width}; pass e.g. --image-size 32, "
                        f"or fewer --channel-mults")


def timestep_embedding(t, freqs):
    """Sinusoidal embedding of t (Vaswani et al. 2017): [sin(t w_i), cos(t w_i)]. (B,) -> (B, 2 len(freqs))."""
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input's dtype, its output cast back (as guided-diffusion's
    GroupNorm32): under bf16 autocast the statistics keep float32's precision, and on the CPU the bf16 kernels for
    channels_last tensors are 3 to 4 times slower than float32's (benchmarks/README.md)."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


def group_norm(channels):
    """GroupNorm with at least 4 channels a group: one channel a group would erase each channel's mean per image,
    and with it the colour of the noise that the network must predict."""
    return GroupNorm32(math.gcd(32, max(channels // 4, 1)), channels)


def attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(C)) v over the last two dims, `mask` (True: attend) broadcast over the scores.
    (B, L, C), (B, M, C), (B, M, C) -> (B, L, C). On the CPU as three explicit ops, the softmax in float32: at these
    sizes 1.4 to 4.8 times faster in bf16 than PyTorch's fused CPU kernels (benchmarks/README.md); elsewhere the
    fused kernel (flash attention on a GPU), which never stores the L x M scores."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5                        # (B, L, M)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; + the projected time(+condition) embedding; GroupNorm, SiLU, dropout, conv; + skip.
    With scale_shift the embedding gives (s, b) and the second GroupNorm's output becomes norm(h) (1 + s) + b."""

    def __init__(self, c_in, c_out, emb_dim, dropout, scale_shift=False):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.scale_shift = scale_shift
        self.emb = nn.Linear(emb_dim, 2 * c_out if scale_shift else c_out)
        self.norm2, self.dropout = group_norm(c_out), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (DDPM's init)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(emb)[:, :, None, None]                           # (B, c_out or 2 c_out, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)                                     # (B, c_out, H, W) + (B, c_out, 1, 1)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels):
        super().__init__()
        self.norm, self.qkv = group_norm(channels), nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)   # 3 x (B, HW, C)
        a = attention(q, k, v)                                                        # softmax(q k^T / sqrt(C)) v
        return x + self.out(a.transpose(1, 2).reshape(b, c, h, w))


class LabelAttention(nn.Module):
    """Cross-attention from each position to the tokens of an image's labels: softmax(q k^T / sqrt(C)) v over the
    present labels' tokens and one null token that every image holds (the null condition attends to it alone)."""

    def __init__(self, channels, token_dim):
        super().__init__()
        self.norm, self.q = group_norm(channels), nn.Conv2d(channels, channels, 1)
        self.kv = nn.Linear(token_dim, 2 * channels)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)   # starts as the identity, as Attention

    def forward(self, x, context):
        tokens, present = context                                       # (K + 1, D), (B, K + 1) bool
        b, c, h, w = x.shape
        q = self.q(self.norm(x)).flatten(2).transpose(1, 2)              # (B, HW, C)
        k, v = self.kv(tokens).expand(b, -1, -1).chunk(2, dim=2)         # 2 x (B, K + 1, C)
        a = attention(q, k, v, present[:, None, :])                                  # (B, HW, C)
        return x + self.out(a.transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """net(x, t, y): levels of ResBlocks (+ attention) going down, a middle, and back up with skips.

    x (B, in_channels, H, W), t (B,) of any scale (integer steps or 1000 t), y a condition of kind `condition`
    over `num_classes` classes or labels (none when num_classes is 0) -> (B, out_channels, H, W). The last
    convolution starts at zero, so an untrained net outputs 0."""

    def __init__(self, config, in_channels, out_channels=None, num_classes=0, condition="class"):
        super().__init__()
        width, emb_dim = config.width, 4 * config.width
        self.register_buffer("freqs", torch.exp(-math.log(10000) * torch.arange(width // 2) / (width // 2)),
                             persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.condition, self.num_classes = (condition if num_classes else None), num_classes
        self.label_emb = None
        if self.condition == "class":    # classes 0 .. K-1 and K, the null class of classifier-free guidance
            self.label_emb = nn.Embedding(num_classes + 1, emb_dim)
        elif self.condition == "labels":  # sum of the present labels' vectors; none present (null): 0
            self.label_emb = nn.Linear(num_classes, emb_dim, bias=False)
        if config.label_attention and self.condition != "labels":
            raise UserError(f"--label-attention needs multi-hot labels (--condition labels); this model's condition "
                            f"is {self.condition or 'none'}: drop --label-attention or pass --condition labels")
        # tokens of the K labels and the null token, for LabelAttention
        self.label_tokens = (nn.Parameter(torch.randn(num_classes + 1, emb_dim))
                             if config.label_attention else None)
        layout_channels = num_classes + 1 if self.condition == "layout" else 0
        self.patch = config.patch_size
        self.stem = nn.Conv2d((in_channels + layout_channels) * self.patch ** 2, width, 3, padding=1)
        levels = [width * m for m in config.channel_mults]
        self.down, skips, c = nn.ModuleList(), [width], width
        for i, c_out in enumerate(levels):
            for _ in range(config.blocks_per_level):
                self.down.append(self._stage(c, c_out, emb_dim, config, i))
                c = c_out
                skips.append(c)
            if i < len(levels) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # (B, c, H/2, W/2)
                skips.append(c)
        self.middle = nn.ModuleList([ResBlock(c, c, emb_dim, config.dropout, config.scale_shift), Attention(c),
                                     *self._label_attention(c, emb_dim),
                                     ResBlock(c, c, emb_dim, config.dropout, config.scale_shift)])
        self.up = nn.ModuleList()
        for i, c_out in reversed(list(enumerate(levels))):
            for _ in range(config.blocks_per_level + 1):
                self.up.append(self._stage(c + skips.pop(), c_out, emb_dim, config, i))
                c = c_out
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, c, 3, padding=1)))
        self.head = nn.Sequential(group_norm(c), nn.SiLU(),
                                  nn.Conv2d(c, (out_channels or in_channels) * self.patch ** 2, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)

    def _label_attention(self, channels, emb_dim):
        return [LabelAttention(channels, emb_dim)] if self.label_tokens is not None else []

    def _stage(self, c_in, c_out, emb_dim, config, level):
        block = ResBlock(c_in, c_out, emb_dim, config.dropout, config.scale_shift)
        if level not in config.attention_levels:
            return nn.ModuleList([block])
        return nn.ModuleList([block, Attention(c_out), *self._label_attention(c_out, emb_dim)])

    def forward(self, x, t, y=None):
        emb = self.time_mlp(timestep_embedding(t, self.freqs))                   # (B, 4 width)
        context = None
        if self.condition == "class":
            emb = emb + self.label_emb(y)                                        # the class joins the time embedding
        elif self.condition == "labels":
            emb = emb + self.label_emb(y.float())                                # (B, K) -> (B, 4 width)
            if self.label_tokens is not None:   # the present labels and the null token, always present
                present = torch.cat([y > 0.5, torch.ones_like(y[:, :1], dtype=torch.bool)], dim=1)   # (B, K + 1)
                context = (self.label_tokens, present)
        elif self.condition == "layout":
            x = torch.cat([x, layout_channels(y, self.num_classes, x.shape[-2:])], dim=1)   # (B, C + K + 1, H, W)
        if self.patch > 1:   # both shuffles copy even at p = 1
            x = F.pixel_unshuffle(x, self.patch)                                 # (B, C p^2, H/p, W/p)
        # channels_last (N, H, W, C in memory): oneDNN's CPU convolutions run faster in this layout
        h = self.stem(x.contiguous(memory_format=torch.channels_last))
        skips = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, nn.Conv2d) else self._run(layer, h, emb, context)
            skips.append(h)
        h = self._run(self.middle, h, emb, context)
        for layer in self.up:
            if isinstance(layer, nn.Sequential):
                h = layer(h)                                                     # (B, c, 2H, 2W)
            else:
                h = self._run(layer, torch.cat([h, skips.pop()], dim=1), emb, context)
        out = self.head(h)
        return F.pixel_shuffle(out, self.patch) if self.patch > 1 else out      # (B, out_channels, H, W)

    @staticmethod
    def _run(stage, h, emb, context):
        for m in stage:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h, context) if isinstance(m, LabelAttention) else m(h)
        return h


CONDITIONS = ("class", "labels", "layout")


def condition_for(condition, num_classes, unconditional=False):
    """(K, kind) of the condition a denoiser is built for: no condition with --unconditional or one class."""
    if condition not in CONDITIONS:
        raise UserError(f"unknown condition {condition}; choose {', '.join(CONDITIONS)}")
    k = 0 if unconditional or (condition == "class" and num_classes < 2) else num_classes
    return k, (condition if k else None)


def layout_channels(layout, num_labels, size):
    """(B, H, W) maps of 1 + label (0: background, -1: null) -> (B, K + 1, h, w) one-hot, averaged over each
    cell when (h, w) is smaller than (H, W): the share of each label in the cell."""
    one_hot = F.one_hot(layout.long().clamp(min=0), num_labels + 1) * (layout >= 0)[..., None]   # (B, H, W, K+1)
    channels = one_hot.permute(0, 3, 1, 2).float()                                              # (B, K+1, H, W)
    return channels if channels.shape[-2:] == tuple(size) else F.adaptive_avg_pool2d(channels, size)


def as_condition(y, kind):
    """A batch of conditions as the network takes them: labels as floats, classes and layouts as integers (layouts
    arrive as uint8, which has no room for the null value -1)."""
    return y.float() if kind == "labels" else y.long()


def null_condition(y, kind, num_classes):
    """The condition that stands for none: class K, no labels (zeros), an empty layout (-1)."""
    if kind == "class":
        return torch.full_like(y, num_classes)
    return torch.zeros_like(y) if kind == "labels" else torch.full_like(y, -1)


def sampling_condition(labels, n, kind, num_classes, size, device):
    """The conditions of n samples: `labels` as given; else class i mod K for image i, or for labels and layouts
    the null condition (unconditional samples); None for a model without a condition."""
    if kind is None:
        return None
    if labels is not None:
        return as_condition(labels.to(device), kind)
    if kind == "class":
        return torch.arange(n, device=device) % num_classes
    template = torch.zeros(n, num_classes) if kind == "labels" else torch.zeros(n, *size, dtype=torch.long)
    return null_condition(template.to(device), kind, num_classes)


def drop_condition(y, kind, num_classes, probability, generator=None):
    """Classifier-free guidance's training: each image's condition becomes the null one with `probability`."""
    drop = torch.rand(len(y), generator=generator, device=y.device) < probability
    return torch.where(drop.view(-1, *[1] * (y.dim() - 1)), null_condition(y, kind, num_classes), y)


def guidance_at(sigma, guidance, interval=None):
    """Guidance in a limited interval (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves
    Sample and Distribution Quality in Diffusion Models"): w at noise levels sigma in (lo, hi], 1 elsewhere (the
    conditional model alone, one network evaluation instead of two); interval None: w at every level. sigma is EDM's
    noise level of x_t, the noise's scale against the data's: sqrt((1 - ab_t) / ab_t) in DDPM, t / (1 - t) in
    rectified flow (x_t / (1 - t) = x_0 + sigma eps)."""
    if interval is None:
        return guidance
    lo, hi = interval
    return guidance if lo < sigma <= hi else 1.0


def guided(net, x, t, y, guidance):
    """Classifier-free guidance: out = out_u + w (out_c - out_u), out_u with the null condition; w = 1 is the
    conditional prediction alone, w = 0 the unconditional one. Without a condition (y None): net(x, t)."""
    if y is None:
        return net(x, t)
    if guidance == 1:
        return net(x, t, y)
    null = null_condition(y, net.condition, net.num_classes)
    out_c, out_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    return out_u + guidance * (out_c - out_u)
