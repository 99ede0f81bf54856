"""fid.py: the Fréchet distance and KID against independent computations, sets of fewer than 2 images
refused, and the metrics wired into fid.py's CLI, train_script.py and random_generation.py (the network
is tested in test_inception.py, the evaluator in test_evaluator.py). The Inception weights used here are
random: they exercise the code path only and no number from them is an FID."""

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

import fid
import image_data
import train_script
from common import UserError
from conftest import run_script, write_image_folder


def random_covariance(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------------------------------------- metrics

def test_frechet_distance_of_a_set_with_itself_is_zero_and_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16)) * 1.5 + 0.3
    assert abs(fid.frechet_distance(*fid.statistics(a), *fid.statistics(a))) < 1e-8
    d_ab = fid.frechet_distance(*fid.statistics(a), *fid.statistics(b))
    assert d_ab > 0.1 and d_ab == pytest.approx(fid.frechet_distance(*fid.statistics(b), *fid.statistics(a)), rel=1e-9)


def test_frechet_distance_of_two_gaussians_equals_the_closed_form():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_covariance(rng, d), random_covariance(rng, d)
    # independent: Tr((S1 S2)^{1/2}) = sum sqrt(eig(S1^{1/2} S2 S1^{1/2})), a symmetric eigenproblem
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # diagonal covariances: sum (sqrt(s1) - sqrt(s2))^2 per dimension
    v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_few_images_compute_in_the_span_of_the_features_with_the_same_result():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(7, 64)) + 0.2   # ranks 9 and 6 in 64 dimensions
    (mu1, s1), (mu2, s2) = fid.statistics(a), fid.statistics(b)
    full = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real                 # pytorch-fid's way, in all 64 dimensions
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * full
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_singular_product_falls_back_to_an_offset_and_large_imaginary_parts_fail(monkeypatch):
    rng = np.random.default_rng(2)
    mu, s1, s2 = np.zeros(4), random_covariance(rng, 4), random_covariance(rng, 4)
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def singular_first(a):  # what sqrtm returns for a product with no square root, e.g. [[0, 1], [0, 0]]
        calls.append(a)
        return np.full_like(a, np.inf) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", singular_first)
    value = fid.frechet_distance(mu, s1, mu, s2, eps=1e-3)
    offset = 1e-3 * np.eye(4)
    assert np.allclose(calls[1], (s1 + offset) @ (s2 + offset))
    expected = np.trace(s1) + np.trace(s2) - 2 * np.trace(real_sqrtm((s1 + offset) @ (s2 + offset))).real
    assert value == pytest.approx(expected, rel=1e-9)
    assert np.isinf(real_sqrtm(np.array([[0.0, 1.0], [0.0, 0.0]]))).any()  # such products exist

    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 0.5j * np.eye(len(a)))
    with pytest.raises(UserError, match="imaginary"):
        fid.frechet_distance(mu, s1, mu, s2)


