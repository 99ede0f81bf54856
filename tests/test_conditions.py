"""Conditions richer than one class (scenes.py, unet.py, the evaluators): multi-hot labels and layouts, the
built-in objects data and its files, guidance, the iCLEVR accuracy, mean IoU, and the CLI end to end."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import ddpm
import evaluator
import flow_matching
import scenes
import segmenter
import unet
from common import UserError
from conftest import run_script
from unet import LabelAttention, guided, null_condition

TINY = dict(width=8, channel_mults=(1, 2), attention_levels=(1,), timesteps=20)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return scenes.export(tmp_path_factory.mktemp("objects"), n=40, image_size=16, seed=3)


def test_objects_are_deterministic_and_their_layouts_agree_with_their_labels():
    a, b = scenes.make_objects(60, 16), scenes.make_objects(60, 16)
    assert torch.equal(a.images, b.images) and torch.equal(a.layouts, b.layouts)
    assert not torch.equal(a.images, scenes.make_objects(60, 16, seed=1).images)
    assert a.images.shape == (60, 3, 16, 16) and a.multilabels.shape == (60, 24) and a.layouts.shape == (60, 16, 16)
    counts = a.multilabels.sum(1)
    assert counts.min() >= 1 and counts.max() <= 3 and len(set(counts.tolist())) == 3
    for hot, layout in zip(a.multilabels, a.layouts):
        in_map = set(layout.unique().tolist()) - {0}
        assert in_map == {i + 1 for i in hot.nonzero().flatten().tolist()}   # every object drawn, nothing else
    for hot in scenes.make_objects(300, 8).multilabels:   # no held-out pair appears together in training
        assert not any(hot[i] and hot[j] for i, j in scenes.HELD_OUT_PAIRS)


def test_a_scene_whose_first_hundred_placements_overlap_is_still_drawn():
    """From this generator state the first 100 draws of three objects' places overlap (draw_scene gave up there,
    with an error); it now draws on until they fit."""
    rng = np.random.default_rng()
    rng.bit_generator.state = {"bit_generator": "PCG64", "has_uint32": 1, "uinteger": 2215048775,
                               "state": {"state": 225815607122217287377912349348520564505,
                                         "inc": 19681440599402660950022900364292316661}}
    image, layout, boxes = scenes.draw_scene(rng, [12, 21, 0], 32)
    assert image.shape == (32, 32, 3) and set(np.unique(layout).tolist()) == {0, 13, 22, 1}
    assert [box[4] for box in boxes] == [scenes.LABEL_NAMES[i] for i in (12, 21, 0)]


def test_test_sets_hold_the_training_combinations_or_the_held_out_ones():
    index = {name: i for i, name in enumerate(scenes.LABEL_NAMES)}
    for held_out in (False, True):
        sets = [{index[n] for n in names} for names in scenes.test_label_sets(held_out)]
        assert len(sets) == 32 and all(1 <= len(s) <= 3 for s in sets)
        assert all(any(i in s and j in s for i, j in scenes.HELD_OUT_PAIRS) == held_out for s in sets)


def test_exported_files_load_back_as_the_built_in_data(exported):
    built_in = scenes.make_objects(40, 16, seed=3)
    from_labels = scenes.load_labelled_folder(exported / "images", exported / "train.json",
                                              exported / "objects.json", exported / "layouts", 16)
    assert torch.equal(from_labels.images, built_in.images)
    assert torch.equal(from_labels.multilabels, built_in.multilabels)
    assert torch.equal(from_labels.layouts, built_in.layouts)
    assert from_labels.label_names == scenes.LABEL_NAMES
    boxes = scenes.load_labelled_folder(exported / "images", None, exported / "objects.json",
                                        exported / "boxes.json", 16)   # labels read off the rasterised boxes
    assert torch.equal(boxes.multilabels, built_in.multilabels)
    test = scenes.read_test_labels(exported / "test.json", scenes.LABEL_NAMES)
    assert test.shape == (32, 24) and test.sum(1).min() >= 1


def test_multi_hot_encoding():
    hot = scenes.multi_hot([[0, 3], [23], []], 24)
    assert hot.dtype == torch.uint8 and hot.sum().item() == 3 and hot[0, 3] == 1 and hot[1, 23] == 1


def test_nearest_resizing_keeps_label_values(tmp_path):
    layout = np.zeros((20, 20), dtype=np.uint8)
    layout[2:9, 3:12], layout[12:18, 10:19] = 5, 24
    Image.fromarray(layout).save(tmp_path / "map.png")
    resized = scenes.read_layout_maps(tmp_path / "map.png", 8, 24)
    assert set(resized.unique().tolist()) == {0, 5, 24}
    assert torch.equal(resized[0], torch.from_numpy(np.asarray(Image.fromarray(layout).resize((8, 8),
                                                                                              Image.NEAREST))))


@pytest.mark.parametrize("break_it, words", [
    (lambda d: d["train"].update({"00000.png": ["pink hexagon"]}), "'00000.png' names ['pink hexagon']"),
    (lambda d: d["train"].update({"missing.png": ["red circle"]}), "names 'missing.png', which is not in"),
    (lambda d: d.update(train_text="{not json"), "is not valid JSON (Expecting property name"),
    (lambda d: d.update(layout_size=12), "is 12x12, its image 16x16"),
    (lambda d: d.update(layout_value=30), "has the value 30, beyond the 24 labels"),
])
def test_bad_label_and_layout_files_are_one_line_naming_the_file_and_entry(exported, tmp_path, break_it, words):
    files = {"train": json.loads((exported / "train.json").read_text())}
    break_it(files)
    (tmp_path / "train.json").write_text(files.get("train_text") or json.dumps(files["train"]))
    layouts = tmp_path / "layouts"
    layouts.mkdir()
    for path in (exported / "layouts").iterdir():
        layout = Image.open(path)
        if "layout_size" in files and path.name == "00000.png":
            layout = layout.resize((files["layout_size"],) * 2, Image.NEAREST)
        if "layout_value" in files and path.name == "00001.png":
            layout = Image.fromarray(np.full((16, 16), files["layout_value"], dtype=np.uint8))
        layout.save(layouts / path.name)
    with pytest.raises(UserError) as err:
        scenes.load_labelled_folder(exported / "images", tmp_path / "train.json", exported / "objects.json",
                                    layouts, 16)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind, y, options", [("labels", scenes.multi_hot([[0, 5], [7], [1, 2, 3]], 24), {}),
                                              ("labels", scenes.multi_hot([[0, 5], [7], [1, 2, 3]], 24),
                                               {"label_attention": True}),
                                              ("layout", scenes.make_objects(3, 8).layouts, {})])
def test_guidance_zero_is_the_unconditional_prediction_for_labels_and_layouts(kind, y, options):
    torch.manual_seed(0)
    model = ddpm.Model(ddpm.Config(**TINY, **options), (3, 8, 8), 24, kind).eval()
    with torch.no_grad():
        for p in model.ema.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        x, t = torch.randn(3, 3, 8, 8), torch.tensor([3, 10, 19])
        y = y.float() if kind == "labels" else y.long()
        null = null_condition(y, kind, 24)
        assert torch.allclose(guided(model.ema, x, t, y, 0.0), model.ema(x, t, null), atol=1e-5)
        cond, uncond = model.ema(x, t, y), model.ema(x, t, null)
        assert not torch.allclose(cond, uncond)                             # the condition reaches the output
        assert torch.allclose(guided(model.ema, x, t, y, 2.0), uncond + 2 * (cond - uncond), atol=1e-4)
    assert model.condition == kind and model.loss(torch.rand(3, 3, 8, 8), y)["loss"].ndim == 0


@pytest.mark.parametrize("kind, y", [("labels", scenes.multi_hot([[0, 5], [7], [1, 2, 3]], 24)),
                                     ("layout", scenes.make_objects(3, 8).layouts)])
def test_flow_sampler_at_guidance_zero_draws_the_unconditional_samples(kind, y):
    """Through flow matching's whole sampler: w = 0 gives the samples of the null condition (the unconditional
    model) from the same noise, and w = 1 or 3 gives others."""
    torch.manual_seed(0)
    model = flow_matching.Model(flow_matching.Config(**{k: v for k, v in TINY.items() if k != "timesteps"}),
                                (3, 8, 8), 24, kind).eval()
    with torch.no_grad():
        for p in model.ema.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    y = y.float() if kind == "labels" else y.long()

    def draw(labels, guidance):
        return model.sample(3, torch.Generator().manual_seed(1), labels=labels, steps=4, guidance=guidance)

    unconditional = draw(null_condition(y, kind, 24), 1.0)
    assert torch.allclose(draw(y, 0.0), unconditional, atol=1e-5)
    assert not torch.allclose(draw(y, 1.0), unconditional, atol=1e-3)
    assert not torch.allclose(draw(y, 3.0), draw(y, 1.0), atol=1e-3)


def test_iclevr_accuracy_on_hand_made_predictions():
    logits = torch.tensor([[5.0, 4.0, 0.0, 1.0],    # asked {0, 1}: top 2 = {0, 1}: 2 hits
                           [0.0, 3.0, 2.0, 1.0],    # asked {0, 3}: top 2 = {1, 2}: 0 hits
                           [1.0, 0.0, 0.0, 9.0]])   # asked {3}: top 1 = {3}: 1 hit
    asked = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.uint8)
    assert evaluator.label_hits(logits, asked).tolist() == [2, 0, 1]

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits[: len(x)]

    assert evaluator.accuracy(Fixed(), torch.zeros(3, 1, 2, 2, dtype=torch.uint8), asked) == pytest.approx(3 / 5)

    # The same logits written into the images' pixels, read back in batches of every size.
    images = (logits * 20).to(torch.uint8)[:, :, None, None]                      # (3, 4, 1, 1)
    read = torch.nn.Flatten()
    for batch_size in (1, 2, 256):
        assert torch.allclose(evaluator.logits(read, images, batch_size), logits * 20 / 255)
        assert evaluator.accuracy(read, images, asked, batch_size) == pytest.approx(3 / 5)
        assert evaluator.accuracy(read, images, torch.tensor([0, 2, 3]), batch_size) == pytest.approx(2 / 3)


def test_mean_iou_by_hand():
    true = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 2]])
    predicted = torch.tensor([[0, 1, 1, 1], [0, 0, 2, 2]])
    # class 0: 2 / 4, class 1: 2 / 3, class 2: 2 / 3
    assert segmenter.mean_iou(predicted, true, 2) == pytest.approx((2 / 4 + 2 / 3 + 2 / 3) / 3)
    assert segmenter.mean_iou(true, true, 5) == 1.0


def test_cli_end_to_end_multi_label_and_layout(exported, tmp_path):
    tiny = ["--image-size", "16", "--epochs", "1", "--batch-size", "64", "--timesteps", "20", "--width", "8",
            "--channel-mults", "1", "2", "--attention-levels", "1"]
    files = ["--data", exported / "images", "--labels", exported / "train.json", "--label-names",
             exported / "objects.json"]
    result = run_script("train_script.py", "--model", "diffusion", *files, "--layouts", exported / "layouts",
                        "--label-attention", *tiny, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "condition labels (24 labels)" in result.stdout
    result = run_script("train_script.py", "--model", "diffusion", *files, "--layouts", exported / "layouts",
                        "--condition", "layout", "--label-attention", "--run-name", "layout", *tiny, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "error: --label-attention needs multi-hot labels (--condition labels)" in result.stderr
    assert not (tmp_path / "models" / "Best_layout.pth").exists()
    result = run_script("train_script.py", "--model", "diffusion", *files, "--layouts", exported / "layouts",
                        "--condition", "layout", "--patch-size", "2", "--run-name", "layout", *tiny, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run_script("random_generation.py", "--model", "diffusion", "--labels", exported / "test.json",
                        "--steps", "4", "--guidance", "2", "--guidance-interval", "3", "1", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "error: --guidance-interval LO HI needs 0 <= LO < HI, got 3 1" in result.stderr
    result = run_script("random_generation.py", "--model", "diffusion", "--labels", exported / "test.json",
                        "--steps", "4", "--guidance", "2", "--guidance-interval", "0.28", "5.42", "--fid",
                        "--fid-features", "evaluator", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "# no evaluator at models/Evaluator_images_16.pth: training one" in result.stdout
    lines = result.stdout.strip().splitlines()
    assert lines[-3].startswith("FD_eval ") and "accuracy_eval" in lines[-3]
    assert lines[-2].startswith("accuracy_eval ") and "on the 32 label sets of" in lines[-2]
    assert lines[-1].startswith("memorisation: of 32 samples")
    assert Image.open(tmp_path / "vis" / "random_images_diffusion.png").size == (4 * (8 * 18 + 2), 4 * (4 * 18 + 2))
    result = run_script("random_generation.py", "--model", "diffusion", "--checkpoint", "models/Best_layout.pth",
                        "--layouts", exported / "layouts", "--steps", "3", "--fid", "--fid-features", "evaluator",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "# no layout evaluator at models/Segmenter_images_16.pth: training one" in result.stdout
    lines = result.stdout.splitlines()
    assert "miou_eval" in lines[-3] and "on the 40 layouts of" in lines[-2] and lines[-1].startswith("memorisation:")
    result = run_script("visualization.py", "--model", "diffusion", "--checkpoint", "models/Best_layout.pth",
                        "--n", "4", cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "vis" / "denoising_diffusion.png").is_file(), result.stderr
    result = run_script("random_generation.py", "--model", "diffusion", "--class-label", "0", cwd=tmp_path)
    assert result.returncode == 2 and "--class-label needs a model conditioned on classes" in result.stderr


def test_label_attention_attends_to_the_present_labels_and_the_null_token_alone():
    torch.manual_seed(0)
    attention = LabelAttention(8, 6)
    nn.init.normal_(attention.out.weight)   # not the identity it starts as
    tokens = torch.randn(5, 6)                                                # 4 labels and the null token
    present = torch.tensor([[True, False, True, False, True], [False, False, False, False, True]])
    x = torch.randn(2, 8, 3, 3)
    out = attention(x, (tokens, present))
    # by hand: q at each position, keys and values of the tokens present, softmax(q k^T / sqrt(C)) v
    q = attention.q(attention.norm(x)).flatten(2).transpose(1, 2)             # (2, 9, 8)
    k, v = attention.kv(tokens).chunk(2, dim=1)                               # (5, 8) each
    for i in range(2):
        keep = present[i]
        weights = torch.softmax(q[i] @ k[keep].T / 8 ** 0.5, dim=1)           # (9, n present)
        mixed = (weights @ v[keep]).T.reshape(8, 3, 3)
        assert torch.allclose(out[i], x[i] + attention.out(mixed[None])[0], atol=1e-5)
    changed = tokens.clone()
    changed[[1, 3]] += 1                                                      # labels 1 and 3: absent from both
    assert torch.allclose(attention(x, (changed, present)), out)


def fold(x, p):
    """(B, C, H, W) -> (B, C p^2, H/p, W/p) by hand: pixel (i p + a, j p + b) of channel c to channel c p^2 + a p + b
    at (i, j)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)


