"""SWD against independent computations: scipy's filters, W1 by hand, the mean |cos| of random directions, and
neighbourhoods read back from the image they came from."""
import math

import numpy as np
import pytest
import scipy.ndimage
import torch

import fid
import swd
from common import UserError


def test_pyramid_filters_are_scipy_mirror_convolutions():
    kernel = swd.GAUSSIAN.double().numpy()[None, None]
    x = torch.rand(2, 3, 16, 12, dtype=torch.float64)
    down = scipy.ndimage.convolve(x.numpy(), kernel, mode="mirror")[:, :, ::2, ::2]
    torch.testing.assert_close(swd.pyramid_down(x), torch.from_numpy(down))
    small = torch.rand(2, 3, 8, 6, dtype=torch.float64)
    spread = np.zeros((2, 3, 16, 12))
    spread[:, :, ::2, ::2] = small.numpy()
    up = scipy.ndimage.convolve(spread, 4 * kernel, mode="mirror")
    torch.testing.assert_close(swd.pyramid_up(small, (16, 12)), torch.from_numpy(up))


def test_laplacian_pyramid_sums_back_to_the_images():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    levels = swd.laplacian_pyramid(images, 3)
    assert [tuple(level.shape[-2:]) for level in levels] == [(32, 32), (16, 16), (8, 8)]
    rebuilt = levels[-1]
    for level in levels[-2::-1]:
        rebuilt = swd.pyramid_up(rebuilt, level.shape[-2:]) + level
    torch.testing.assert_close(rebuilt, images.float(), atol=1e-3, rtol=0)
    torch.testing.assert_close(swd.laplacian_pyramid(images, 1)[0], images.float())


def test_resolutions_halve_down_to_16_as_progan():
    assert swd.resolutions(64) == [64, 32, 16]
    assert swd.resolutions(32) == [32, 16]
    assert swd.resolutions(24) == [24]
    assert swd.resolutions(8) == [8]


def test_neighbourhoods_are_crops_wholly_inside_their_image():
    b, c, h, w = 2, 3, 12, 10
    level = torch.arange(b * c * h * w, dtype=torch.float64).reshape(b, c, h, w)   # each value names its pixel
    found = swd.patches(level, 200, torch.Generator().manual_seed(0))
    assert found.shape == (b * 200, c, 7, 7)
    corners = set()
    for i, patch in enumerate(found):
        image, rest = divmod(int(patch[0, 0, 0]), c * h * w)
        y, x = divmod(rest, w)
        assert image == i // 200 and 0 <= y <= h - 7 and 0 <= x <= w - 7
        assert torch.equal(patch, level[image, :, y:y + 7, x:x + 7])
        corners.add((y, x))
    assert len(corners) == (h - 6) * (w - 6)   # 400 draws reach all 24 positions
    with pytest.raises(UserError, match="too small"):
        swd.patches(torch.zeros(1, 3, 6, 6), 4, torch.Generator())


def test_sliced_wasserstein_in_one_dimension_is_w1():
    # a unit direction in 1-D is +1 or -1; W1 pairs the sorted values either way: (0, 0), (1, 1), (2, 5)
    a = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    b = torch.tensor([[5.0], [1.0], [0.0]], dtype=torch.float64)
    projections = swd.SortedProjections(a, torch.Generator().manual_seed(0))
    assert projections.distance(b) == pytest.approx(1.0)
    assert projections.distance(a + 3) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="same shape"):
        projections.distance(b[:2])


def test_sliced_wasserstein_of_a_translation_is_the_mean_projected_shift():
    # b = a + v: along a unit direction d every projection moves by <v, d>, so W1 = |<v, d>|; for d uniform on
    # the circle E|cos| = 2 / pi, and 512 directions average to within a few percent of |v| 2 / pi
    a = torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = torch.tensor([3.0, 4.0], dtype=torch.float64)
    found = swd.SortedProjections(a, torch.Generator().manual_seed(2)).distance(a + v)
    assert found == pytest.approx(5 * 2 / math.pi, rel=0.06)


