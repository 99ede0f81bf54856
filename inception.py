"""The FID network: InceptionV3 as pytorch-fid builds it, its weight file, and its input preprocessing.

FID (Heusel et al. 2017) is defined by the pool3 features of one particular network: the InceptionV3
graph TensorFlow's FID code used (`inception-2015-12-05`), whose weights pytorch-fid ported to
`pt_inception-2015-12-05-6726825d.pth`. That graph differs from torchvision's InceptionV3 in its
average pools and in one max pool, so `fid_inception_v3()` does what pytorch-fid's function of that
name does: build torchvision's network with the graph's 1008 classes and patch those blocks.
Only the weight file makes the features FID's; this module never runs the network with random weights.

The preprocessing is pytorch-fid's: uint8 images, / 255, grey repeated to RGB, bilinear resize to
299 x 299, scaled to [-1, 1].
"""
import urllib.error
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SIZE = 299


# ----------------------------------------------------------------------------------------------
# The network: torchvision's InceptionV3 with the FID graph's blocks
# ----------------------------------------------------------------------------------------------

def fid_inception_v3():
    """pytorch-fid's `fid_inception_v3()`, without its weights: the module tree of the weight file.

    (B, 3, 299, 299) in [-1, 1] -> (B, 1008) logits in eval mode; `load_inception` swaps `fc` for the
    identity, which leaves the pool3 features (B, 2048). Mixed_5b..Mixed_7c are replaced by the FID
    variants below; the stem, Mixed_6a and Mixed_7a are torchvision's unchanged.
    """
    # imported here, not at the top: importing torchvision is slow, and most scripts that import
    # fid.py never build this network
    from torchvision.models import inception_v3
    from torchvision.models.inception import InceptionA, InceptionC, InceptionE

    def tf_average_pool(x):
        # TensorFlow's average pool does not count the zero padding: count_include_pad=False
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class FIDInceptionA(InceptionA):
        """1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avgpool -> 1x1, concatenated (Mixed_5b-d)."""

        def forward(self, x):
            return torch.cat([self.branch1x1(x),
                              self.branch5x5_2(self.branch5x5_1(x)),
                              self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                              self.branch_pool(tf_average_pool(x))], 1)

    class FIDInceptionC(InceptionC):
        """A 7x7 factorised as 1x7 and 7x1 convolutions, single and double (Mixed_6b-e)."""

        def forward(self, x):
            double = x
            for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                         self.branch7x7dbl_5):
                double = conv(double)
            return torch.cat([self.branch1x1(x),
                              self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                              double,
                              self.branch_pool(tf_average_pool(x))], 1)

    class FIDInceptionE_1(InceptionE):
        """Expanded filter bank, 1x3 and 3x1 side by side; average pool branch (Mixed_7b)."""

        def pool(self, x):
            return tf_average_pool(x)

        def forward(self, x):
            single = self.branch3x3_1(x)
            double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            return torch.cat([self.branch1x1(x),
                              self.branch3x3_2a(single), self.branch3x3_2b(single),
                              self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
                              self.branch_pool(self.pool(x))], 1)

    class FIDInceptionE_2(FIDInceptionE_1):
        """Mixed_7c: the FID graph pools with a max here, unlike the paper; pytorch-fid keeps it, so do we."""

        def pool(self, x):
            return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)

    # init_weights=False: the weight file overwrites every tensor, so skip torchvision's slow init
    net = inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)          # (B, 256, 35, 35)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)          # (B, 288, 35, 35)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)          # (B, 288, 35, 35)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)          # (B, 768, 17, 17)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)                         # (B, 2048, 8, 8)
    net.Mixed_7c = FIDInceptionE_2(2048)                         # (B, 2048, 8, 8), then pool3: (B, 2048)
    return net


# ----------------------------------------------------------------------------------------------
# The weight file: given, cached, or downloaded; a clear line when none of these works
# ----------------------------------------------------------------------------------------------

def hub_weights_file():
    """Where the weight file is looked for and downloaded to: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME


def inception_weights(path=None):
    """The weight file: `path`, else the torch hub cache, else downloaded there from pytorch-fid's release."""
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"--inception-weights '{path}' does not exist")
        return Path(path)
    cached = hub_weights_file()
    if not cached.is_file():
        try:  # offline, behind a proxy, or an unwritable cache: one line saying what to do, not a traceback
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(cached), hash_prefix="6726825d", progress=True)
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            raise UserError(f"FID needs the Inception weights and the download failed ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:80] if str(err) else 'no detail'}); download "
                            f"{FID_WEIGHTS_URL} to {cached}, or pass --inception-weights PATH") from err
    return cached


def load_inception(path=None, device="cpu"):
    """The FID InceptionV3 with pytorch-fid's weights, in eval mode: (B, 3, 299, 299) -> pool3 (B, 2048)."""
    path = inception_weights(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = fid_inception_v3()
        net.load_state_dict(state)
    except Exception as err:  # a foreign or truncated file: say which, not a traceback
        first_line = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        fix = "delete it to download it again" if path == hub_weights_file() else f"download {FID_WEIGHTS_URL}"
        raise UserError(f"'{path}' is not pytorch-fid's Inception weight file ({first_line}); {fix}, or pass "
                        "--inception-weights PATH") from err
    net.fc = nn.Identity()   # the 1008-way classifier is in the file, not in the features
    return net.eval().to(device)


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------

def inception_input(images):
    """uint8 (B, C, H, W) -> Inception's input (B, 3, 299, 299) in [-1, 1], as pytorch-fid.

    ToTensor's x / 255, grey repeated to RGB, bilinear resize (align_corners=False, no antialias), 2x - 1.
    """
    x = images.float() / 255
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1