def unfold(x, p):
    b, cpp, h, w = x.shape
    c = cpp // (p * p)
    return x.reshape(b, c, p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * p, w * p)


def test_patches_are_the_plain_unet_on_the_image_folded_by_hand():
    """--patch-size 2: the U-Net on 2x2 patches is the plain U-Net with 4x the channels, given the image folded
    into patches by hand, its output unfolded the same way; the layout is folded with the image."""
    config = dict(width=8, channel_mults=(1, 2), attention_levels=(1,))
    torch.manual_seed(0)
    patched = unet.UNet(unet.UNetConfig(**config, patch_size=2), 3, 3, num_classes=4, condition="labels")
    nn.init.normal_(patched.head[-1].weight)   # the head starts at zero: give the output something to show
    plain = unet.UNet(unet.UNetConfig(**config), 12, 12, num_classes=4, condition="labels")
    plain.load_state_dict(patched.state_dict())
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    out = patched(x, t, y)
    assert out.shape == x.shape and out.abs().mean() > 0.1
    assert torch.allclose(out, unfold(plain(fold(x, 2), t, y), 2), atol=1e-5)
    folded = torch.randn(2, 12, 4, 4)
    assert torch.equal(unfold(fold(x, 2), 2), x) and torch.equal(fold(unfold(folded, 2), 2), folded)

    layout = torch.randint(0, 5, (2, 8, 8))
    patched = unet.UNet(unet.UNetConfig(**config, patch_size=2), 3, 3, num_classes=4, condition="layout")
    nn.init.normal_(patched.head[-1].weight)
    plain = unet.UNet(unet.UNetConfig(**config), 4 * (3 + 5), 12)   # the layout's 5 one-hot channels as input
    plain.load_state_dict(patched.state_dict())
    one_hot = nn.functional.one_hot(layout, 5).permute(0, 3, 1, 2).float()
    expected = unfold(plain(fold(torch.cat([x, one_hot], dim=1), 2), t), 2)
    assert torch.allclose(patched(x, t, layout), expected, atol=1e-5)
    with pytest.raises(UserError, match="--patch-size 2 needs the image size divisible by 4, got 6x6"):
        unet.check_size(unet.UNetConfig(**config, patch_size=2), 6, 6)
