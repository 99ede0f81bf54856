"""inception.py: the FID network against pytorch-fid's weight file layout and its patched pools, the pool3
output, the preprocessing against an independent computation, and the weight file's failures as one line.
Weights here are random: they exercise the code path only and no number from them is an FID."""
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from torchvision.models.inception import InceptionA, InceptionC, InceptionE

import common
import fid
import inception
from common import UserError
from conftest import REPO, SHARED_DATA, write_image_folder


@pytest.mark.skipif(not (SHARED_DATA / "fid_inception_state_dict_keys.txt").exists(), reason="shared data absent")
def test_inception_state_dict_matches_pytorch_fids_weight_file():
    expected = dict(line.rstrip("\n").split("\t") for line in
                    (SHARED_DATA / "fid_inception_state_dict_keys.txt").read_text().splitlines())
    ours = {k: str(tuple(v.shape)) for k, v in fid.fid_inception_v3().state_dict().items()}
    assert len(expected) == 566 and ours == expected


def test_fid_blocks_are_torchvisions_with_the_tensorflow_graphs_pools():
    """The input of each patched block's pool branch conv, against the pools written out by hand."""
    net = inception.fid_inception_v3()
    blocks = {"Mixed_5b": (InceptionA, "FIDInceptionA"), "Mixed_6b": (InceptionC, "FIDInceptionC"),
              "Mixed_7b": (InceptionE, "FIDInceptionE_1"), "Mixed_7c": (InceptionE, "FIDInceptionE_2")}
    for name, (base, fid_name) in blocks.items():
        block = getattr(net, name).eval()
        assert isinstance(block, base) and type(block).__name__ == fid_name
        seen = []
        block.branch_pool.register_forward_hook(lambda module, args, out: seen.append(args[0]))
        spike = torch.zeros(1, block.branch1x1.conv.in_channels, 5, 5)
        spike[0, :, 0, 0], spike[0, :, 2, 2] = 9.0, 18.0
        with torch.no_grad():
            block(spike)
        pooled = seen[0][0, 0]
        if name == "Mixed_7c":   # max over the 3x3 neighbourhood: every neighbour of a spike takes its value
            assert pooled[1, 1] == 18 and pooled[0, 1] == 9 and pooled[4, 4] == 0
        else:   # mean over the window's pixels inside the image: 4 at a corner, 6 on an edge, 9 inside
            assert pooled[0, 0] == pytest.approx(9 / 4) and pooled[1, 0] == pytest.approx(9 / 6)
            assert pooled[2, 2] == pytest.approx(18 / 9) and pooled[4, 4] == 0


def test_load_inception_gives_pool3_of_the_loaded_weights(tmp_path):
    torch.manual_seed(0)
    reference = inception.fid_inception_v3().eval()
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    net = fid.load_inception(tmp_path / "weights.pth")
    x = torch.rand(1, 3, 299, 299) * 2 - 1
    maps = []
    reference.Mixed_7c.register_forward_hook(lambda module, args, out: maps.append(out))
    with torch.no_grad():
        logits, features = reference(x), net(x)
    assert logits.shape == (1, 1008) and maps[0].shape == (1, 2048, 8, 8)
    assert features.shape == (1, 2048) and torch.allclose(features, maps[0].mean(dim=(2, 3)), atol=1e-6)


def test_importing_fid_does_not_import_torchvision():
    code = "import sys, fid; print('torchvision' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_quantisation_and_resize_match_an_independent_computation():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 5, 7)
    q = fid.quantize(x)
    assert torch.equal(q, torch.from_numpy(np.floor(np.clip(x.numpy() * 255 + 0.5, 0, 255)).astype(np.uint8)))
    out = fid.inception_input(q)
    assert out.shape == (2, 3, 299, 299) and torch.equal(out[:, 0], out[:, 2])  # grey repeated to RGB

    def bilinear_axis(n_in, n_out):  # align_corners=False: source = (i + 0.5) n_in / n_out - 0.5, clamped at 0
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        weights = np.zeros((n_out, n_in))
        weights[np.arange(n_out), lo] += 1 - (src - lo)
        weights[np.arange(n_out), hi] += src - lo
        return weights

    image = q[1, 0].numpy() / 255.0
    expected = bilinear_axis(5, 299) @ image @ bilinear_axis(7, 299).T * 2 - 1
    assert np.allclose(out[1, 1].numpy(), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the weight file

@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A torch hub cache without the weights, and a download that fails as it does offline."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "hub"


def run_cli(argv, monkeypatch, capsys):
    """fid.py as its __main__ runs it: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["fid.py", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        common.run_cli(fid.main)
    return exit_info.value.code, capsys.readouterr().err


def test_no_weights_offline_is_one_line_saying_where_to_put_them(tmp_path, empty_hub, monkeypatch, capsys):
    write_image_folder(tmp_path / "a", per_class=2, size=8, classes=("x",))
    status, err = run_cli([tmp_path / "a", tmp_path / "a"], monkeypatch, capsys)
    expected_file = empty_hub / "checkpoints" / fid.FID_WEIGHTS_NAME
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert str(expected_file) in err and fid.FID_WEIGHTS_URL in err and "--inception-weights PATH" in err
    assert not expected_file.exists()
    with pytest.raises(UserError, match="does not exist"):
        fid.load_inception(tmp_path / "missing.pth")


def test_an_unwritable_weight_cache_is_the_same_one_line(tmp_path, empty_hub, monkeypatch):
    empty_hub.write_text("a file where the cache folder should be")
    with pytest.raises(UserError) as err:
        fid.inception_weights()
    message = str(err.value)
    assert "\n" not in message and fid.FID_WEIGHTS_URL in message and "--inception-weights PATH" in message


def test_a_truncated_or_foreign_weight_file_is_one_line(tmp_path, empty_hub, monkeypatch, capsys):
    write_image_folder(tmp_path / "a", per_class=2, size=8, classes=("x",))
    good = tmp_path / "good.pth"
    torch.save(inception.fid_inception_v3().state_dict(), good)
    truncated, foreign = tmp_path / "truncated.pth", tmp_path / "foreign.pth"
    truncated.write_bytes(good.read_bytes()[:100_000])
    torch.save({"conv.weight": torch.zeros(3)}, foreign)
    for path in (truncated, foreign):
        status, err = run_cli([tmp_path / "a", tmp_path / "a", "--inception-weights", path], monkeypatch, capsys)
        assert status == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert f"'{path}' is not pytorch-fid's Inception weight file" in err and "--inception-weights PATH" in err
    cached = empty_hub / "checkpoints" / fid.FID_WEIGHTS_NAME     # a broken download in the cache: delete it
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"<html>proxy login</html>")
    with pytest.raises(UserError, match="delete it to download it again"):
        fid.load_inception()