def unbiased_mmd2(x, y):
    """MMD^2_u with k(a, b) = (a.b / d + 1)^3, written as the double sums of Gretton et al. 2012."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_mmd_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(20, 8)), rng.normal(size=(20, 8)) + 0.5
    kid, std = fid.kernel_inception_distance(x, y, num_subsets=1, subset_size=20)
    assert kid == pytest.approx(unbiased_mmd2(x, y), rel=1e-9) and std == 0
    a, b = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    same, same_std = fid.kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    shifted, _ = fid.kernel_inception_distance(a, b + 0.5, num_subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3 and shifted > 0.05 and shifted > 20 * abs(same)


def test_kid_of_two_sets_no_larger_than_a_subset_is_their_mmd_with_std_0():
    # each subset would be both whole sets reordered: the value is the whole sets' MMD^2_u whatever num_subsets
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(15, 6)), rng.normal(size=(15, 6)) + 0.3
    kid, std = fid.kernel_inception_distance(x, y, num_subsets=100, subset_size=1000)
    assert kid == pytest.approx(unbiased_mmd2(x, y), rel=1e-9) and std == 0
    # a set larger than the subsets: the subsets differ, and so do their values
    kid, std = fid.kernel_inception_distance(np.concatenate([x, x + 0.1]), y, num_subsets=10, subset_size=1000)
    assert std > 0


def test_size_warnings():
    with pytest.warns(UserWarning, match="differ in size"):
        fid.warn_about_sizes(100, 90)
    with pytest.warns(UserWarning, match="2048"):
        fid.warn_about_sizes(500, 500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid.warn_about_sizes(500, 500, dim=128)   # more images than the evaluator's 128 dimensions: no warning


# ---------------------------------------------------------------------------------------------- fewer than 2 images

class CountingExtractor:
    """An extractor that records what it was asked to compute."""
    kind, names = "evaluator", ("FD_eval", "KID_eval")

    def __init__(self):
        self.calls = []

    def __call__(self, images, desc="", cache=True):
        self.calls.append(len(images))
        return images.flatten(1).double().numpy()


def test_statistics_and_sample_quality_refuse_fewer_than_two_images():
    with pytest.raises(UserError, match="1 image; FID and KID need at least 2 images per set"):
        fid.statistics(np.zeros((1, 4)))
    images, labels = torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.zeros(5, dtype=torch.long)
    extractor = CountingExtractor()
    with pytest.raises(UserError, match="the real image set .* has 1 image"):
        fid.SampleQuality([extractor], images[:1], labels[:1])
    with pytest.raises(UserError, match=r"the generated set \(--fid-samples\) has 1 image"):
        fid.SampleQuality([extractor], images, labels, n_samples=1)
    assert extractor.calls == []   # refused before any features
    assert len(fid.SampleQuality([extractor], images[:2], labels[:2]).real) == 1 and extractor.calls == [2]


@pytest.fixture
def evaluator_8(tmp_path):
    write_image_folder(tmp_path / "data", per_class=10, size=8, classes=("x", "y"))
    data = image_data.load_data(str(tmp_path / "data"), 8)
    net, val_accuracy = fid.train_evaluator(data, epochs=1, width=4, log=lambda line: None)
    fid.save_evaluator(net, data, val_accuracy, 0, tmp_path / "ev.pth")
    return tmp_path / "ev.pth"


def test_cli_refuses_a_folder_of_one_image_before_computing_anything(tmp_path, evaluator_8, isolated_cache, capsys):
    write_image_folder(tmp_path / "one", per_class=1, size=8, classes=("x",))
    features = ["--features", "evaluator", "--evaluator", str(evaluator_8), "--image-size", "8"]
    with pytest.raises(UserError) as err:
        fid.main([str(tmp_path / "data"), str(tmp_path / "one"), *features])
    assert str(err.value) == (f"'{tmp_path / 'one'}' has 1 image; FID and KID need at least 2 images per set")
    with pytest.raises(UserError, match="'.*one' has 1 image"):
        fid.main([str(tmp_path / "one"), "--save-stats", str(tmp_path / "one.npz"), *features])
    assert capsys.readouterr().out == "" and not (tmp_path / "one.npz").exists()
    assert not (isolated_cache / "features").exists()   # not even the 20-image folder's features

# ---------------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A weight file of a randomly initialised network (He init, so activations neither vanish nor explode).
    Only a test of the plumbing: nothing computed with it is an FID."""
    torch.manual_seed(0)
    net = fid.fid_inception_v3()
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_cli_end_to_end_with_stats_file_and_feature_cache(tmp_path, random_inception_weights, isolated_cache):
    """One FID (scipy's sqrtm of a 2048 x 2048 product takes tens of seconds on 2 cores), then --save-stats."""
    write_image_folder(tmp_path / "a", per_class=2, size=20, classes=("x",), seed=1)
    write_image_folder(tmp_path / "b", per_class=2, size=20, classes=("x",), seed=2)
    weights = ["--inception-weights", random_inception_weights, "--image-size", "16"]
    result = run_script("fid.py", tmp_path / "a", tmp_path / "b", *weights, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert np.isfinite(float(lines["FID"])) and float(lines["FID"]) > 0 and "std" in lines["KID"]
    assert "the Fréchet distance is biased" in result.stderr                        # 2 images: warned
    cached = sorted((isolated_cache / "features").glob("*.npy"))
    assert len(cached) == 2 and all(np.load(f).shape == (2, 2048) for f in cached)
    result = run_script("fid.py", tmp_path / "b", "--save-stats", tmp_path / "b.npz", *weights, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list((isolated_cache / "features").glob("*.npy"))) == 2   # b's features came from the cache
    with np.load(tmp_path / "b.npz") as stats:
        assert any(np.allclose(stats["mu"], fid.statistics(np.load(f))[0]) and
                   np.allclose(stats["sigma"], fid.statistics(np.load(f))[1]) for f in cached)


# ---------------------------------------------------------------------------------------------- wiring

def test_training_with_fid_and_no_weights_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "inception_weights", lambda path=None: (_ for _ in ()).throw(UserError("no weights")))
    write_image_folder(tmp_path / "data", per_class=5, size=8)
    with pytest.raises(UserError, match="no weights"):
        train_script.train(["--model", "MLPAE", "--data", str(tmp_path / "data"), "--image-size", "8",
                            "--fid-every", "1", "--models-dir", str(tmp_path / "models")])
    assert not (tmp_path / "models" / "Last_MLPAE.pth").exists()


def test_random_generation_fid_with_the_evaluator_trained_on_first_need(tmp_path):
    write_image_folder(tmp_path / "data", per_class=15, size=16, classes=("x", "y"))
    result = run_script("train_script.py", "--model", "VAE", "--data", tmp_path / "data", "--image-size", "8",
                        "--epochs", "1", "--fid-every", "1", "--fid-features", "evaluator", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    command = f"python fid.py train-evaluator --data {tmp_path / 'data'} --image-size 8 --channels 3"
    assert f"# no evaluator at models/Evaluator_data_8.pth: training one ({command})" in result.stdout.splitlines()
    assert (tmp_path / "models" / "Evaluator_data_8.pth").is_file()
    result = run_script("random_generation.py", "--model", "VAE", "--fid", "--fid-features", "evaluator",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no evaluator" not in result.stdout   # reused
    last, memorised = result.stdout.strip().splitlines()[-2:]
    assert last.startswith("FD_eval ") and "KID_eval" in last and "6 samples vs the 6 validation images" in last
    assert memorised.startswith("memorisation: of ")