def test_swd_ranks_blurred_images_far_and_ignores_a_colour_shift():
    generator = torch.Generator().manual_seed(3)
    real, other = (torch.randint(0, 256, (256, 3, 32, 32), generator=generator, dtype=torch.uint8) for _ in "ab")
    blurred = other.float()
    for _ in range(3):
        blurred = swd.blur(blurred, swd.GAUSSIAN)
    same_kind, far = swd.swd(real, other), swd.swd(real, blurred.round())
    assert list(same_kind) == ["SWD_32", "SWD_16", "SWD"]
    assert same_kind["SWD"] == pytest.approx((same_kind["SWD_32"] + same_kind["SWD_16"]) / 2)
    assert all(far[k] > 2 * same_kind[k] for k in same_kind)   # measured: 20 and 23 against 97 and 60
    assert swd.swd(real, blurred, seed=4) == swd.swd(real, blurred, seed=4)
    # each set is normalised per channel: a brighter, higher-contrast copy draws the same descriptors
    brighter = other.float() * torch.tensor([2.0, 1.5, 1.0])[:, None, None] + 10
    for key, value in swd.swd(real, brighter).items():
        assert value == pytest.approx(same_kind[key], rel=1e-4)
    with pytest.raises(UserError, match="same shape"):
        swd.swd(real, other[:10])


def test_the_real_side_computed_once_draws_as_one_pass_over_both_sets():
    # the straightforward order, per level: the real set's neighbourhoods, the fake set's, then 4 x 128 directions
    def one_pass(real, fake, seed):
        generator = torch.Generator().manual_seed(seed)
        levels = swd.resolutions(real.shape[-1])
        found = {}
        for res, real_level, fake_level in zip(levels, swd.laplacian_pyramid(real, len(levels)),
                                               swd.laplacian_pyramid(fake, len(levels))):
            a = swd.descriptors(real_level, swd.PATCHES_PER_IMAGE, generator)
            b = swd.descriptors(fake_level, swd.PATCHES_PER_IMAGE, generator)
            distances = []
            for _ in range(swd.REPEATS):
                dirs = torch.randn(a.shape[1], swd.DIRECTIONS, generator=generator, dtype=a.dtype)
                dirs = dirs / dirs.norm(dim=0, keepdim=True)
                distances.append((torch.sort(a @ dirs, dim=0).values - torch.sort(b @ dirs, dim=0).values).abs().mean())
            found[f"SWD_{res}"] = 1e3 * float(torch.stack(distances).mean())
        return found

    generator = torch.Generator().manual_seed(6)
    real, first, second = (torch.randint(0, 256, (12, 3, 32, 32), generator=generator, dtype=torch.uint8)
                           for _ in "abc")
    against_real = swd.SlicedWasserstein(real, seed=7)
    for fake in (first, second, first):
        found, expected = against_real(fake), one_pass(real, fake, 7)
        assert list(found) == ["SWD_32", "SWD_16", "SWD"]
        for key in expected:
            assert found[key] == pytest.approx(expected[key], rel=1e-12)
    assert against_real(first) == swd.swd(real, first, seed=7)
    with pytest.raises(UserError, match="same shape"):
        against_real(first[:5])


class MeanColour:
    """A feature extractor of three dimensions: each image's mean colour."""
    kind, names = "evaluator", ("FD_eval", "KID_eval")

    def __call__(self, images, desc="", cache=True):
        return images.double().mean(dim=(2, 3)).numpy()


class NoiseModel(torch.nn.Module):
    """Samples uniform noise from the generator it is given."""
    conditional, condition = False, None

    def sample(self, n, generator):
        return torch.rand(n, 3, 16, 16, generator=generator)


def test_sample_quality_reports_the_swd_of_its_samples():
    real = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8)
    labels = torch.zeros(20, dtype=torch.long)
    metrics = fid.SampleQuality([MeanColour()], real, labels, n_samples=30, seed=5,
                                sliced_wasserstein=True)(NoiseModel())
    fake = fid.quantize(NoiseModel().sample(30, torch.Generator().manual_seed(5)))
    assert metrics["SWD"] == swd.swd(real, fake[:20], seed=5)["SWD"]   # equal sets: the first 20 samples
    assert "SWD" not in fid.SampleQuality([MeanColour()], real, labels)(NoiseModel())
    with pytest.raises(UserError, match="images of 6x6 are too small: use --image-size 7 or more, or drop --swd"):
        fid.SampleQuality([MeanColour()], real[..., :6, :6], labels, sliced_wasserstein=True)
